"""Build the compiled hot path; a failed compile fails the install (no silent slow fallback).

ext/_hotpath.pyx is the one extension module; it includes ext/<concept>.pyx and cimports
ext/cbuf.pxd, which cythonize tracks as its dependencies.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "acm_module._hotpath",
        sources=["ext/_hotpath.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
