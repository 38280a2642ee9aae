"""Choose the compiled twins or the pure-Python ones, once, at import.

Every compiled module ``router._c<name>`` has a pure-Python twin
``router._<name>_py`` with the same behaviour:

* ``labels`` and ``http`` are written twice: ``_speedups/router/_c<name>.pyx``
  and the pure module;
* ``proxy`` (the connection protocols) and ``tunnel`` (WebSocket frame
  tracking) are written once, as plain Python in ``router/_<name>_py.py``,
  and compiled by Cython in pure-Python mode with the C types of
  ``_speedups/router/_c<name>.pxd``.

The rest of the package imports the twins only through this module, so one
switch decides for all of them:

* ``EDGE_ROUTER_PURE=1`` forces the pure twins (tests run both ways);
* otherwise the compiled modules are used, and if any of them cannot be
  imported the pure twins are used for all, with the reason kept in
  ``FALLBACK_REASON`` so that startup can say it once.  Mixing is never
  done: the compiled ``proxy`` is typed against the compiled heads.

Type checkers always see the pure twins.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "COMPILED",
    "FALLBACK_REASON",
    "FORCED_PURE",
    "describe",
    "http",
    "labels",
    "proxy",
    "tunnel",
]

# The spellings of the other boolean settings (router.config).
FORCED_PURE = os.environ.get("EDGE_ROUTER_PURE", "").strip().lower() not in (
    "",
    "0",
    "false",
    "no",
    "off",
)
FALLBACK_REASON: str | None = None

if TYPE_CHECKING:
    from . import _http_py as http
    from . import _labels_py as labels
    from . import _proxy_py as proxy
    from . import _tunnel_py as tunnel

    COMPILED: bool
else:
    import importlib
    import importlib.util

    def _compiled() -> bool:
        global FALLBACK_REASON
        try:
            from . import _chttp, _clabels  # noqa: F401
        except ImportError as exc:
            FALLBACK_REASON = str(exc)
            return False
        for name in ("router._cproxy", "router._ctunnel"):
            if importlib.util.find_spec(name) is None:
                FALLBACK_REASON = f"{name} is not built"
                return False
        return True

    COMPILED = not FORCED_PURE and _compiled()

    def _twin(name: str) -> ModuleType:
        module = f"._c{name}" if COMPILED else f"._{name}_py"
        return importlib.import_module(module, __package__)

    labels = _twin("labels")
    http = _twin("http")

    def __getattr__(name: str) -> ModuleType:
        # ``proxy`` and ``tunnel`` are loaded on first use: ``proxy`` imports
        # the route table, which imports this module for ``labels``.
        if name not in ("proxy", "tunnel"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module = globals()[name] = _twin(name)
        return module


def describe() -> str:
    """One line for ``--version`` and the startup log."""
    if COMPILED:
        return "compiled hot path (Cython)"
    if FORCED_PURE:
        return "pure-Python twins (forced by EDGE_ROUTER_PURE)"
    return f"pure-Python twins (compiled modules unavailable: {FALLBACK_REASON})"
