"""What the benchmark scripts share: stand-ins for packages that a code path imports but never
calls (the GPU machine's python3 lacks them), and timing on the device's timeline.

Needs only the standard library and torch.
"""

import importlib.abc
import importlib.util
import platform
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Stand-ins for packages that are imported but not used
# ----------------------------------------------------------------------------------------------


class _Absent:
    """A name in a missing package: calling it raises ImportError; its attributes are more of
    the same, so module-level references (type hints, aliases) still load."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not installed (a benchmark's stand-in)")

    def __repr__(self):
        return f"<stand-in for {self._name}>"


class _Missing(types.ModuleType):
    """Stands in for a missing package: every name in it is an _Absent."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")


class _MissingFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: answers only for `packages` that no real finder found, and notes
    which of them it stood in for in `used`."""

    def __init__(self, packages):
        self.packages = set(packages)
        self.used = set()

    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in self.packages:
            self.used.add(top)
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Missing(spec.name)

    def exec_module(self, module):
        pass


@contextmanager
def stand_ins(*packages):
    """Within the block, importing one of `packages` (or a module in it) that is not installed
    gives a stand-in whose every name raises ImportError when called; installed packages import
    as usual. Modules imported within keep the stand-ins they hold; after the block, importing
    such a package fails as it would have. Yields the finder: its `used` names the packages
    stood in for."""
    finder = _MissingFinder(packages)
    sys.meta_path.append(finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name, module in sys.modules.items() if isinstance(module, _Missing)]:
            del sys.modules[name]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Clock:
    """Timestamps on the device's timeline: CUDA events on cuda, time.perf_counter on cpu."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end):
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_calls(run, clock, n):
    """Times (ms) of n calls of run(), each started on an idle device, and the last call's
    output."""
    times = []
    for _ in range(n):
        clock.synchronize()
        start = clock.mark()
        output = run()
        end = clock.mark()
        clock.synchronize()
        times.append(clock.elapsed_ms(start, end))
    return times, output


def device_name(device):
    """The GPU's name on cuda, the CPU's model name on cpu."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()
