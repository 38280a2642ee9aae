"""Build the compiled twins in ``_speedups/`` as extension modules of ``router``.

Each ``_speedups/router/_cX.pyx`` (with its ``.pxd``) becomes the module
``router._cX``; its pure-Python twin is ``router/_X_py.py``.  A module without
a ``.pyx`` is compiled from its pure twin in Cython's pure-Python mode, with
the C types of ``_speedups/router/_cX.pxd``.  The declarations sit under
``_speedups/router/`` so that Cython finds each module's ``.pxd`` by the
module's full name.  If the compiler is missing the install still succeeds and
the package runs on the pure twins (``router.speedups`` says which are in use).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ["labels", "http", "tunnel", "proxy"]


class OptionalBuildExt(build_ext):
    """Let a failed compile fall back to the pure twins instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        print(
            f"edge-router: compiled hot path not built ({exc}); "
            "the pure-Python twins will be used",
            file=sys.stderr,
        )


def source(name: str) -> str:
    pyx = f"_speedups/router/_c{name}.pyx"
    return pyx if os.path.exists(pyx) else f"router/_{name}_py.py"


def extensions() -> list[Extension]:
    if os.environ.get("EDGE_ROUTER_PURE_BUILD"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        OptionalBuildExt._warn(ImportError("Cython is not installed"))
        return []
    exts = [
        Extension(
            f"router._c{name}",
            [source(name)],
            # A C helper the module includes: a change to it rebuilds it.
            depends=["_speedups/router/_headscan.h"] if name == "http" else [],
            extra_compile_args=["-O2"],
        )
        for name in MODULES
    ]
    directives = {
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "embedsignature": True,
        # Heads and tables hold C state (offsets, pointers) that must not be
        # copied out or set from a pickle.
        "auto_pickle": False,
    }
    # The pure-mode module keeps Python's semantics (negative indices, index
    # checks): it is the pure twin's very source.  Its annotations are for
    # mypy; its C types come from its .pxd only.
    pure_mode = {
        "embedsignature": True,
        "annotation_typing": False,
        "auto_pickle": False,
    }
    try:
        return [
            built
            for ext in exts
            for built in cythonize(
                [ext],
                include_path=["_speedups"],
                language_level=3,
                compiler_directives=(
                    directives if ext.sources[0].endswith(".pyx") else pure_mode
                ),
            )
        ]
    except Exception as exc:
        OptionalBuildExt._warn(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
