"""Imports the benchmark scripts (``benchmarks/`` is a folder of scripts, not a package) for their smoke tests."""

import importlib
import os
import sys
from types import ModuleType

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def load(name: str) -> ModuleType:
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)
