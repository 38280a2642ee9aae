from libc.stdint cimport uint16_t, uint32_t, uint64_t, uint8_t


# One route as the data path sees it.  The label is stored inline: it is at
# most 63 bytes (the DNS limit), and a fixed record keeps a route at one
# allocation-free slot of a dense array.
cdef struct Entry:
    uint64_t route_id
    uint32_t sandbox_slot
    uint32_t target_slot
    uint16_t port
    uint16_t flags
    uint8_t length
    char label[63]


cdef class Hit:
    cdef public unsigned long long route_id
    cdef public unsigned int sandbox_slot, target_slot
    cdef public unsigned short port, flags


cdef class LabelIndex:
    # ``slots`` is the open-addressing table: 0 is empty, otherwise the high
    # 32 bits are the entry index + 1 and the low 32 bits the label's hash,
    # so a probe rejects most mismatches without touching ``entries``.
    cdef uint64_t *slots
    cdef uint64_t mask
    cdef Entry *entries
    cdef uint32_t count
    cdef uint32_t capacity
    cdef uint64_t seed

    cdef uint32_t _hash(self, const char *data, Py_ssize_t n) noexcept nogil
    cdef Py_ssize_t _find_slot(self, const char *data, Py_ssize_t n) noexcept nogil
    cdef int _grow_slots(self, uint64_t size) except -1
    cdef int _grow_entries(self) except -1
    cdef int _resize_entries(self, uint32_t size) except -1
    cdef long long _put(self, const char *p, Py_ssize_t n, object route_id_obj,
                        object sandbox_slot_obj, object port_obj,
                        object target_slot_obj, object flags_obj) except -2
    cpdef object lookup(self, bytes label)
    cpdef bint lookup_into(self, bytes label, Hit hit) except -1
