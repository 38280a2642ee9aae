# cython: language_level=3
"""Lookups timed from compiled code, as the compiled data path makes them.

``router._cproxy`` calls ``LabelIndex.lookup`` as a C method (it is cpdef),
so a Python loop around ``lookup`` measures Python's call overhead more than
the table.  table_bench.py builds this module on first use.
"""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from router._clabels cimport LabelIndex


cdef double _now():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e9 + ts.tv_nsec


def time_lookups(LabelIndex index, list labels):
    """(ns per lookup, how many were found) for one pass over ``labels``."""
    cdef Py_ssize_t found = 0
    cdef bytes label
    cdef double start = _now()
    for label in labels:
        if index.lookup(label) is not None:
            found += 1
    return (_now() - start) / len(labels), found
