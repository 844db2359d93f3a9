"""Slow tests run only when asked for: ``python -m pytest -m slow`` (any ``-m`` expression that names
``slow``) or ``DYNAPIPE_SLOW=1``. The default run skips them, so its time does not grow with them.

pytest puts this folder on ``sys.path`` (its default "prepend" import mode, and no ``__init__.py``),
which is how test files import ``harness``, ``fixtures`` and ``models``. This file adds ``benchmarks/``
for ``hf_models``, the small HuggingFace configs tests and benchmarks share (spawned workers inherit
``sys.path``).

The pipelines tests build measure this machine's rates (``options["rates"]``, by default) and cache them
per machine: the session keeps that cache in a temporary folder (``XDG_CACHE_HOME``, which spawned ranks
inherit), so that the tests share it and never touch the user's ``~/.cache/dynapipe``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dynapipe-test-cache-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    asked = "slow" in re.findall(r"\w+", config.getoption("markexpr") or "")
    if asked or os.environ.get("DYNAPIPE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `python -m pytest -m slow` or DYNAPIPE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
