"""Test hook: skew the wall clock that pipeguard's own code reads by ``PIPEGUARD_TEST_CLOCK_SKEW_S``.

Put this directory on ``PYTHONPATH`` and Python imports it at start-up (``site`` imports
``sitecustomize``). From then on every module of the ``pipeguard``, ``node`` and
``coordinator`` packages, and ``logging`` (so log timestamps show it), sees a ``time`` module
whose ``time()`` and ``time_ns()`` are off by the skew; everything else in ``time``
(``monotonic``, ``sleep``, ...) is the real thing.

Why not patch ``time.time`` itself: gRPC's Python layer turns a timeout into an absolute
deadline with ``time.time()`` and its C core compares that with the real clock, so a globally
patched ``time.time`` makes every call expire at once (clock behind) or never (clock ahead).
On a machine whose clock is really skewed both agree, and that is what this keeps. It stands
in for libfaketime, which fresh machines do not have.
"""

import importlib.abc
import logging
import os
import sys
import time
import types

SKEW_S = float(os.environ.get("PIPEGUARD_TEST_CLOCK_SKEW_S", "0") or 0)
PACKAGES = ("pipeguard", "node", "coordinator")


class SkewedTime(types.ModuleType):
    """The ``time`` module with a skewed wall clock."""

    def __init__(self, skew: float):
        super().__init__("time")
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def time_ns(self) -> int:
        return time.time_ns() + int(self.skew * 1e9)

    def __getattr__(self, name):
        return getattr(time, name)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, clock):
        self.inner, self.clock = inner, clock

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def __getattr__(self, name):  # get_code, is_package, ... (runpy asks for them)
        return getattr(self.inner, name)

    def exec_module(self, module):
        self.inner.exec_module(module)
        if getattr(module, "time", None) is time:
            module.time = self.clock


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, clock):
        self.clock = clock

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in PACKAGES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self.clock)
                return spec
        return None


if SKEW_S:
    _clock = SkewedTime(SKEW_S)
    logging.time = _clock
    sys.meta_path.insert(0, _Finder(_clock))
