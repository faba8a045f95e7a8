"""Reading saved configs and weights with errors that say what is wrong: which file, which field or weight, what was
expected and what the file holds.

Shared by our own format (:mod:`perceiver_fast.models.core.pretrained`) and perceiver-io's formats
(:mod:`perceiver_fast.models.core.perceiver_io_artifacts`), both of which sit below the model classes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CONFIG_FILE", "build_config", "load_state_strict", "read_json_object", "read_safetensors"]

# Where a saved model directory keeps its config, in our format and in Hugging Face's (perceiver-io's wrappers).
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------------------------------------------
#  Files
# ----------------------------------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a saved model directory's ``config.json``).

    Raises:
        FileNotFoundError: no such file (the directory is not a saved model).
        ValueError: the file is not UTF-8 JSON, or holds something else than an object (both name the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a saved model directory")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        held = "null" if value is None else type(value).__name__
        raise ValueError(f"{path} does not hold a JSON object (it holds a {held})")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU.

    Raises:
        FileNotFoundError: no such file (named).
        ValueError: the file cannot be read as safetensors (truncated or corrupt; named, with safetensors' reason).
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the weights are missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, which names no file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable weights file (truncated or corrupt?): {reason}") from None


# ----------------------------------------------------------------------------------------------------------------
#  Configs: every field checked against the dataclass's annotations
# ----------------------------------------------------------------------------------------------------------------

_MISMATCH = object()  # what _convert returns for a value that does not fit its annotation


def _given(value: Any) -> str:
    """A value as an error shows it: its type and (shortened) repr."""
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` wants it, or ``_MISMATCH``.

    Strict where Python is lax, because a lax value builds a model that differs silently or fails far from the
    cause: a bool is not an int (``True`` would be one head), a float is not an int (``8.0`` latents would be kept
    as a float), a string is never a number. A float field takes an int and stores it as a float (JSON writes
    ``1.0`` as ``1`` in some tools). A tuple field takes a list (JSON has no tuples) and stores a tuple, as models
    compare shapes with tuples.
    """
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        for arm in typing.get_args(hint):
            converted = _convert(value, arm)
            if converted is not _MISMATCH:
                return converted
        return _MISMATCH
    if hint is type(None):
        return value if value is None else _MISMATCH
    if hint is bool:
        return value if type(value) is bool else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return _MISMATCH
            items = [_convert(v, a) for v, a in zip(value, args)]
        else:
            items = [_convert(v, args[0] if args else Any) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else origin(items)
    raise TypeError(f"config fields annotated {hint!r} cannot be checked")


def _describe(hint: Any) -> str:
    """An annotation in the words of the file: ``int or None``, ``list of 3 int``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = [_describe(a) for a in args]
            return f"list of {len(args)} {kinds[0]}" if len(set(kinds)) == 1 else f"list of ({', '.join(kinds)})"
        return f"list of {_describe(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", repr(hint))


@dataclasses.dataclass
class _Problems:
    messages: list[str] = dataclasses.field(default_factory=list)
    missing: bool = False  # some field was missing: the error then says why that matters


def _build(
    config_class: type,
    values: Any,
    path: str,
    every_field: bool,
    nested: Mapping[str, type],
    problems: _Problems,
) -> Any:
    """``config_class`` from ``values``, or ``None`` after recording what is wrong in ``problems``."""
    target = typing.get_origin(config_class) or config_class  # PerceiverIOConfig[E, D] -> PerceiverIOConfig
    name = target.__name__
    where = f"{path.rstrip('.')}: " if path else ""
    if not isinstance(values, Mapping):
        problems.messages.append(f"{where}must be a mapping (JSON object) of {name} fields, got {_given(values)}")
        return None
    count = len(problems.messages)
    fields = dataclasses.fields(target)
    hints = typing.get_type_hints(target)
    unknown = sorted(set(values) - {f.name for f in fields})
    if unknown:
        problems.messages.append(f"{where}unknown {name} fields: {unknown}")
    required = [
        f.name
        for f in fields
        if every_field or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    ]
    missing = [n for n in required if n not in values]
    if missing:
        problems.messages.append(f"{where}missing {name} fields: {missing}")
        problems.missing = True
    kwargs = {}
    for f in fields:
        if f.name not in values:
            continue
        value, hint, field_path = values[f.name], nested.get(f.name, hints[f.name]), f"{path}{f.name}"
        if isinstance(hint, typing.TypeVar):
            raise TypeError(f"{name}.{f.name} is a type variable: pass its config class in `nested`")
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, f"{field_path}.", every_field, {}, problems)
            continue
        converted = _convert(value, hint)
        if converted is _MISMATCH:
            problems.messages.append(f"field {field_path} ({name}) must be {_describe(hint)}, got {_given(value)}")
        kwargs[f.name] = converted
    return target(**kwargs) if len(problems.messages) == count else None


def build_config(
    config_class: type,
    values: Any,
    source: str,
    every_field: bool = False,
    nested: Mapping[str, type] | None = None,
) -> Any:
    """Build the config dataclass ``config_class`` from its JSON or pickled form, checking every field.

    Each value must fit its field's annotation (see :func:`_convert`: ints are ints, not bools or floats; floats
    accept ints; ``None`` only where the annotation allows it; tuples from lists of the right length and item
    types); dataclass fields are built recursively from objects.

    Args:
        config_class: the dataclass, or a parametrized generic one (``PerceiverIOConfig[TextEncoderConfig, ...]``).
        values: field name -> value.
        source: where ``values`` come from (a file, a file's entry), named first in the error.
        every_field: a field missing from ``values`` is an error even if it has a default (our own format, whose
            files hold every field); otherwise it takes the default (perceiver-io's files).
        nested: field name -> dataclass for fields annotated with a type variable (``encoder``, ``decoder``).

    Raises:
        ValueError: naming ``source`` and every problem: unknown fields, missing fields, and for each field of a
            wrong type its path (``encoder.image_shape``), its config class, the type expected and the value given.
    """
    problems = _Problems()
    config = _build(config_class, values, "", every_field, nested or {}, problems)
    if problems.messages:
        target = typing.get_origin(config_class) or config_class
        message = f"{source} does not fit {target.__name__}: " + "; ".join(problems.messages)
        if every_field and problems.missing:
            message += (
                " (every config.json perceiver_fast writes holds every field: a file without one is incomplete, and "
                "a default could differ from what the weights were trained with)"
            )
        raise ValueError(message)
    return config


# ----------------------------------------------------------------------------------------------------------------
#  Weights: strict, with errors that name keys and the config fields deciding them
# ----------------------------------------------------------------------------------------------------------------

# Parameter-name patterns -> the config fields that decide whether (and how big) those parameters exist.
_CONFIG_HINTS: tuple[tuple[str, str], ...] = (
    (r"^input_adapter\.txt_embedding", "vocab_size, num_channels"),
    (r"^input_adapter\.pos_embedding", "max_seq_len, num_channels, abs_pos_emb"),
    (r"^input_adapter\.frq_pos_encoding", "num_channels, num_heads, abs_pos_emb"),
    (r"^cross_attention\.", "num_channels, num_heads, cross_attention_widening_factor"),
    (r"^self_attention\.", "num_self_attention_layers, num_channels, self_attention_widening_factor"),
    (r"^out_norm\.", "output_norm"),
    (r"^output_adapter\.bias", "output_bias, vocab_size"),
    (r"^0\.input_adapter\.txt_embedding", "encoder.vocab_size, encoder.num_input_channels"),
    (r"^0\.input_adapter\.pos_embedding", "encoder.max_seq_len, encoder.num_input_channels"),
    (r"^0\.input_adapter\.position_encoding", "encoder.image_shape, encoder.num_frequency_bands"),
    (r"^0\.input_adapter\.linear", "encoder.num_patch_input_channels, encoder.num_patch_hidden_channels"),
    (r"^0\.latent_provider", "num_latents, num_latent_channels"),
    (r"^0\.cross_attn_1\.", "encoder.num_cross_attention_* fields, encoder.cross_attention_widening_factor"),
    (r"^0\.cross_attn_n\.", "encoder.num_cross_attention_layers, encoder.first_cross_attention_layer_shared"),
    (r"^0\.self_attn_1\.", "encoder.num_self_attention_layers_per_block, encoder.num_self_attention_* fields"),
    (r"^0\.self_attn_n\.", "encoder.num_self_attention_blocks, encoder.first_self_attention_block_shared"),
    (r"^1\.cross_attn\.", "decoder.num_cross_attention_* fields, decoder.cross_attention_residual"),
    (r"^1\.output_query_provider", "decoder.max_seq_len / num_output_queries, decoder.num_output_query_channels"),
    (r"^1\.output_adapter", "decoder.num_classes / vocab_size, decoder.num_output_query_channels"),
)


def _config_hints(keys: list[str]) -> list[str]:
    hints = []
    for pattern, fields in _CONFIG_HINTS:
        if any(re.match(pattern, k) for k in keys) and fields not in hints:
            hints.append(fields)
    return hints


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key present, none extra, every shape equal; else ``ValueError`` naming
    ``source``, the missing, unexpected and mis-shaped keys and the config fields that decide them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    # Floating-point weights and integer ones (counters, indices) are not a cast away from each other: copying one
    # into the other would succeed and give values the model was never trained with.
    other_kind = [
        f"{k} {str(state[k].dtype).removeprefix('torch.')} != {str(v.dtype).removeprefix('torch.')}"
        for k, v in expected.items()
        if k in state and _kind(state[k]) != _kind(v)
    ]
    if missing or unexpected or mismatched or other_kind:
        message = f"the weights in {source} do not match {type(model).__name__} built from its config:"
        if missing:
            message += _listing("missing", missing)
        if unexpected:
            message += _listing("unexpected", unexpected)
        if mismatched:
            message += _listing("shape (file != model)", mismatched)
        if other_kind:
            message += _listing("dtype (file != model)", other_kind)
        hints = _config_hints(missing + unexpected + [m.split(" ", 1)[0] for m in mismatched])
        if hints:
            message += "\n  config fields to check: " + "; ".join(hints)
        raise ValueError(message)
    model.load_state_dict(state, strict=True)


def _kind(tensor: torch.Tensor) -> str:
    if tensor.is_complex():
        return "complex"
    return "floating" if tensor.is_floating_point() else "integral"


def check_load_dtype(dtype: torch.dtype | str) -> None:
    """``ValueError`` unless ``dtype`` is ``"auto"`` or a floating-point ``torch.dtype`` (the loaders' argument)."""
    if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be 'auto' or a floating-point torch.dtype, got {dtype!r}")


def set_loaded_dtype(model: nn.Module, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | str) -> None:
    """The loaders' ``dtype`` applied to ``model``, into which ``weights`` (a file's, a source model's) were copied.

    ``"auto"`` gives ``model``'s floating-point tensors the dtypes they have in ``weights``: the whole model, buffers
    included, when they share one dtype (as ``model.to(dtype)`` made them); tensor by tensor otherwise (norms kept in
    float32, say). A tensor registered under two names (tied weights) stays one tensor. A ``torch.dtype`` casts every
    floating-point tensor to it.
    """
    check_load_dtype(dtype)
    if dtype != "auto":
        model.to(dtype)
        return
    dtypes = {key: t.dtype for key, t in weights.items() if t.is_floating_point()}
    if len(set(dtypes.values())) == 1:
        model.to(next(iter(dtypes.values())))
        return
    own = model.state_dict(keep_vars=True)
    for key, dtype in dtypes.items():
        if key in own and own[key].dtype != dtype:
            own[key].data = own[key].data.to(dtype)
