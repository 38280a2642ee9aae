# cython: language_level=3
"""Lookups made from compiled code, as the compiled data path makes them.

``router._cproxy`` calls ``LabelIndex.lookup`` as a C method (it is cpdef),
so a Python loop around ``lookup`` measures Python's call overhead more than
the table.  table_bench.py builds this module on first use and times one
call of ``lookups`` over many labels.
"""

from router._clabels cimport LabelIndex


def lookups(LabelIndex index, list labels):
    """How many of ``labels`` the index finds, one C call per label."""
    cdef Py_ssize_t found = 0
    cdef bytes label
    for label in labels:
        if index.lookup(label) is not None:
            found += 1
    return found
