"""Checkpoint files written so that a crash never leaves half of one: fsync'd JSON and folders, and JSON
read back with an error that names the file."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ConfigError

__all__ = ["fsync_dir", "read_json", "write_json"]


def read_json(file: str) -> Any:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint file {file} cannot be read ({err}): it is missing, truncated or damaged; copy the "
            "folder again or load another checkpoint"
        ) from None


def write_json(file: str, value: Any) -> None:
    with open(file, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
