"""Choose the compiled twins or the pure-Python ones, once, at import.

Every module in ``_speedups/router/`` is built as ``router._c<name>`` and has a
pure-Python twin ``router._<name>_py`` with the same behaviour.  The rest of
the package imports the twins only through this module, so one switch decides
for all of them:

* ``EDGE_ROUTER_PURE=1`` forces the pure twins (tests run both ways);
* otherwise the compiled modules are used, and if any of them cannot be
  imported the pure twins are used for all, with the reason kept in
  ``FALLBACK_REASON`` so that startup can say it once.

Type checkers always see the pure twins.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["COMPILED", "FALLBACK_REASON", "FORCED_PURE", "describe", "http", "labels"]

FORCED_PURE = os.environ.get("EDGE_ROUTER_PURE", "") not in ("", "0")
FALLBACK_REASON: str | None = None

if TYPE_CHECKING:
    from . import _http_py as http
    from . import _labels_py as labels
else:

    def _load() -> tuple[ModuleType, ModuleType, bool]:
        global FALLBACK_REASON
        if not FORCED_PURE:
            try:
                from . import _chttp, _clabels
            except ImportError as exc:
                FALLBACK_REASON = str(exc)
            else:
                return _clabels, _chttp, True
        from . import _http_py, _labels_py

        return _labels_py, _http_py, False

    labels, http, COMPILED = _load()

if TYPE_CHECKING:
    COMPILED: bool


def describe() -> str:
    """One line for ``--version`` and the startup log."""
    if COMPILED:
        return "compiled hot path (Cython)"
    if FORCED_PURE:
        return "pure-Python twins (forced by EDGE_ROUTER_PURE)"
    return f"pure-Python twins (compiled modules unavailable: {FALLBACK_REASON})"
