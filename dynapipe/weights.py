"""A folder of safetensors weights, as ``save_pretrained`` or :func:`dynapipe.save_checkpoint` writes it.

``model.safetensors``, or shards listed by ``model.safetensors.index.json``. The folder is checked against
the model as a whole (every rank checks the same, so every rank raises the same error, at once), but a
rank then opens only the shards that hold its own tensors and reads only those tensors, one at a time.
"""

from __future__ import annotations

import json
import os
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
            with open(index) as f:
                return cls(path, dict(json.load(f)["weight_map"]))
        if os.path.exists(os.path.join(path, SINGLE)):
            from safetensors import safe_open

            with safe_open(os.path.join(path, SINGLE), "pt") as f:
                return cls(path, dict.fromkeys(f.keys(), SINGLE))
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
                f"have, e.g. {unexpected[0]!r} in {self.file_of[unexpected[0]]}: it belongs to another model or "
                "architecture; load the checkpoint written for this model"
            )
        shapes = self._shapes()
        for key, names in by_id.items():
            stored = [n for n in names if n in self.file_of]
            if not stored:
                raise ConfigError(
                    f"checkpoint {self.path!r} has no tensor {names[0]!r} "
                    f"({type(model).__name__} needs it); it was written for another model or is incomplete"
                )
            shape = tuple(tensors[key].shape)
            for n in stored:
                if shapes[n] != shape:
                    raise ConfigError(
                        f"tensor {n!r} in {os.path.join(self.path, self.file_of[n])} has shape {shapes[n]}, but "
                        f"the model's has {shape}; the checkpoint was written for another configuration"
                    )

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        shapes = {}
        for file in sorted(set(self.file_of.values())):
            with safe_open(os.path.join(self.path, file), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return shapes

    def read_into(self, targets: list[tuple[list[str], torch.Tensor]]) -> None:
        """Copy each stored tensor into its target (names as from :func:`model_names`), converting its
        dtype; opens only the shards these tensors are in."""
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
