"""Saving and loading our models as a directory: ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "perceiver_fast"


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``Model.from_pretrained(dir)`` for models built from one config dataclass.

    Subclasses set ``config_class`` and keep their config in ``self.config``.
    """

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if missing)."""
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model_class": type(self).__name__, "config": dataclasses.asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> Any:
        """Rebuild the config from its JSON form (override for nested configs)."""
        return cls.config_class(**values)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
        """Load a model saved by :meth:`save_pretrained` (strict: every key must match), in eval mode.

        Also reads a directory written by perceiver-io's Hugging Face ``save_pretrained`` for this model type (a
        directory of another type raises ``ValueError`` naming both).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a saved model directory")
        meta = json.loads(config_path.read_text())
        if meta.get("format") != FORMAT and "model_config" in meta:  # perceiver-io's Hugging Face format
            return cls._from_perceiver_io_pretrained(directory, map_location)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{config_path} was not written by perceiver_fast's save_pretrained")
        if meta.get("model_class") != cls.__name__:
            raise ValueError(f"{directory} holds a {meta.get('model_class')}, not a {cls.__name__}")
        model = cls(cls.config_from_dict(meta["config"]))
        state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()

    # --- perceiver-io artifacts (implemented in perceiver_fast.models.artifacts, imported late: it imports the
    # --- model classes, which import this module)

    @classmethod
    def _from_perceiver_io_pretrained(cls, directory: Path, map_location: str | torch.device) -> Any:
        """``from_pretrained`` on a directory written by perceiver-io's Hugging Face ``save_pretrained``."""
        from perceiver_fast.models.artifacts import load_perceiver_io_pretrained

        return load_perceiver_io_pretrained(directory, model_class=cls, map_location=map_location)

    @classmethod
    def from_lightning_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Any:
        """Load a Lightning checkpoint saved by perceiver-io's ``Lit*`` module of this model type, without
        perceiver-io installed; a checkpoint of another model type raises ``ValueError`` naming both (see
        :func:`perceiver_fast.models.artifacts.from_lightning_checkpoint`)."""
        from perceiver_fast.models.artifacts import from_lightning_checkpoint

        return from_lightning_checkpoint(path, model_class=cls, map_location=map_location)
