"""Workloads by name: the built-in benchmarks, those other packages register under the entry-point
group ``mode.workloads`` (``name = "package.module:FACTORY"``, a ``WorkloadFactory``), and the
local-model workload that ``--model`` selects."""
from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from .protocol import WorkloadFactory

ENTRY_POINT_GROUP = "mode.workloads"
BUILT_IN = {"digits": "mode.workloads.digits:WORKLOAD"}
LOCAL_MODEL = "mode.workloads.hf_model:WORKLOAD"


def load_factory(target: str) -> WorkloadFactory:
    """The ``WorkloadFactory`` named by ``module:attribute``."""
    module_name, _, attribute = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(factory, WorkloadFactory):
        raise TypeError(f"workload {target}: expected a mode.workloads.WorkloadFactory, got {type(factory).__name__}")
    return factory


@functools.cache
def benchmarks() -> dict[str, WorkloadFactory]:
    """The workloads ``--benchmark NAME`` selects: built-ins first, then the entry points in name order."""
    found = {name: load_factory(target) for name, target in BUILT_IN.items()}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in found:
            raise ValueError(f"entry point {entry.value} of group {ENTRY_POINT_GROUP}: the workload name "
                             f"{entry.name!r} is taken")
        found[entry.name] = load_factory(entry.value)
    return found


def local_model() -> WorkloadFactory:
    """The workload of ``--model DIR``."""
    return load_factory(LOCAL_MODEL)
