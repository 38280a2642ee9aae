# cython: language_level=3
"""Compiled twin of ``router/_labels_py.py``: Host parsing and label index.

The table is open addressing with linear probing over a power-of-two array
of 64-bit slots, and backward-shift deletion so that no tombstones pile up
under a stream of expose/unexpose changes.  Routes live in two dense arrays
indexed alike, labels (a cache line each) and values; deleting a route moves
the last one into its place.
"""

import os

# One copy of the Host rules for both twins: the bytes a name may hold,
# the message, and IP literals (only for Hosts in brackets, never preview
# hosts, so speed does not matter there).
from router._labels_py import BAD_HOST_CHARACTER, NAME_BYTES, ip_literal

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memmove, memset

cdef extern from *:
    void __builtin_prefetch(const void *address) noexcept nogil
    int __builtin_ctz(unsigned int x) noexcept nogil

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


cdef inline uint64_t _word(const char *p) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, p, 8)
    return w


cdef inline uint64_t _short_word(const char *p, Py_ssize_t n) noexcept nogil:
    # Fewer than eight bytes, each in its place; the rest stay zero.
    cdef uint64_t w = 0
    cdef Py_ssize_t i
    for i in range(n):
        w |= (<uint64_t><unsigned char>p[i]) << (8 * i)
    return w


cdef inline uint64_t _mix(uint64_t h, uint64_t k) noexcept nogil:
    h = (h ^ k) * 0xFF51AFD7ED558CCDULL
    return h ^ (h >> 29)


cdef inline bint _same(const char *a, const char *b, Py_ssize_t n) noexcept nogil:
    # ``memcmp`` for 1-63 bytes without a call: words, the last one
    # overlapping the one before, so nothing is read past either end.
    cdef uint64_t diff = 0
    cdef Py_ssize_t i = 0
    if n < 8:
        return _short_word(a, n) == _short_word(b, n)
    while i + 8 < n:
        diff |= _word(a + i) ^ _word(b + i)
        i += 8
    diff |= _word(a + n - 8) ^ _word(b + n - 8)
    return diff == 0


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
    return _host_label(host, domains)


cdef object _host_label(bytes host, tuple domains):
    # host_label's work, for router._chttp.Codec to call in C.
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
        self.keys_block = NULL
        self.keys = NULL
        self.values = NULL
        self.count = 0
        self.capacity = 0
        self.seed = int.from_bytes(os.urandom(8), "little")

    def __dealloc__(self):
        PyMem_Free(self.slots)
        PyMem_Free(self.keys_block)
        PyMem_Free(self.values)

    def __len__(self):
        return self.count

    def __contains__(self, bytes label not None):
        return self._find_slot(
            PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)
        ) >= 0

    cdef uint32_t _hash(self, const char *data, Py_ssize_t n) noexcept nogil:
        # Keyed with a per-process seed, eight bytes a step in two lanes so
        # that the two chains of multiplies run side by side (a 42-byte
        # label is three steps each, not six in one chain), then a
        # finaliser so that the low bits (the home slot) depend on every
        # byte.  The last word overlaps the one before rather than being
        # copied byte by byte: the length is in the seed, so "ab" and "abb"
        # still differ.
        cdef uint64_t a = self.seed ^ (<uint64_t>n * 0x9E3779B97F4A7C15ULL)
        cdef uint64_t b = self.seed ^ 0x6A09E667F3BCC909ULL
        cdef uint64_t h
        cdef Py_ssize_t i = 0
        while i + 16 <= n:
            a = _mix(a, _word(data + i))
            b = _mix(b, _word(data + i + 8))
            i += 16
        if n - i > 8:
            a = _mix(a, _word(data + i))
            b = _mix(b, _word(data + n - 8))
        elif n - i > 0:
            a = _mix(a, _word(data + n - 8) if n >= 8 else _short_word(data, n))
        h = a ^ (b * 0xC4CEB9FE1A85EC53ULL)
        h ^= h >> 32
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 32
        return <uint32_t>h

    cdef Py_ssize_t _find_slot(self, const char *data, Py_ssize_t n) noexcept nogil:
        cdef uint32_t h
        cdef uint64_t i, m, s0, s1, s2, s3, s
        cdef unsigned int found, empty
        cdef Key *e
        if n < 1 or n > MAX_LABEL:
            return -1
        h = self._hash(data, n)
        m = self.mask
        i = h & m

        # The first four slots of the run at once, with no branch on what
        # they hold: nearly every hit is among them, and a branch that
        # waits for the slots to come from memory is mispredicted often
        # enough (many hits are not in their home slot) to throw away the
        # processor's work on the next lookups.  A label's slot
        # is in the run of its home slot, and a slot with the same hash
        # has the same home, so any slot here with the label's hash is a
        # candidate.
        s0 = self.slots[i]
        s1 = self.slots[(i + 1) & m]
        s2 = self.slots[(i + 2) & m]
        s3 = self.slots[(i + 3) & m]
        found = (
            (<unsigned int>((<uint32_t>s0 == h) & (s0 != 0)))
            | (<unsigned int>((<uint32_t>s1 == h) & (s1 != 0)) << 1)
            | (<unsigned int>((<uint32_t>s2 == h) & (s2 != 0)) << 2)
            | (<unsigned int>((<uint32_t>s3 == h) & (s3 != 0)) << 3)
        )
        if found:
            i = (i + <uint64_t>__builtin_ctz(found)) & m
            s = self.slots[i]
            # The value is read next on a hit: asked for now, it comes
            # from memory while the key is compared, not after.
            __builtin_prefetch(&self.values[(s >> 32) - 1])
            e = &self.keys[(s >> 32) - 1]
            if e.length == n and _same(e.label, data, n):
                return <Py_ssize_t>i
            # Another label with the same 32-bit hash: the slow walk.
            return self._walk(data, n, h, h & m)
        empty = (s0 == 0) | (s1 == 0) | (s2 == 0) | (s3 == 0)
        if empty:
            return -1
        return self._walk(data, n, h, (<uint64_t>h + 4) & m)

    cdef Py_ssize_t _walk(
        self, const char *data, Py_ssize_t n, uint32_t h, uint64_t i
    ) noexcept nogil:
        # Slot by slot from ``i`` to the end of the run.
        cdef uint64_t s
        cdef Key *e
        while True:
            s = self.slots[i]
            if s == 0:
                return -1
            if <uint32_t>s == h:
                e = &self.keys[(s >> 32) - 1]
                if e.length == n and _same(e.label, data, n):
                    return <Py_ssize_t>i
            i = (i + 1) & self.mask

    def hash_of(self, bytes label not None):
        """The 32-bit hash ``label`` is filed under in this index.

        For tests that need two labels with one hash, to reach the code
        that compares whole labels; this index's seed is its own.
        """
        return self._hash(PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label))

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
            h = self._hash(self.keys[k].label, self.keys[k].length)
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
        cdef size_t offset = <char *>self.keys - self.keys_block
        cdef size_t moved_to
        cdef char *block
        cdef Value *values

        # Values first; if the keys then fail, ``capacity`` is what both
        # arrays still hold.
        values = <Value *>PyMem_Realloc(self.values, size * sizeof(Value))
        if values == NULL:
            raise MemoryError()
        self.values = values
        if size < self.capacity:
            self.capacity = size

        # Keys: a block with room to align them to 64 bytes.  Realloc may
        # put the block at another alignment, so the keys move to the new
        # aligned start when their offset in it changed.
        block = <char *>PyMem_Realloc(self.keys_block, size * sizeof(Key) + 63)
        if block == NULL:
            raise MemoryError()
        moved_to = (64 - <uintptr_t>block % 64) % 64
        if self.keys_block != NULL and moved_to != offset:
            memmove(block + moved_to, block + offset, self.count * sizeof(Key))
        self.keys_block = block
        self.keys = <Key *>(block + moved_to)
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
        cdef Key *key
        cdef Value *e
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
            e = &self.values[(self.slots[at] >> 32) - 1]
            old = e.target_slot
        else:
            if (<uint64_t>self.count + 1) * 4 > (self.mask + 1) * 3:
                self._grow_slots((self.mask + 1) * 2)
            if self.count == self.capacity:
                self._grow_entries()
            key = &self.keys[self.count]
            key.length = <unsigned char>n
            memcpy(key.label, p, n)
            e = &self.values[self.count]
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
            moved = self._find_slot(self.keys[last].label, self.keys[last].length)
            self.keys[k] = self.keys[last]
            self.values[k] = self.values[last]
            self.slots[moved] = ((<uint64_t>k + 1) << 32) | (
                self.slots[moved] & U32
            )
        self.count -= 1
        return True

    cpdef object lookup(self, bytes label):
        # cpdef: the compiled data path calls it without a method lookup.
        cdef Py_ssize_t at
        cdef Value *e
        if label is None:
            raise TypeError("label must be bytes, not None")
        at = self._find_slot(PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label))
        if at < 0:
            return None
        e = &self.values[(self.slots[at] >> 32) - 1]
        # A fresh tuple each time: caching one per entry was measured slower
        # at a million routes (scattered objects) and doubled their memory.
        return (e.route_id, e.sandbox_slot, e.port, e.target_slot, e.flags)

    cpdef bint lookup_into(self, bytes label, Hit hit) except -1:
        # What the compiled data path calls: the fields go into a ``Hit``
        # it keeps, so a request's lookup makes no tuple and no integers.
        cdef Py_ssize_t at
        cdef Value *e
        if label is None or hit is None:
            raise TypeError("label must be bytes and hit a Hit")
        at = self._find_slot(PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label))
        if at < 0:
            return False
        e = &self.values[(self.slots[at] >> 32) - 1]
        hit.route_id = e.route_id
        hit.sandbox_slot = e.sandbox_slot
        hit.port = e.port
        hit.target_slot = e.target_slot
        hit.flags = e.flags
        return True

    def compact(self):
        """Give back the dense arrays' spare room, after a bulk load.

        They grow by half when full, so a table loaded in one go
        holds up to a third of it unused; a worker that loads a snapshot
        and then takes a few changes should not carry that.
        """
        cdef uint32_t size = self.count if self.count > MIN_SLOTS else MIN_SLOTS
        if size < self.capacity:
            self._resize_entries(size)

    def clear(self):
        PyMem_Free(self.keys_block)
        PyMem_Free(self.values)
        self.keys_block = NULL
        self.keys = NULL
        self.values = NULL
        self.capacity = 0
        self.count = 0
        memset(self.slots, 0, (self.mask + 1) * sizeof(uint64_t))

    def iter_items(self):
        """Every entry, in storage order, one at a time.

        For streaming a big table out (a worker's start): no list of a
        million tuples at once.  The index must not change meanwhile.
        """
        cdef uint32_t k = 0
        while k < self.count:
            yield self._item(k)
            k += 1

    def items(self):
        """Every entry, sorted by label (for tests and snapshots)."""
        cdef uint32_t k
        out = [self._item(k) for k in range(self.count)]
        out.sort()
        return out

    cdef tuple _item(self, uint32_t k):
        cdef Key *key = &self.keys[k]
        cdef Value *e = &self.values[k]
        return (
            key.label[:key.length],
            (e.route_id, e.sandbox_slot, e.port, e.target_slot, e.flags),
        )

    def memory_bytes(self):
        """Bytes held by the table's C arrays."""
        return (
            (self.mask + 1) * sizeof(uint64_t)
            + self.capacity * (sizeof(Key) + sizeof(Value))
            + (63 if self.keys_block != NULL else 0)
            + sizeof(LabelIndex)
        )
