"""The one compiled part of evtool, the processor's line loop (evtool/_fastlines.c); everything
else is declared in pyproject.toml. Optional: where it cannot be built (no C compiler, no Python
headers), the install goes on without it and the processor runs its Python loops, with the
same results (parser._sum_native)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("evtool._fastlines", ["evtool/_fastlines.c"], optional=True,
                             extra_compile_args=["-O3"])])
