"""A folder of safetensors weights, as ``save_pretrained`` or :func:`dynapipe.save_checkpoint` writes it.

``model.safetensors``, or shards listed by ``model.safetensors.index.json``. The folder is checked against
the model as a whole, from the shards' headers alone (each tensor's name, shape and dtype; each shard
present and as long as its header says), before any tensor is copied: every rank checks the same, so every
rank raises the same error, at once. A rank then opens only the shards that hold its own tensors and reads
only those tensors, one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["WeightsFolder", "model_names"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def model_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter and persistent buffer (``state_dict`` keys), by ``id``; a tied
    weight has several, the first being the one a checkpoint stores."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    return names


@dataclass(frozen=True)
class WeightsFolder:
    path: str
    file_of: dict[str, str]  # tensor name -> shard file name

    @classmethod
    def open(cls, path: str | os.PathLike) -> WeightsFolder:
        path = os.path.realpath(os.fspath(path))
        if not os.path.isdir(path):
            raise ConfigError(
                f"checkpoint folder {path!r} does not exist; give a folder written by save_pretrained() or "
                "dynapipe.save_checkpoint()"
            )
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    return cls(path, dict(json.load(f)["weight_map"]))
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(
                    f"checkpoint index {index} cannot be read ({type(err).__name__}: {err}): it is truncated or "
                    "damaged; copy the folder again or load another checkpoint"
                ) from None
        if os.path.exists(os.path.join(path, SINGLE)):
            return cls(path, dict.fromkeys(_read_header(os.path.join(path, SINGLE), []), SINGLE))
        raise ConfigError(
            f"checkpoint folder {path!r} has neither {INDEX} nor {SINGLE}: only safetensors weights are read; "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )

    def check(self, model: torch.nn.Module) -> None:
        """Every parameter and persistent buffer of ``model`` is stored once, with its shape; nothing else is."""
        _check_architecture(self.path, model)
        by_id = model_names(model)
        tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
        expected = {n for names in by_id.values() for n in names}
        unexpected = sorted(set(self.file_of) - expected)
        if unexpected:
            raise ConfigError(
                f"checkpoint {self.path!r} holds {len(unexpected)} tensor(s) that {type(model).__name__} does not "
                f"have, e.g. {unexpected[0]!r} in {os.path.join(self.path, self.file_of[unexpected[0]])}: it "
                "belongs to another model or architecture; load the checkpoint written for this model"
            )
        stored = self._headers()
        for key, names in by_id.items():
            found = [n for n in names if n in self.file_of]
            if not found:
                raise ConfigError(
                    f"checkpoint {self.path!r} has no tensor {names[0]!r} "
                    f"({type(model).__name__} needs it); it was written for another model or is incomplete"
                )
            t = tensors[key]
            for n in found:
                dtype, shape = stored[n]
                if shape != tuple(t.shape) or dtype != _DTYPES.get(t.dtype):
                    raise ConfigError(
                        f"tensor {n!r} in {os.path.join(self.path, self.file_of[n])} is {dtype} of shape {shape}, "
                        f"but the model's is {t.dtype} of shape {tuple(t.shape)}; the checkpoint was written for "
                        "another configuration (or dtype: build the model in the checkpoint's dtype)"
                    )

    def _headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each stored tensor's dtype and shape, from the shards' headers, after checking that every shard
        is there and complete: read before any tensor is copied, on every rank, for every rank's shards."""
        names_in: dict[str, list[str]] = {}
        for name, file in sorted(self.file_of.items()):
            names_in.setdefault(file, []).append(name)
        out = {}
        for file, names in names_in.items():
            header = _read_header(os.path.join(self.path, file), names)
            out.update({k: (h["dtype"], tuple(h["shape"])) for k, h in header.items()})
        return out

    def read_into(self, targets: list[tuple[list[str], torch.Tensor]]) -> None:
        """Copy each stored tensor into its target (names as from :func:`model_names`; shapes and dtypes
        as :meth:`check` found them); opens only the shards these tensors are in."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for names, target in targets:
            name = next(n for n in names if n in self.file_of)
            by_file.setdefault(self.file_of[name], []).append((name, target))
        for file, items in sorted(by_file.items()):
            with safe_open(os.path.join(self.path, file), "pt") as f:
                for name, target in items:
                    with torch.no_grad():
                        target.copy_(f.get_tensor(name))


# each dtype's name in a safetensors header
_DTYPES = {
    getattr(torch, t): n
    for n, t in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ]
}  # fmt: skip


def _read_header(file: str, names: list[str]) -> dict[str, dict]:
    """A shard's header (tensor name -> dtype, shape, byte range), naming the file and a tensor when the file
    is missing, cut short, or lacks a tensor the index puts in it."""
    holds = f"{names[0]!r} and {len(names) - 1} more tensor(s)" if names else "the model's tensors"
    fix = "the folder is incomplete or was cut while copied: copy it again or load another checkpoint"
    if not os.path.exists(file):
        raise ConfigError(f"checkpoint file {file} is missing; the index puts {holds} in it: {fix}")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:  # not JSON, or not UTF-8
            header = None
    if not isinstance(header, dict):
        raise ConfigError(
            f"checkpoint file {file} ({size} bytes) has no complete header; it holds {holds}: {fix}"
        )
    header.pop("__metadata__", None)
    for name, h in sorted(header.items(), key=lambda item: item[1]["data_offsets"][1]):
        if 8 + length + h["data_offsets"][1] > size:
            raise ConfigError(
                f"checkpoint file {file} is truncated ({size} bytes): tensor {name!r} is cut; {fix}"
            )
    absent = [n for n in names if n not in header]
    if absent:
        raise ConfigError(
            f"checkpoint file {file} has no tensor {absent[0]!r}, which the index puts in it; {fix}"
        )
    return header


def _check_architecture(path: str, model: torch.nn.Module) -> None:
    config = os.path.join(path, "config.json")
    if not (hasattr(model, "config") and os.path.exists(config)):
        return
    with open(config) as f:
        architectures = json.load(f).get("architectures") or []
    if architectures and type(model).__name__ not in architectures:
        raise ConfigError(
            f"checkpoint {path!r} was saved from {architectures[0]}, but the model is {type(model).__name__}; "
            f"build a {architectures[0]} or load a {type(model).__name__} checkpoint"
        )
