"""Helpers for Perceiver IO parity tests: perceiver-io's task backends and outputs on small random inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.parity import import_perceiver_io


def import_perceiver_io_backend(package: str):
    """perceiver-io's ``perceiver.<package>.backend`` module, or skip the test when perceiver-io is absent.

    Some of their task packages import optional extras in ``__init__`` (``pretty_midi`` for symbolic audio, a
    ``datasets`` build for optical flow) that the backend does not need, so the backend file is loaded on its own.
    """
    core = import_perceiver_io("model.core")
    name = f"_perceiver_io_backend_{package.replace('.', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(core.__file__).parents[1].joinpath(*package.split(".")[1:], "backend.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_round_trip(model, inputs: tuple, directory) -> None:
    """``save_pretrained`` then ``from_pretrained`` gives the same config, weights and outputs (eval mode)."""
    import torch

    model.eval()
    model.save_pretrained(directory)
    loaded = type(model).from_pretrained(directory)
    assert loaded.config == model.config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
