# cython: language_level=3
"""Lookups made from compiled code, as the compiled data path makes them.

``router._cproxy`` calls ``LabelIndex.lookup_into`` as a C method (it is
cpdef) with a ``Hit`` it keeps, so a Python loop around a lookup measures
Python's call overhead more than the table.  table_bench.py builds this
module on first use and times one call of ``lookups`` over many labels.
"""

from time import perf_counter_ns

from cpython.mem cimport PyMem_Free, PyMem_Malloc

from router._clabels cimport Hit, LabelIndex


def lookups(LabelIndex index, list labels):
    """How many of ``labels`` the index finds, one C call per label."""
    cdef Py_ssize_t found = 0
    cdef bytes label
    cdef Hit hit = Hit()
    for label in labels:
        if index.lookup_into(label, hit):
            found += 1
    return found


def chained_lookups(LabelIndex index, list labels, Py_ssize_t zero=0):
    """``lookups``, each call waiting for the one before to finish.

    Back to back, the processor starts the next lookup's memory reads
    while the last one waits for its own, so ``lookups`` times a stream.
    Here the label to look up next depends on what the last lookup read
    (``zero`` is 0, but the compiler cannot know it): the time per call
    is the whole latency of one lookup, as a request sees it.
    """
    cdef Py_ssize_t found = 0, k = 0, n = len(labels)
    cdef Hit hit = Hit()
    while k < n:
        if index.lookup_into(<bytes>labels[k], hit):
            found += 1
        k += 1 + <Py_ssize_t>(hit.route_id & <unsigned long long>zero)
    return found


def memory_latency_ns(size_t nbytes, size_t steps=2_000_000):
    """Nanoseconds per dependent random read in an array of ``nbytes``.

    A pointer chase through one random cycle (Sattolo's shuffle), so each
    read waits for the one before, as a hash probe waits for its slot: the
    floor under any lookup whose table does not fit in the caches.
    """
    cdef size_t n = nbytes // sizeof(size_t)
    cdef size_t *a = <size_t *>PyMem_Malloc(n * sizeof(size_t))
    cdef size_t i, j, t, _step, p = 0
    cdef unsigned long long x = 88172645463325252ULL
    if a == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            a[i] = i
        i = n - 1
        while i > 0:
            x ^= x << 13
            x ^= x >> 7
            x ^= x << 17
            j = x % i
            t = a[i]
            a[i] = a[j]
            a[j] = t
            i -= 1
        start = perf_counter_ns()
        for _step in range(steps):
            p = a[p]
        elapsed = perf_counter_ns() - start
    finally:
        PyMem_Free(a)
    # The chase's end is used, so the compiler cannot drop the loop.
    if p >= n:
        raise AssertionError("the chase left the array")
    return elapsed / steps
