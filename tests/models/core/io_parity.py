"""Helpers for Perceiver IO parity tests: perceiver-io's task backends, weight noise, save/load round trips."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn

from tests.parity import import_perceiver_io


def import_perceiver_io_backend(package: str):
    """perceiver-io's ``perceiver.<package>.backend`` module (e.g. ``package="model.text.mlm"``), or skip the test
    when perceiver-io is absent.

    Some of their task packages import optional extras in ``__init__`` (``pretty_midi`` for symbolic audio, a
    ``datasets`` build for optical flow) that the backend does not need, so the backend file is loaded on its own.
    """
    core = import_perceiver_io("model.core")
    name = f"_perceiver_io_backend_{package.replace('.', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    model_dir = Path(core.__file__).parents[1]  # .../perceiver/model
    path = model_dir.joinpath(*package.split(".")[1:], "backend.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def perturb_parameters(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Add ``scale`` normal noise to every parameter, in place, and return ``model``.

    Fresh models have unit LayerNorms and zero biases, which would hide a swapped norm or a dropped bias; the noise
    makes every parameter matter to the output.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model


def assert_round_trip(model: nn.Module, inputs: tuple, directory) -> None:
    """``save_pretrained`` then ``from_pretrained`` gives the same config, weights and outputs (eval mode)."""
    model.eval()
    model.save_pretrained(directory)
    loaded = type(model).from_pretrained(directory)
    assert loaded.config == model.config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
