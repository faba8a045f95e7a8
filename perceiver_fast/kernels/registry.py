"""The attention backends by name.

Each backend lives in one module that calls :func:`register_backend` when imported. The modules listed in
``BACKEND_MODULES`` are imported by :func:`load_backends`, which ``perceiver_fast.kernels`` calls once it is set up
(a first call traced by ``torch.compile`` could not import them: ``fullgraph=True`` stops at ``import_module``). A
backend module imports this registry, never the other way round (the names below are strings), so there is no import
cycle; and none of them imports Triton, the CUDA extension or flash-attn until a call needs it, so a machine without
them loads every backend module all the same. Adding a backend is one module plus its line here; where ``auto``
should use it is decided by measurement (:mod:`.dispatch`).
"""

from __future__ import annotations

import importlib

from perceiver_fast.kernels.problem import AttentionBackend

BACKEND_MODULES = (
    "perceiver_fast.kernels.reference",  # "eager": the reference, runs everything
    "perceiver_fast.kernels.sdpa",  # "sdpa-flash", "sdpa-cudnn", "sdpa-efficient": PyTorch's fused kernels
    "perceiver_fast.kernels.flash_attn",  # "flash-attn", "flash-attn-cute": Tri Dao's package, when installed
    "perceiver_fast.kernels.triton.backend",  # "triton": ours
    "perceiver_fast.kernels.cuda",  # "cuda": ours, CUDA C++ (csrc/), when built
)

_backends: dict[str, AttentionBackend] = {}
_loaded: list[bool] = []  # a list, not a global flag, so that no `global` statement is needed


def register_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` available under ``backend.name`` (replacing one of the same name).

    A backend registered this way can be forced with ``backend=name``; ``auto`` considers it only where a dispatch
    table row or the default order names it (see :mod:`perceiver_fast.kernels.dispatch`).
    """
    if not isinstance(getattr(backend, "name", None), str) or not backend.name:
        raise TypeError("a backend needs a non-empty str `name`")
    for method in ("unsupported_reason", "run"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"backend {backend.name!r} has no {method}() method")
    _backends[backend.name] = backend


def load_backends() -> None:
    """Import the built-in backend modules (once), which registers them."""
    if not _loaded:
        _loaded.append(True)
        for module in BACKEND_MODULES:
            importlib.import_module(module)


def backends() -> dict[str, AttentionBackend]:
    """Every registered backend by name (importing the built-in backend modules on first use)."""
    load_backends()
    return _backends


def available_backends() -> list[str]:
    """Names of the registered backends (whether or not they can run on this machine: :func:`explain` says)."""
    return sorted(backends())


def get_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``; ``KeyError`` if there is none."""
    return backends()[name]
