cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t, uint8_t


# A route's label, one cache line: a lookup that finds its slot compares
# the label with a single read from memory.  The label is at most 63 bytes
# (the DNS limit), so length and label fill the 64 bytes exactly.
cdef struct Key:
    uint8_t length
    char label[63]


# What the data path needs of a route, kept apart from its key (packed: 20
# bytes, not 24).  Its address is known as soon as the slot is, so the
# processor reads it while it compares the key.
cdef packed struct Value:
    uint64_t route_id
    uint32_t sandbox_slot
    uint32_t target_slot
    uint16_t port
    uint16_t flags


@cython.final
cdef class Hit:
    cdef public unsigned long long route_id
    cdef public unsigned int sandbox_slot, target_slot
    cdef public unsigned short port, flags


# Final: its C methods are called directly, and inlined, not through a
# table of methods, and ``lookup_into`` looks for no Python override.
@cython.final
cdef class LabelIndex:
    # ``slots`` is the open-addressing table: 0 is empty, otherwise the high
    # 32 bits are the entry index + 1 and the low 32 bits the label's hash,
    # so a probe rejects most mismatches without touching ``keys``.
    # ``keys`` and ``values`` are dense arrays indexed alike; ``keys`` is
    # aligned to 64 bytes inside the block ``keys_block`` (PyMem gives 16).
    cdef uint64_t *slots
    cdef uint64_t mask
    cdef char *keys_block
    cdef Key *keys
    cdef Value *values
    cdef uint32_t count
    cdef uint32_t capacity
    cdef uint64_t seed

    cdef uint32_t _hash(self, const char *data, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t _find_slot(self, const char *data, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t _walk(
        self, const char *data, Py_ssize_t n, uint32_t h, uint64_t i
    ) noexcept nogil
    cdef int _grow_slots(self, uint64_t size) except -1
    cdef int _grow_entries(self) except -1
    cdef int _resize_entries(self, uint32_t size) except -1
    cdef tuple _item(self, uint32_t k)
    cdef long long _put(self, const char *p, Py_ssize_t n, object route_id_obj,
                        object sandbox_slot_obj, object port_obj,
                        object target_slot_obj, object flags_obj) except -2
    cpdef object lookup(self, bytes label)
    cpdef bint lookup_into(self, bytes label, Hit hit) except -1


# host_label without its argument checks (the caller's are typed).
cdef object _host_label(bytes host, tuple domains)
