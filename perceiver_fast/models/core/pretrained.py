"""Saving and loading our models as a directory: ``config.json`` + ``model.safetensors``.

``config.json`` is ``{"format": "perceiver_fast", "model_class": ..., "save_id": ..., "config": {...}}`` where
``save_id`` is also in the weights' metadata (see ``save_pretrained``; absent from both in directories saved before
it) and ``config`` holds every field of the model's config dataclass, nested ones included. Every version of this
module has written every field (``dataclasses.asdict``), and no config field has been added or removed since the first
one, so a file of our format that lacks a field is incomplete and loading it raises instead of giving the field its
default: the default may not be what the weights were trained with (``num_self_attention_rotary_layers`` changes
outputs, not weight shapes). A field added in a later version needs an explicit rule here for the files written before
it (they are recognisable: they lack exactly that field).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from perceiver_fast.durable import replace_atomically, sync
from perceiver_fast.models.core import perceiver_io_artifacts
from perceiver_fast.models.core.loading import (
    CONFIG_FILE,
    build_config,
    check_load_dtype,
    load_state_strict,
    read_json_object,
    read_safetensors,
    set_loaded_dtype,
)
from perceiver_fast.models.core.registry import model_type_of

__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "PretrainedMixin"]

WEIGHTS_FILE = "model.safetensors"
FORMAT = "perceiver_fast"
# One random id per save_pretrained, in config.json and in the weights' safetensors metadata. Directories saved before
# it existed have it in neither file, and still load.
SAVE_ID_KEY = "save_id"


def _saved_id(weights_path: Path) -> str | None:
    """The save id in a readable safetensors file's metadata, or None (saved before ids, or by another tool)."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        return (f.metadata() or {}).get(SAVE_ID_KEY)


def _check_one_save(meta: Mapping[str, Any], config_path: Path, weights_path: Path) -> None:
    """Raise if ``config.json`` and the weights come from two saves (see :meth:`PretrainedMixin.save_pretrained`).

    Weights with an id next to a config without one are a new save over an old directory that was cut off before its
    config; the reverse (a config with an id, weights without) is weights replaced by hand or by an older tool, and is
    left to the key and shape checks.
    """
    config_id, weights_id = meta.get(SAVE_ID_KEY), _saved_id(weights_path)
    if weights_id is None or config_id == weights_id:
        return
    ids = f"save ids {config_id} and {weights_id}" if config_id is not None else "only the weights have a save id"
    raise ValueError(
        f"{config_path} and {weights_path} were written by two different saves ({ids}): a save_pretrained into "
        f"{config_path.parent} was interrupted between the two files, so the config may not describe these weights; "
        "save the model again"
    )


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``Model.from_pretrained(dir)`` for models built from one config dataclass.

    Subclasses set ``config_class`` and keep their config in ``self.config``.
    """

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if missing).

        Each file goes to a temp file beside it, is forced to disk and renamed over the old one, so a save that is
        interrupted never leaves a torn file. Both files record one random save id: a save killed between the two
        renames (new weights, old config) makes :meth:`from_pretrained` raise instead of loading weights under a
        config that may not describe them (``num_self_attention_rotary_layers`` changes outputs, not shapes).
        """
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_id = secrets.token_hex(16)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {
            "format": FORMAT,
            "model_class": _format_class_name(type(self)),
            SAVE_ID_KEY: save_id,
            "config": dataclasses.asdict(self.config),
        }
        # Weights first: until the config is replaced too, its save id (or the lack of one) disagrees with theirs.
        weights_meta = {"format": "pt", SAVE_ID_KEY: save_id}
        replace_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata=weights_meta))
        replace_atomically(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        sync(directory)
        return directory

    @classmethod
    def config_from_dict(cls, values: Mapping[str, Any], source: str = "config", every_field: bool = False) -> Any:
        """Rebuild the config from its JSON (or pickled) form, checking each field against the dataclass.

        Args:
            values: field name -> value.
            source: what ``values`` were read from, named in errors.
            every_field: a missing field is an error (our own files hold every field); otherwise it takes its
                default (perceiver-io's files: their defaults are ours).

        Raises:
            ValueError: naming ``source``, unknown and missing fields, and each field of a wrong type with the
                type expected and the value given (see :func:`perceiver_fast.models.core.loading.build_config`).
        """
        return build_config(cls.config_class, values, source, every_field=every_field)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"
    ) -> Any:
        """Load a model saved by :meth:`save_pretrained` (strict: every key must match), in eval mode.

        ``dtype="auto"`` gives the model back in the dtypes it was saved in (a bf16 model comes back in bf16, tensor
        by tensor where they were mixed); a ``torch.dtype`` casts its floating-point tensors to that one.

        Also reads a directory written by perceiver-io's Hugging Face ``save_pretrained`` for this model type (a
        directory of another type raises ``ValueError`` naming both), with the same ``dtype`` rule.

        Raises:
            FileNotFoundError: no ``config.json``, or no ``model.safetensors`` next to it (the file is named).
            ValueError: ``config.json`` and ``model.safetensors`` written by two different saves (their save ids
                differ, or only the weights have one): a ``save_pretrained`` was interrupted between them.
            ValueError: naming the file at fault: ``config.json`` that is not a JSON object, not our format, of
                another model class, or whose config has unknown, missing or mistyped fields; weights that are
                truncated or corrupt, or whose keys, shapes or kinds (floating-point or integer) don't match the
                config (keys and config fields named); a ``dtype`` that is neither ``"auto"`` nor a floating-point
                ``torch.dtype``.
        """
        check_load_dtype(dtype)
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        meta = read_json_object(config_path)
        if meta.get("format") != FORMAT and "model_config" in meta:  # perceiver-io's Hugging Face format
            return cls._from_perceiver_io_pretrained(directory, map_location, dtype)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{config_path} was not written by perceiver_fast's save_pretrained")
        if meta.get("model_class") not in (cls.__name__, _format_class_name(cls)):
            raise ValueError(f"{directory} holds a {meta.get('model_class')}, not a {cls.__name__}")
        config = cls.config_from_dict(meta["config"], source=f"{config_path}'s config", every_field=True)
        model = cls(config)
        weights_path = directory / WEIGHTS_FILE
        weights = read_safetensors(weights_path)
        _check_one_save(meta, config_path, weights_path)
        load_state_strict(model, weights, str(weights_path))
        set_loaded_dtype(model, weights, dtype)
        return model.to(map_location).eval()

    # --- perceiver-io's artifacts: read below the model classes, which pass themselves as the class to build

    @classmethod
    def _from_perceiver_io_pretrained(
        cls, directory: Path, map_location: str | torch.device, dtype: torch.dtype | str = "auto"
    ) -> Any:
        """``from_pretrained`` on a directory written by perceiver-io's Hugging Face ``save_pretrained``."""
        return perceiver_io_artifacts.load_perceiver_io_pretrained(directory, cls, map_location, dtype)

    @classmethod
    def from_lightning_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"
    ) -> Any:
        """Load a Lightning checkpoint saved by perceiver-io's ``Lit*`` module of this model type, without
        perceiver-io installed, in the dtypes it was saved in (``dtype="auto"``) or cast to ``dtype``; a checkpoint
        of another model type raises ``ValueError`` naming both (see
        :func:`perceiver_fast.models.artifacts.from_lightning_checkpoint`)."""
        return perceiver_io_artifacts.from_lightning_checkpoint(path, cls, map_location, dtype)


def _format_class_name(model_class: type) -> str:
    """The ``model_class`` our format records: the registered task class a model is or derives from, so that a
    subclass saves files every loader reads (the generic one included) and loads its base's, as it does
    perceiver-io's. A class of no registered type (a test's own model) records its own name."""
    registered = model_type_of(model_class)
    return (registered.model_class if registered is not None else model_class).__name__
