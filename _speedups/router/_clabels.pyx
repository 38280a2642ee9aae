# cython: language_level=3
"""Compiled twin of ``router/_labels_py.py``: Host parsing and label index.

The table is open addressing with linear probing over a power-of-two array
of 64-bit slots, and backward-shift deletion so that no tombstones pile up
under a stream of expose/unexpose changes.  Routes live in a dense array of
fixed records; deleting one moves the last record into its place.
"""

import os

# One copy of the Host rules for both twins: the bytes a name may hold,
# the message, and IP literals (only for Hosts in brackets, never preview
# hosts, so speed does not matter there).
from router._labels_py import BAD_HOST_CHARACTER, NAME_BYTES, ip_literal

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

DEF MAX_LABEL = 63
DEF MIN_SLOTS = 16

cdef long long U32 = 0xFFFFFFFF

# What each byte may be in a Host value: 0 none, 1 a byte of a name
# (``NAME_BYTES``), 2 a colon, 3 a bracket.
cdef unsigned char HOST_CLASS[256]


cdef void _fill_host_class(bytes name_bytes) noexcept:
    cdef unsigned char c
    memset(HOST_CLASS, 0, sizeof(HOST_CLASS))
    for c in name_bytes:
        HOST_CLASS[c] = 1
    HOST_CLASS[<unsigned char>b":"] = 2
    HOST_CLASS[<unsigned char>b"["] = 3
    HOST_CLASS[<unsigned char>b"]"] = 3


_fill_host_class(NAME_BYTES)


cdef inline char _lower(char c) noexcept nogil:
    if b"A" <= c <= b"Z":
        return c + 32
    return c


cdef inline bint _port(const char *p, Py_ssize_t n) noexcept nogil:
    # Empty (RFC 3986 allows it), or digits of a number up to 65535.
    cdef Py_ssize_t i
    cdef long value = 0
    for i in range(n):
        if not (b"0" <= p[i] <= b"9"):
            return False
        value = value * 10 + (p[i] - c"0")
        if value > 65535:
            return False
    return True


cdef inline Py_ssize_t _put_digits(char *out, long long value) noexcept nogil:
    # ``value`` in 0..65535 (checked by the caller): its decimal digits.
    cdef char tmp[8]
    cdef Py_ssize_t n = 0, i
    while True:
        tmp[n] = c'0' + value % 10
        n += 1
        value //= 10
        if value == 0:
            break
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef Py_ssize_t _join_label(
    char *buf, object sandbox, long long port, object token
) except -1:
    # "{port}-{sandbox}-{token}" into ``buf`` (MAX_LABEL + 8 bytes); its size.
    cdef Py_ssize_t ls, lt, w
    cdef const char *ps
    cdef const char *pt
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port or flags out of range")
    ps = PyUnicode_AsUTF8AndSize(sandbox, &ls)
    pt = PyUnicode_AsUTF8AndSize(token, &lt)
    w = _put_digits(buf, port)
    if w + 2 + ls + lt > MAX_LABEL:
        raise ValueError("label must be 1-63 bytes")
    buf[w] = b"-"
    memcpy(buf + w + 1, ps, ls)
    buf[w + 1 + ls] = b"-"
    memcpy(buf + w + 2 + ls, pt, lt)
    return w + 2 + ls + lt


cdef inline bint _same_lower(
    const char *a, const char *b, Py_ssize_t n
) noexcept nogil:
    # ``b`` is already lower-case (configured domains are normalised).
    cdef Py_ssize_t i
    for i in range(n):
        if _lower(a[i]) != b[i]:
            return False
    return True


def host_label(bytes host not None, tuple domains not None):
    """The lower-cased first label when ``host`` names one under a domain."""
    cdef const char *p = PyBytes_AS_STRING(host)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(host)
    cdef Py_ssize_t i, dot, end, stray
    cdef Py_ssize_t colon = -1, colons = 0, brackets = 0, brackets_then = 0
    cdef unsigned char kind
    cdef bytes domain
    cdef char buf[MAX_LABEL]

    # 0. RFC 9112 §3.2 wants a 400 for a Host that is not a host.  One pass
    #    checks every byte and notes the colons and brackets, and where the
    #    last colon (the port's) is.
    for i in range(n):
        kind = HOST_CLASS[<unsigned char>p[i]]
        if kind != 1:
            if kind == 0:
                raise ValueError(BAD_HOST_CHARACTER)
            if kind == 2:
                colon = i
                colons += 1
                brackets_then = brackets
            else:
                brackets += 1

    if n and p[0] == b"[":
        end = -1
        for i in range(n):
            if p[i] == b"]":
                end = i
                break
        if end < 0:
            raise ValueError("unterminated IPv6 literal in Host")
        if not ip_literal(host[1:end]):
            raise ValueError("bad IP literal in Host")
        if end + 1 < n and (
            p[end + 1] != b":" or not _port(p + end + 2, n - end - 2)
        ):
            raise ValueError("bad port in Host")
        return None

    # 1. Drop the port, which must be a number up to 65535; no other colon
    #    nor a bracket may be left.
    if colon >= 0:
        if not _port(p + colon + 1, n - colon - 1):
            raise ValueError("bad port in Host")
        n = colon
        stray = colons - 1 + brackets_then
    else:
        stray = brackets
    if stray:
        raise ValueError(BAD_HOST_CHARACTER)

    # 2. One trailing dot (the absolute form of the name) is the same host.
    if n and p[n - 1] == b".":
        n -= 1

    # 3. Exactly one label, then one of the configured domains.
    dot = -1
    for i in range(n):
        if p[i] == b".":
            dot = i
            break
    if dot <= 0:
        return None
    for domain in domains:
        if (
            PyBytes_GET_SIZE(domain) == n - dot - 1
            and _same_lower(p + dot + 1, PyBytes_AS_STRING(domain), n - dot - 1)
        ):
            break
    else:
        return None
    if dot > MAX_LABEL:
        # Longer than any label we accept: a lookup would miss anyway, but
        # the caller still learns this was meant as a preview host.
        return host[:dot].lower()
    for i in range(dot):
        buf[i] = _lower(p[i])
    return buf[:dot]


cdef class Hit:
    """What ``LabelIndex.lookup_into`` found; one is reused for every lookup."""


cdef class LabelIndex:
    """Label → (route_id, sandbox_slot, port, target_slot, flags)."""

    def __cinit__(self):
        self.slots = <uint64_t *>PyMem_Malloc(MIN_SLOTS * sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError()
        memset(self.slots, 0, MIN_SLOTS * sizeof(uint64_t))
        self.mask = MIN_SLOTS - 1
        self.entries = NULL
        self.count = 0
        self.capacity = 0
        self.seed = int.from_bytes(os.urandom(8), "little")

    def __dealloc__(self):
        PyMem_Free(self.slots)
        PyMem_Free(self.entries)

    def __len__(self):
        return self.count

    def __contains__(self, bytes label not None):
        return self._find_slot(
            PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)
        ) >= 0

    cdef uint32_t _hash(self, const char *data, Py_ssize_t n) noexcept nogil:
        # Eight bytes a step, keyed with a per-process seed, then a murmur3
        # finaliser so that the low bits (the home slot) depend on every
        # byte.  A byte-at-a-time hash (FNV) is one multiply per byte in a
        # dependent chain: for a 42-byte label that was most of a lookup.
        cdef uint64_t h = self.seed ^ (<uint64_t>n * 0x9E3779B97F4A7C15ULL)
        cdef uint64_t k
        cdef Py_ssize_t i = 0
        while i + 8 <= n:
            memcpy(&k, data + i, 8)
            h = (h ^ k) * 0xFF51AFD7ED558CCDULL
            h ^= h >> 29
            i += 8
        if i < n:
            k = 0
            memcpy(&k, data + i, n - i)
            h = (h ^ k) * 0xFF51AFD7ED558CCDULL
            h ^= h >> 29
        h ^= h >> 33
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 33
        h *= 0xC4CEB9FE1A85EC53ULL
        h ^= h >> 33
        return <uint32_t>h

    cdef Py_ssize_t _find_slot(self, const char *data, Py_ssize_t n) noexcept nogil:
        cdef uint32_t h
        cdef uint64_t i, s
        cdef Entry *e
        if n < 1 or n > MAX_LABEL:
            return -1
        h = self._hash(data, n)
        i = h & self.mask
        while True:
            s = self.slots[i]
            if s == 0:
                return -1
            if <uint32_t>s == h:
                e = &self.entries[(s >> 32) - 1]
                if e.length == n and memcmp(e.label, data, n) == 0:
                    return <Py_ssize_t>i
            i = (i + 1) & self.mask

    def reserve(self, Py_ssize_t count):
        """Make room for ``count`` labels in all before a bulk load.

        Sized once, the slot array is not rehashed at every doubling, nor
        the dense array copied at every growth: a fifth of loading a
        million routes.
        """
        cdef uint64_t slots = self.mask + 1
        if count < 0:
            raise ValueError("count must be >= 0")
        if count > 0xFFFFFFFE:
            raise ValueError("count out of range")
        while <uint64_t>count * 4 > slots * 3:
            slots *= 2
        if slots > self.mask + 1:
            self._grow_slots(slots)
        if <uint32_t>count > self.capacity:
            self._resize_entries(<uint32_t>count)

    cdef int _grow_slots(self, uint64_t size) except -1:
        cdef uint64_t *fresh = <uint64_t *>PyMem_Malloc(size * sizeof(uint64_t))
        cdef uint32_t k, h
        cdef uint64_t i
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0, size * sizeof(uint64_t))
        PyMem_Free(self.slots)
        self.slots = fresh
        self.mask = size - 1
        for k in range(self.count):
            h = self._hash(self.entries[k].label, self.entries[k].length)
            i = h & self.mask
            while self.slots[i] != 0:
                i = (i + 1) & self.mask
            self.slots[i] = ((<uint64_t>k + 1) << 32) | h
        return 0

    cdef int _grow_entries(self) except -1:
        # Grow by half, not double: the dense array is most of the memory
        # per route, and appends are rare next to lookups.
        return self._resize_entries(self.capacity + (self.capacity >> 1) + 16)

    cdef int _resize_entries(self, uint32_t size) except -1:
        cdef Entry *fresh = <Entry *>PyMem_Realloc(
            self.entries, size * sizeof(Entry)
        )
        if fresh == NULL:
            raise MemoryError()
        self.entries = fresh
        self.capacity = size
        return 0

    def set(
        self,
        bytes label not None,
        route_id_obj,
        sandbox_slot_obj,
        port_obj,
        target_slot_obj,
        flags_obj,
    ):
        """Insert ``label`` or replace its value.

        The target slot of the value replaced, or None for a new label: the
        caller keeps targets' reference counts, and needs no lookup first.
        """
        cdef long long old = self._put(
            PyBytes_AS_STRING(label),
            PyBytes_GET_SIZE(label),
            route_id_obj,
            sandbox_slot_obj,
            port_obj,
            target_slot_obj,
            flags_obj,
        )
        return None if old < 0 else old

    cdef long long _put(
        self,
        const char *p,
        Py_ssize_t n,
        object route_id_obj,
        object sandbox_slot_obj,
        object port_obj,
        object target_slot_obj,
        object flags_obj,
    ) except -2:
        # The replaced entry's target slot, or -1 when ``p`` is new.
        cdef long long old = -1
        cdef Py_ssize_t at
        cdef Entry *e
        cdef uint32_t h
        cdef uint64_t i
        cdef long long route_id, sandbox_slot, port, target_slot, flags

        if not 1 <= n <= MAX_LABEL:
            raise ValueError("label must be 1-63 bytes")
        # Converted once to C integers and range-checked in C: comparing
        # Python ints made ``set`` the slowest step of loading a store.
        try:
            route_id = route_id_obj
            sandbox_slot = sandbox_slot_obj
            port = port_obj
            target_slot = target_slot_obj
            flags = flags_obj
        except OverflowError:
            raise ValueError("route value out of range") from None
        if route_id < 0:
            raise ValueError("route_id out of range")
        if not (0 <= sandbox_slot <= U32 and 0 <= target_slot <= U32):
            raise ValueError("slot out of range")
        if not (0 <= port <= 0xFFFF and 0 <= flags <= 0xFFFF):
            raise ValueError("port or flags out of range")

        at = self._find_slot(p, n)
        if at >= 0:
            e = &self.entries[(self.slots[at] >> 32) - 1]
            old = e.target_slot
        else:
            if (<uint64_t>self.count + 1) * 4 > (self.mask + 1) * 3:
                self._grow_slots((self.mask + 1) * 2)
            if self.count == self.capacity:
                self._grow_entries()
            e = &self.entries[self.count]
            e.length = <unsigned char>n
            memcpy(e.label, p, n)
            h = self._hash(p, n)
            i = h & self.mask
            while self.slots[i] != 0:
                i = (i + 1) & self.mask
            self.count += 1
            self.slots[i] = (<uint64_t>self.count << 32) | h
        e.route_id = route_id
        e.sandbox_slot = sandbox_slot
        e.target_slot = target_slot
        e.port = port
        e.flags = flags
        return old

    def load_rows(self, list rows not None, dict sandbox_slots not None, target_slot):
        """Insert stored routes in bulk; the highest route_id among them.

        Each row is ``(sandbox, port, token, route_id, target, flags)``, as
        the store reads them; the label is ``{port}-{sandbox}-{token}`` and
        the sandbox slot comes from ``sandbox_slots``.  ``target_slot`` is
        called for a row with a target (rare) to get its slot.  The same
        work as a Python loop over ``set``, without a Python call per row:
        at a million routes that loop was a third of start-up.
        """
        cdef Py_ssize_t n
        cdef char buf[MAX_LABEL + 8]
        cdef object row, sandbox, token, target, route_id
        cdef object top = 0

        self.reserve(self.count + len(rows))
        for row in rows:
            sandbox, port_obj, token, route_id, target, flags = row
            n = _join_label(buf, sandbox, port_obj, token)
            self._put(
                buf,
                n,
                route_id,
                sandbox_slots[sandbox],
                port_obj,
                0 if target is None else target_slot(target),
                flags,
            )
            if route_id > top:
                top = route_id
        return top

    def put_route(self, dict route not None, dict sandbox_slots not None, target_slot):
        """Insert or replace one route from its change record's ``route``.

        ``load_rows`` for one record (``sandbox``, ``port``, ``token``,
        ``route_id``, ``target``, ``host``), as a change applies it: the
        label is made here, not in Python.  Returns what ``set`` does, the
        replaced target slot or None.
        """
        cdef char buf[MAX_LABEL + 8]
        cdef object port_obj = route["port"]
        cdef object target = route["target"]
        cdef Py_ssize_t n = _join_label(buf, route["sandbox"], port_obj, route["token"])
        cdef long long old = self._put(
            buf,
            n,
            route["route_id"],
            sandbox_slots[route["sandbox"]],
            port_obj,
            target_slot(target) if target else 0,
            1 if route["host"] == "preserve" else 0,
        )
        return None if old < 0 else old

    def remove(self, bytes label not None):
        """Drop ``label``; False when it was not there."""
        cdef Py_ssize_t at = self._find_slot(
            PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)
        )
        cdef uint64_t hole, j, home, s
        cdef uint32_t k, last
        cdef Py_ssize_t moved
        if at < 0:
            return False
        k = <uint32_t>((self.slots[at] >> 32) - 1)

        # 1. Backward-shift deletion: pull later members of the probe run
        # into the hole unless that would move them before their home slot.
        hole = <uint64_t>at
        self.slots[hole] = 0
        j = hole
        while True:
            j = (j + 1) & self.mask
            s = self.slots[j]
            if s == 0:
                break
            home = (<uint32_t>s) & self.mask
            if (j - home) & self.mask >= (j - hole) & self.mask:
                self.slots[hole] = s
                self.slots[j] = 0
                hole = j

        # 2. Keep the entries dense: the last record takes the freed place,
        # and the slot that pointed at it is repointed.
        last = self.count - 1
        if k != last:
            moved = self._find_slot(
                self.entries[last].label, self.entries[last].length
            )
            self.entries[k] = self.entries[last]
            self.slots[moved] = ((<uint64_t>k + 1) << 32) | (
                self.slots[moved] & U32
            )
        self.count -= 1
        return True

    cpdef object lookup(self, bytes label):
        # cpdef: the compiled data path calls it without a method lookup.
        cdef Py_ssize_t at
        cdef Entry *e
        if label is None:
            raise TypeError("label must be bytes, not None")
        at = self._find_slot(PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label))
        if at < 0:
            return None
        e = &self.entries[(self.slots[at] >> 32) - 1]
        # A fresh tuple each time: caching one per entry was measured slower
        # at a million routes (scattered objects) and doubled their memory.
        return (e.route_id, e.sandbox_slot, e.port, e.target_slot, e.flags)

    cpdef bint lookup_into(self, bytes label, Hit hit) except -1:
        # What the compiled data path calls: the fields go into a ``Hit``
        # it keeps, so a request's lookup makes no tuple and no integers.
        cdef Py_ssize_t at
        cdef Entry *e
        if label is None or hit is None:
            raise TypeError("label must be bytes and hit a Hit")
        at = self._find_slot(PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label))
        if at < 0:
            return False
        e = &self.entries[(self.slots[at] >> 32) - 1]
        hit.route_id = e.route_id
        hit.sandbox_slot = e.sandbox_slot
        hit.port = e.port
        hit.target_slot = e.target_slot
        hit.flags = e.flags
        return True

    def compact(self):
        """Give back the dense array's spare room, after a bulk load.

        The array grows by half when full, so a table loaded in one go
        holds up to a third of it unused; a worker that loads a snapshot
        and then takes a few changes should not carry that.
        """
        cdef uint32_t size = self.count if self.count > MIN_SLOTS else MIN_SLOTS
        if size < self.capacity:
            self._resize_entries(size)

    def clear(self):
        PyMem_Free(self.entries)
        self.entries = NULL
        self.capacity = 0
        self.count = 0
        memset(self.slots, 0, (self.mask + 1) * sizeof(uint64_t))

    def iter_items(self):
        """Every entry, in storage order, one at a time.

        For streaming a big table out (a worker's start): no list of a
        million tuples at once.  The index must not change meanwhile.
        """
        cdef uint32_t k = 0
        cdef Entry *e
        while k < self.count:
            e = &self.entries[k]
            yield (
                e.label[:e.length],
                (e.route_id, e.sandbox_slot, e.port, e.target_slot, e.flags),
            )
            k += 1

    def items(self):
        """Every entry, sorted by label (for tests and snapshots)."""
        cdef uint32_t k
        cdef Entry *e
        out = []
        for k in range(self.count):
            e = &self.entries[k]
            out.append((
                e.label[:e.length],
                (e.route_id, e.sandbox_slot, e.port, e.target_slot, e.flags),
            ))
        out.sort()
        return out

    def memory_bytes(self):
        """Bytes held by the table's C arrays."""
        return (
            (self.mask + 1) * sizeof(uint64_t)
            + self.capacity * sizeof(Entry)
            + sizeof(LabelIndex)
        )
