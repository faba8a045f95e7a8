"""Noticing that a model's weights changed between two steps of a stream.

Cached keys/values are functions of the weights: a training loop that streams samples between its optimizer steps
updates the weights under an open stream, and the stream's cache then holds keys/values of the old weights. A change
shows, without reading any weight, as one of:

- torch's version counter of the tensor (bumped by every in-place op: optimizer steps, ``load_state_dict``, ``mul_``
  under ``no_grad``; not by writes through ``.data``, which torch keeps out of its bookkeeping on purpose);
- its storage address (``model.double()``, ``model.cpu().cuda()`` reassign ``param.data``);
- another tensor registered under the name (``load_state_dict(..., assign=True)``, ``module.weight = ...``).
"""

from __future__ import annotations

import torch


def _version(tensor: torch.Tensor) -> int:
    # Inference tensors keep no version counter (and cannot be changed in place outside inference mode).
    return -1 if tensor.is_inference() else tensor._version


class WeightsWatch:
    """A snapshot of where the parameters and buffers of ``model`` live and how often each was changed in place."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._entries = self._snapshot()

    def _snapshot(self) -> list[tuple[dict, str, torch.Tensor, int, int, tuple]]:
        # The registries themselves are kept, so that a check is a few lookups per tensor, not a walk of the module
        # tree (hundreds of microseconds for the reference model, more than a decoding step replayed on a GPU).
        return [
            (store, name, tensor, tensor.data_ptr(), _version(tensor), (tensor.dtype, tensor.device))
            for module in self.model.modules()
            for store in (module._parameters, module._buffers)
            for name, tensor in store.items()
            if tensor is not None
        ]

    def changed(self) -> bool:
        """Whether any parameter or buffer changed since the snapshot (see the module docstring for what shows)."""
        # A plain loop: a stream runs this before every token (a generator expression costs twice as much).
        for store, name, tensor, address, version, _ in self._entries:
            if store.get(name) is not tensor or tensor.data_ptr() != address or _version(tensor) != version:
                return True
        return False

    def moved(self) -> bool:
        """Whether a parameter or buffer now has another dtype or device than at the snapshot."""
        return any(
            (current := store.get(name)) is None or (current.dtype, current.device) != kind
            for store, name, _, _, _, kind in self._entries
        )

    def renew(self) -> None:
        """Take the snapshot again (after whatever depended on the weights was rebuilt)."""
        self._entries = self._snapshot()
