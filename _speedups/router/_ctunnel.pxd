# C types for router/_tunnel_py.py, compiled in Cython's pure-Python mode as
# router._ctunnel (the same scheme as _cproxy.pxd).
#
# Every message of every tunnel passes through FrameTracker.feed, so its
# loop runs on C integers and reads the header bytes in place.

cimport cython


@cython.final
cdef class FrameTracker:
    cdef public bytes header
    cdef public unsigned long long need
    cdef public bint saw_close

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, at=Py_ssize_t,
                   avail=Py_ssize_t, take=Py_ssize_t, base=Py_ssize_t,
                   size=Py_ssize_t, need=cython.ulonglong, b0=cython.uchar,
                   b1=cython.uchar, short=int, i=Py_ssize_t, buf=bytes,
                   rest=cython.ulonglong)
    cpdef feed(self, bytes data)


@cython.final
cdef class Tunnel:
    cdef public object client, upstream, loop, closing
    cdef public long long route_id
    cdef public dict relays
    cdef public FrameTracker to_client, to_upstream
    cdef public bint client_told, upstream_told

    cpdef from_client(self, bytes data)

    cpdef from_upstream(self, bytes data)

    cpdef _relay(self, bytes data, FrameTracker tracker, object out)
