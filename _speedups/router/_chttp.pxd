# Layout of the classes of router._chttp (_speedups/http.pyx).
#
# The pure-Python twin, router/_http_py.py, keeps the same fields under the
# same names (with a leading underscore behind read-only properties).

cimport cython


cdef class _Head:
    # What request and response heads share.
    cdef readonly int version          # 10 or 11
    cdef readonly Py_ssize_t head_len
    cdef readonly int framing          # BODY_NONE, BODY_LENGTH, ...
    cdef readonly long long content_length
    cdef readonly bint keep_alive

    # Where each header is in _raw, and how the renderers treat it (_KEEP,
    # _DROP or _RESTATE): see _kinds_of in _chttp.pyx.  Only the first
    # _count entries are meaningful.
    cdef bytes _raw                    # the bytes the head was read from
    cdef bytes _spans                  # 4 int32 offsets a header, then actions
    cdef Py_ssize_t _count
    cdef bytes _content_length_value   # written for the _RESTATE header


cdef class RequestHead(_Head):
    cdef readonly bytes method
    cdef readonly bytes target
    cdef readonly object host          # bytes, or None
    cdef readonly object upgrade       # lower-cased bytes, or None
    cdef readonly bint expect_continue

    cdef bytes _upgrade_value          # the Upgrade header as received
    cdef bytes _origin_form            # the target as sent upstream


cdef class ResponseHead(_Head):
    cdef readonly int status
    cdef readonly bytes reason


cdef class _Fields:
    # What a header section says about framing and forwarding.
    cdef bytes raw                     # the bytes the spans point into
    cdef bytes spans                   # 4 int32 a header, then a kind each
    cdef Py_ssize_t count
    cdef object host                   # first Host value, or None
    cdef Py_ssize_t host_count
    cdef Py_ssize_t content_length_count
    cdef const char* length_digits     # the first Content-Length, in raw
    cdef Py_ssize_t length_size
    cdef bint restate_length
    cdef bint transfer_encoding
    cdef bint connection_close
    cdef bint connection_keep_alive
    cdef bint connection_upgrade
    cdef list connection_listed        # other lower-cased Connection options
    cdef object upgrade_value          # first Upgrade value, or None
    cdef bint expect_continue


@cython.final
cdef class Codec:
    cpdef object host_label(self, bytes host, tuple domains)
    cpdef object parse_request(self, object buf, Py_ssize_t max_head)
    cpdef object parse_response(
        self, object buf, Py_ssize_t max_head, bint head_request
    )
    cpdef bytes render_request(self, RequestHead head, bytes host, bytes extra)
    cpdef bytes render_response(
        self, ResponseHead head, bint close, bytes body=*, Py_ssize_t start=*
    )


cdef class ChunkedFramer:
    cdef readonly bint done
    cdef Py_ssize_t _max_line
    cdef int _state
    cdef unsigned long long _remaining  # chunk size, then bytes left of it
    cdef int _digits
    cdef Py_ssize_t _line               # bytes of the line or trailer section
    cdef bint _cr                       # last extension byte was CR
    cdef bytearray _trailers

    cdef object _fail(self, str message)
    cdef Py_ssize_t _walk(self, object data, list pieces) except -1
    cdef int _size_byte(self, unsigned char byte) except -1
    cdef int _chunk_start(self) noexcept
    cdef int _end_trailers(self) except -1
