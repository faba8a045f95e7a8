"""perceiver-io's artifacts as one of our model classes, the class asked for or the one the file's type names.

Two sources (our own format is :mod:`perceiver_fast.models.core.pretrained`'s), one result (our model class, strict on
weights, in eval mode):

- directories written by perceiver-io's Hugging Face wrappers' ``save_pretrained`` (``config.json`` with
  ``model_type``/``architectures`` and the backend config under ``model_config``; weights in ``model.safetensors``,
  sharded safetensors or ``pytorch_model.bin``, keyed ``backend_model.<our key>``),
- Lightning checkpoints (``.ckpt``) of perceiver-io's ``Lit*`` modules: the backend's weights under ``model.`` in
  ``state_dict``, its config in ``hyper_parameters``.

What their ``save_pretrained`` writes (measured with perceiver-io 0.11.0 and transformers 4.44): every key of the
backend model under ``backend_model.``; no tied or shared weight is dropped (the tied token outputs of the CLM and MLM
reuse the embedding in ``forward``, so there is no second tensor to deduplicate); Perceiver AR directories add a
``generation_config.json`` (not needed here). A Lightning checkpoint stores exactly the backend's keys under
``model.`` (their metrics keep no persistent state).

Neither path imports perceiver-io, transformers or Lightning. Their keys and config fields are ours (the models
were built to be state-dict compatible), so loading is: pick our class, rebuild the config, load strict.

This module sits below the task models: their ``from_pretrained`` and ``from_lightning_checkpoint`` call it with
their own class. It finds the class a file's type needs among the registered ones
(:mod:`perceiver_fast.models.core.registry`) and names a type with no registered class in perceiver-io's words, as
the file does. :mod:`perceiver_fast.models.artifacts` imports every task model, so through it every type is known.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import typing
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.core.loading import (
    CONFIG_FILE,
    check_load_dtype,
    load_state_strict,
    read_json_object,
    read_safetensors,
    set_loaded_dtype,
)
from perceiver_fast.models.core.registry import ModelType, model_types

__all__ = [
    "PickledObject",
    "from_lightning_checkpoint",
    "is_perceiver_io_config",
    "load_checkpoint_safely",
    "load_perceiver_io_pretrained",
]


# ----------------------------------------------------------------------------------------------------------------
#  Which of our classes a file's type is
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A model type a file holds: ``model_type`` when a class of ours is registered for it, else ``None`` and the
    type as the file names it (``named``), so that an error can name it all the same."""

    model_type: ModelType | None
    named: str

    def __str__(self) -> str:
        if self.model_type is None:
            return f"perceiver-io {self.named}"
        return f"{self.model_type.model_class.__name__} (perceiver-io {self.model_type.hf_architecture})"


def _found(model_type: ModelType) -> _Found:
    return _Found(model_type, model_type.hf_architecture)


def _known() -> str:
    return ", ".join(t.hf_model_type for t in model_types())


def _resolve_class(candidates: tuple[_Found, ...], requested: type | None, source: str) -> type:
    """Our class to build: the first candidate's, or ``requested`` when it is (a subclass of) a candidate's."""
    if requested is None:
        first = candidates[0]
        if first.model_type is None:
            raise ValueError(f"{source} holds a {first}, for which no model class is registered; known: {_known()}")
        return first.model_type.model_class
    for candidate in candidates:
        if candidate.model_type is not None and issubclass(requested, candidate.model_type.model_class):
            return requested
    found = " or ".join(str(c) for c in candidates)
    raise ValueError(f"{source} holds a {found}, not a {requested.__name__}")


def _build_config(model_class: type, values: Mapping[str, Any], source: str) -> Any:
    """``model_class``'s config from perceiver-io's config fields: a missing field takes perceiver-io's default (ours
    are theirs), an unknown field or a value of the wrong type raises ``ValueError`` naming ``source`` and the
    field."""
    return model_class.config_from_dict(values, source=source)


# ----------------------------------------------------------------------------------------------------------------
#  Error messages
# ----------------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    """The telling part of an error message: for torch's weights-only unpickler, the reason after its preamble
    (which suggests ``weights_only=False``, the unsafe load we avoid on purpose)."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0] if text else type(error).__name__


# torch's weights-only unpickler refusing a global (a class or function the file names). Matched on its message, the
# only place it says so; the identifier pattern keeps a damaged file's garbage from reading as a refused name.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not an allowed global|whose module (\S+) is blocked)")


def _load_error(path: Path, error: Exception, what: str, legacy_format: bool = False) -> ValueError:
    """The ``ValueError`` for a weights-only ``torch.load`` of ``path`` that failed: refused as unsafe, naming the
    global torch refused, or not readable (truncated or corrupt), with torch's reason. ``legacy_format``: the file is
    not a zip archive, so none of its classes could be offered as stand-ins."""
    refused = _REFUSED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused is None:
        return ValueError(f"{path} is not a readable {what} (truncated or corrupt?): {_first_line(error)}")
    name, blocked_module = refused.groups()
    if blocked_module:
        why, advice = f"module {blocked_module} is never allowed", "remove that object from it"
    elif legacy_format:
        why = "the file is in torch's legacy non-zip format, whose classes cannot be read as inert stand-ins"
        advice = "re-save it with a current torch.save (zip format)"
    else:
        why, advice = "it is not allowed", "remove that object from it"
    return ValueError(
        f"{path} was refused as unsafe: it names {name}, which torch's weights-only loader will not import ({why}); "
        f"nothing from the file ran. If you trust the file, {advice}"
    )


# ----------------------------------------------------------------------------------------------------------------
#  Directories written by perceiver-io's Hugging Face wrappers
# ----------------------------------------------------------------------------------------------------------------


def is_perceiver_io_config(meta: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict was written by a perceiver-io Hugging Face wrapper's ``save_pretrained``."""
    return isinstance(meta.get("model_config"), dict) and ("model_type" in meta or "architectures" in meta)


def _hf_found(meta: Mapping[str, Any], source: str, requested: type | None) -> _Found:
    """The type a perceiver-io ``config.json`` names. Unknown to the registry, it is an error when nothing else says
    which class to build, and otherwise described from the file for the error that the requested class gives."""
    model_type, architectures = meta.get("model_type"), meta.get("architectures") or []
    for t in model_types():
        if model_type == t.hf_model_type or (model_type is None and t.hf_architecture in architectures):
            return _found(t)
    described = f"model_type={model_type!r} (architectures={architectures})"
    if requested is None:
        raise ValueError(f"{source} holds perceiver-io {described}; known: {_known()}")
    return _Found(None, described)


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``save_pretrained`` directory: safetensors (single or sharded) or ``pytorch_model.bin``."""

    def load_one(path: Path) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise _load_error(path, e, "weights file") from None

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load_one(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_one(directory / shard))
            return state
    raise FileNotFoundError(f"{directory} has no model.safetensors, pytorch_model.bin or a sharded index of either")


def load_perceiver_io_pretrained(
    directory: str | Path,
    model_class: type | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Load a directory written by a perceiver-io Hugging Face wrapper's ``save_pretrained`` as our model.

    Args:
        directory: holds their ``config.json`` (``model_type``, ``architectures``, ``model_config``) and weights
            (``backend_model.``-prefixed keys).
        model_class: our class expected (or a subclass of it); ``None`` picks it from ``model_type`` among the
            registered classes (all of them once :mod:`perceiver_fast.models.artifacts` is imported). A directory of
            another type raises ``ValueError`` naming both.
        map_location: device for the model.
        dtype: ``"auto"``, the dtypes the file stores the weights in; or a floating-point ``torch.dtype``.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: not a perceiver-io directory, unknown model type, config fields we don't know, or weights that
            don't match the config (missing/unexpected/mis-shaped keys are named, with the config fields at fault).
    """
    check_load_dtype(dtype)
    directory = Path(directory)
    meta = read_json_object(directory / CONFIG_FILE)
    source = str(directory / CONFIG_FILE)
    if not is_perceiver_io_config(meta):
        raise ValueError(f"{source} was not written by a perceiver-io Hugging Face wrapper (no model_config)")
    model_class = _resolve_class((_hf_found(meta, source, model_class),), model_class, str(directory))
    model = model_class(_build_config(model_class, meta["model_config"], f"{source}'s model_config"))
    prefix = "backend_model."
    state = {k.removeprefix(prefix): v for k, v in _read_hf_weights(directory).items()}
    load_state_strict(model, state, str(directory))
    set_loaded_dtype(model, state, dtype)
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------------------------------------------
#  Reading checkpoints without perceiver-io (or any other pickled code)
# ----------------------------------------------------------------------------------------------------------------


class PickledObject:
    """Inert stand-in for a class or function a checkpoint names but we do not import (e.g. perceiver-io's config
    dataclasses). It keeps the pickled state (a dataclass's fields) and constructor arguments as plain data and runs
    no code of the original; ``pickled_path`` says what it stands for."""

    __slots__ = ("__dict__", "pickled_args")
    pickled_path: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.pickled_args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_path} {vars(self)}>"


_STAND_INS: dict[str, type] = {}

# Lightning's hparams dict type (older versions saved hparams as one): rebuilt as a plain OrderedDict.
_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)


def _stand_in(path: str) -> tuple[Any, str]:
    if path in _ATTRIBUTE_DICTS:
        return OrderedDict, path
    if path not in _STAND_INS:
        _STAND_INS[path] = type(f"Pickled[{path}]", (PickledObject,), {"__slots__": (), "pickled_path": path})
    return _STAND_INS[path], path


def _check_zip_records(path: Path) -> None:
    """Verify the CRC-32 of every record of a zip-format checkpoint (torch's reader doesn't: a flipped bit in a
    tensor would load silently). One extra sequential read of the file. Files that aren't zip archives are left to
    ``torch.load`` to judge."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is a damaged zip archive: {_first_line(e)}") from None
    if bad is not None:
        raise ValueError(f"{path} is corrupt: record {bad!r} fails its CRC-32 check")


def load_checkpoint_safely(path: str | Path) -> Any:
    """``torch.load`` a checkpoint with ``weights_only=True``, whatever classes it names, on the CPU.

    Why this way: a Lightning checkpoint of perceiver-io's Perceiver IO modules pickles their config dataclasses
    (``perceiver.model.text.common.backend.TextEncoderConfig`` and friends) into ``hyper_parameters``. Plain
    ``torch.load`` would import perceiver-io and may run any code the file names (``weights_only=False``); a
    ``weights_only`` load refuses such classes. We list the classes the file names without unpickling it
    (``torch.serialization.get_unsafe_globals_in_checkpoint``, a static scan) and allow each one only as an inert
    :class:`PickledObject` subclass registered under that name (``torch.serialization.safe_globals`` with
    ``(stand_in, name)`` pairs). The restricted unpickler then builds tensors, containers and primitives as usual and
    every other object as a stand-in holding its pickled fields as data, so a dataclass comes back as its field
    values, a datamodule's enum as its value, and no code from the file or from perceiver-io ever runs. Lightning's
    ``AttributeDict`` is rebuilt as an ``OrderedDict``. A custom ``pickle_module`` could do the same but would need
    ``weights_only=False`` and its own allow-list of torch internals; this keeps torch's own safe unpickler.

    Some globals stay refused: those of modules torch never allows (``os``, ``sys``, ``posix``, ``nt``: a file
    naming ``os.system`` is refused even as a stand-in), and in torch's legacy non-zip format every class (the static
    scan reads zip checkpoints only). Such a file raises as refused, naming the global, not as a damaged one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: refused as unsafe (the global named), not a ``torch.save`` file, truncated, a record failing its
            CRC-32 check, or otherwise unreadable (the reason is included).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise RuntimeError(f"reading checkpoints safely needs torch >= 2.5 (this is {torch.__version__})")
    _check_zip_records(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint or a damaged one: torch.load below says why
        names = []
    try:
        with torch.serialization.safe_globals([_stand_in(name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _load_error(path, e, "PyTorch checkpoint", legacy_format=not zipfile.is_zipfile(path)) from None


# ----------------------------------------------------------------------------------------------------------------
#  Lightning checkpoints of perceiver-io's Lit* modules
# ----------------------------------------------------------------------------------------------------------------

_IO_TOP_LEVEL = tuple(f.name for f in dataclasses.fields(PerceiverIOConfig) if f.name not in ("encoder", "decoder"))


def _fields_of(value: Any, name: str, source: str) -> dict[str, Any]:
    """A pickled config (stand-in) or a dict (configs written by LightningCLI) as a field dict."""
    if isinstance(value, PickledObject):
        return dict(vars(value))
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{source}: hyper-parameter {name!r} is a {type(value).__name__}, not a config")


def _lightning_parts(checkpoint: Any, source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{source} is not a Lightning checkpoint (no 'state_dict' entry; a plain state dict?)")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not hparams:
        raise ValueError(f"{source} has no 'hyper_parameters': not saved by a perceiver-io Lit* module")
    prefix = "model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{source} has no weights under 'model.': not saved by a perceiver-io Lit* module")
    return dict(hparams), state


def _lightning_model_types(hparams: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """The perceiver-io model types (``hf_model_type``) whose config fields a Lit* module's hyper-parameters have,
    most likely first. Perceiver AR checkpoints of text and symbolic audio have the same fields: both are returned
    (text first)."""
    if "encoder" in hparams and "decoder" in hparams:
        encoder = _fields_of(hparams["encoder"], "encoder", source)
        decoder = _fields_of(hparams["decoder"], "decoder", source)
        if "num_patch_input_channels" in encoder:
            return ("perceiver-io-optical-flow",)
        if "image_shape" in encoder:
            return ("perceiver-io-image-classifier",)
        if "vocab_size" in encoder and "num_classes" in decoder:
            return ("perceiver-io-text-classifier",)
        if "vocab_size" in encoder:
            return ("perceiver-io-masked-language-model",)
        raise ValueError(f"{source}: encoder config with fields {sorted(encoder)} fits no perceiver-io model")
    if {"vocab_size", "max_seq_len", "max_latents", "num_channels"} <= set(hparams):
        return ("perceiver-ar-causal-language-model", "perceiver-ar-symbolic-audio-model")
    raise ValueError(
        f"{source}: hyper-parameters {sorted(hparams)} are neither a perceiver-io Perceiver IO module's (encoder, "
        "decoder, ...) nor a Perceiver AR module's (vocab_size, max_seq_len, max_latents, num_channels, ...)"
    )


def _lightning_candidates(hparams: Mapping[str, Any], source: str) -> tuple[_Found, ...]:
    """The model types a Lit* module's hyper-parameters fit, most likely first: the one LightningCLI's recorded class
    path (``_class_path``) names, else those the config fields fit."""
    class_path = hparams.get("_class_path")
    if isinstance(class_path, str):
        for t in model_types():
            if t.lightning_module == class_path.rsplit(".", 1)[-1]:
                return (_found(t),)
    registered = {t.hf_model_type: t for t in model_types()}
    return tuple(
        _found(registered[name]) if name in registered else _Found(None, f"model_type {name!r}")
        for name in _lightning_model_types(hparams, source)
    )


def _config_from_hparams(model_class: type, hparams: Mapping[str, Any], source: str) -> Any:
    """Our config from a Lit* module's hyper-parameters; the module's own arguments (``params``, validation
    samples, optimizer settings, ...) are not model config and are left out."""
    config_class = typing.get_origin(model_class.config_class) or model_class.config_class
    if issubclass(config_class, PerceiverIOConfig):
        values = {k: hparams[k] for k in _IO_TOP_LEVEL if k in hparams}
        values["encoder"] = _fields_of(hparams["encoder"], "encoder", source)
        values["decoder"] = _fields_of(hparams["decoder"], "decoder", source)
    else:
        names = {f.name for f in dataclasses.fields(config_class)}
        values = {k: v for k, v in hparams.items() if k in names}
    return _build_config(model_class, values, f"{source}'s hyper_parameters")


def from_lightning_checkpoint(
    path: str | Path,
    model_class: type | None = None,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Load a Lightning checkpoint saved by a perceiver-io ``Lit*`` module as our model, without perceiver-io.

    The file is read by :func:`load_checkpoint_safely` (``weights_only``; no code from the file runs). The model type
    comes from the hyper-parameters (LightningCLI's ``_class_path`` when present, else the config fields), the
    config from the hyper-parameters, the weights from ``state_dict`` entries under ``model.`` (other entries belong
    to the Lightning wrapper: losses, metrics).

    Args:
        path: the ``.ckpt`` file.
        model_class: our class expected (or a subclass of it); ``None`` infers it among the registered classes
            (all of them once :mod:`perceiver_fast.models.artifacts` is imported). Perceiver AR checkpoints don't
            say whether they hold text or symbolic audio (same architecture and fields): without LightningCLI's class
            path they load as ``CausalLanguageModel`` unless ``model_class=SymbolicAudioModel`` (or
            ``SymbolicAudioModel.from_lightning_checkpoint``) asks otherwise.
        map_location: device for the model.
        dtype: ``"auto"`` keeps the dtypes the weights were saved in (a bf16 run's checkpoint, as Lightning's
            ``precision="bf16-true"`` writes it, comes back in bf16); a ``torch.dtype`` casts to it.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: not a readable checkpoint, not a Lightning checkpoint of a perceiver-io module, a model of
            another type than ``model_class`` (both named), weights that don't match the config, or a ``dtype``
            that is neither ``"auto"`` nor a floating-point ``torch.dtype``.
    """
    check_load_dtype(dtype)
    source = str(path)
    hparams, state = _lightning_parts(load_checkpoint_safely(path), source)
    model_class = _resolve_class(_lightning_candidates(hparams, source), model_class, source)
    model = model_class(_config_from_hparams(model_class, hparams, source))
    load_state_strict(model, state, source)
    set_loaded_dtype(model, state, dtype)
    return model.to(map_location).eval()
