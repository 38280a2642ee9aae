"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

# The suite runs against the work tree, with the compiled twins built in
# place (``setup.py build_ext --inplace``), not against an installed copy.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPILED_LABELS = "router._clabels"
PURE_LABELS = "router._labels_py"


def _import_twin(name: str) -> ModuleType:
    """Import a label twin; a missing compiled one fails the test.

    Skipping instead would let a broken build pass as a green run; only
    ``EDGE_ROUTER_PURE=1`` (the run meant to go without it) allows a skip.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        from router.speedups import FORCED_PURE

        if FORCED_PURE and name == COMPILED_LABELS:
            pytest.skip(f"{name} not built ({exc})")
        pytest.fail(
            f"{name} cannot be imported ({exc}); build it with "
            "`python setup.py build_ext --inplace` or set EDGE_ROUTER_PURE=1"
        )


@pytest.fixture(params=[COMPILED_LABELS, PURE_LABELS], ids=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    """Each label module in turn: the compiled twin, then the pure one."""
    return _import_twin(request.param)


@pytest.fixture(scope="session")
def twins() -> tuple[ModuleType, ModuleType]:
    """Both label modules at once (compiled, pure), for differential tests."""
    return _import_twin(COMPILED_LABELS), _import_twin(PURE_LABELS)
