# C types for router/_proxy_py.py, compiled in Cython's pure-Python mode as
# router._cproxy.
#
# The protocols are written once, in plain Python, and that file is the pure
# twin.  This file turns its classes into final extension types with typed
# fields, and its per-request methods into C calls: on a kept-alive request
# the Python version spends most of its time on attribute lookups and frame
# set-up, not on work.  The methods declared here are cpdef so that the
# slow paths, written without types, can still call them.

cimport cython

from router._chttp cimport Codec, RequestHead, ResponseHead
from router._clabels cimport Hit, LabelIndex
from router._ctunnel cimport Tunnel as CTunnel


cdef int HEAD, ACTIVE, TUNNEL, CLOSED, LINGER
cdef int DL_NONE, DL_IDLE, DL_HEAD, DL_RESPONSE, DL_GRACE, DL_TUNNEL_IDLE, DL_LINGER
cdef int BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE
cdef int FLAG_PRESERVE_HOST
cdef Py_ssize_t MAX_IDLE_PER_POOL
cdef Codec codec

cdef class ClientConnection
cdef class UpstreamConnection


@cython.final
cdef class Stats:
    cdef public Py_ssize_t splices, connections, requests, errors, revoked
    cdef public Py_ssize_t upstream_connects


@cython.final
cdef class Proxy:
    cdef public object config, reserved_ports, table, loop, now, domains
    cdef public object trusted, fallback, _sweeper, own_sockets
    cdef public LabelIndex index
    cdef public Hit hit
    cdef public list sandbox_names, sandbox_hosts, targets
    cdef public bytearray sandbox_stopped
    cdef public bint internal, access_log, draining
    cdef public Py_ssize_t max_head
    cdef public long long max_body
    cdef public double tunnel_idle, head_timeout, idle_timeout
    cdef public double response_timeout, grace
    cdef public dict pools, local_hosts, by_route, route_pools
    cdef public Py_ssize_t pool_epoch
    cdef public set clients
    cdef public Stats stats
    cdef public object repeats

    cpdef list pool_of(self, object key)

    cpdef UpstreamConnection take(self, list pool)

    @cython.locals(pool=list)
    cpdef give_back(self, UpstreamConnection up)


@cython.final
cdef class ClientConnection:
    cdef public Proxy proxy
    cdef public UpstreamConnection upstream
    cdef public RequestHead head
    cdef public object transport, write, peer, forwarded, forwarded_for, sandbox
    cdef public bytes forwarded_host, forwarded_block, seen_host
    cdef public object seen_label
    cdef public tuple sent_to
    cdef public Py_ssize_t sent_epoch
    cdef public bytes buf
    cdef public object req_framer, label
    cdef public CTunnel tunnel
    cdef public list pending_body
    cdef public int state, deadline_kind, req_framing, status
    cdef public double deadline, started, last_active
    cdef public long long route_id, listed_route, req_remaining, sent, serial
    cdef public bint req_done, paused, keep_alive, body_unread
    cdef public bint reading, read_again

    @cython.locals(tunnel=CTunnel)
    cpdef data_received(self, object data)

    @cython.locals(proxy=Proxy, head=RequestHead, hit=Hit,
                   route_id=cython.longlong, sandbox_slot=Py_ssize_t, port=int,
                   target_slot=Py_ssize_t, end=Py_ssize_t,
                   flags=int, conns=set, sent_to=tuple, host=bytes)
    cpdef _read_request(self)

    cpdef _next_request(self)

    @cython.locals(head=RequestHead, proxy=Proxy, up=UpstreamConnection)
    cpdef _dispatch(self, object key, object host, list pool=*)

    @cython.locals(host=bytes)
    cpdef bytes _forwarded_for(self, RequestHead head)

    @cython.locals(n=cython.longlong, framing=int, up=UpstreamConnection)
    cpdef _request_body(self, object data)

    cpdef response_started(self, int status)

    @cython.locals(up=UpstreamConnection)
    cpdef response_done(self, bint reusable)

    cpdef _maybe_finish(self)

    cpdef _request_finished(self)

    cpdef _unregister(self)

    @cython.locals(rid=cython.longlong, conns=set)
    cpdef _unlist(self)

    cpdef _arm(self, int kind, double seconds)

    cpdef _arm_from_sweep(self, int kind, double seconds)

    cpdef _pause_client(self)

    cpdef _resume_client(self)

    cpdef _close(self, bint abort=*, bint linger=*)


@cython.final
cdef class UpstreamConnection:
    cdef public Proxy proxy
    cdef public ClientConnection client
    cdef public object key, transport, write, is_closing, framer, sent_head, relay
    cdef public list pool
    cdef public Py_ssize_t pool_epoch
    cdef public bytes buf
    cdef public int state, framing
    cdef public long long remaining, uses
    cdef public bint head_request, dechunk, reusable, got_bytes
    cdef public double idle_since

    cpdef start(self, ClientConnection client, object head, bint head_request)

    @cython.locals(client=ClientConnection)
    cpdef data_received(self, object data)

    @cython.locals(head=ResponseHead, request=RequestHead, status=int,
                   close=bint, n=cython.longlong, end=Py_ssize_t, buf=bytes,
                   given=Py_ssize_t, out=bytes)
    cpdef _head(self, ClientConnection client)

    @cython.locals(n=cython.longlong, framing=int)
    cpdef _body(self, ClientConnection client, object data)

    cpdef _done(self, ClientConnection client)
