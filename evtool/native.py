"""The C loops (evtool/_fastlines.c), or None: where the package was built without a C compiler,
or with EVTOOL_PURE_PYTHON set. Each caller keeps its Python loop for that case, with the same
results (the tests run both)."""

from __future__ import annotations

import os
from types import ModuleType

loops: ModuleType | None
try:
    from . import _fastlines as loops
except ImportError:  # built without a compiler: the Python loops do it all
    loops = None
if os.environ.get("EVTOOL_PURE_PYTHON"):
    loops = None
