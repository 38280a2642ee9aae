"""Build the compiled twins in ``_speedups/`` as extension modules of ``router``.

Each ``_speedups/router/_cX.pyx`` (with its ``.pxd``) becomes the module
``router._cX``; its pure-Python twin is ``router/_X_py.py``.  The sources sit
under ``_speedups/router/`` so that Cython finds each module's ``.pxd`` by
the module's full name.  If the compiler is missing the install still succeeds and
the package runs on the pure twins (``router.speedups`` says which are in use).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ["labels", "http"]


class OptionalBuildExt(build_ext):
    """Let a failed compile fall back to the pure twins instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        print(
            f"edge-router: compiled hot path not built ({exc}); "
            "the pure-Python twins will be used",
            file=sys.stderr,
        )


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
            [f"_speedups/router/_c{name}.pyx"],
            extra_compile_args=["-O2"],
        )
        for name in MODULES
        if os.path.exists(f"_speedups/router/_c{name}.pyx")
    ]
    try:
        return cythonize(
            exts,
            include_path=["_speedups"],
            language_level=3,
            compiler_directives={
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "embedsignature": True,
            },
        )
    except Exception as exc:  # noqa: BLE001 - a Cython compile error
        OptionalBuildExt._warn(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
