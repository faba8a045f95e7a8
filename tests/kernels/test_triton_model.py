"""A whole model on the Triton backend (interpreter on CPU) gives the eager backend's logits.

Models call ``perceiver_fast.kernels.attention`` and never name a backend; ``PERCEIVER_FAST_BACKEND`` picks one for
every call inside, so this checks the kernels on the calls a real model makes: prefix cross-attention with rotary
queries and keys, causal latent self-attention, and left padding.
"""

from __future__ import annotations

import pytest
import torch

from perceiver_fast.kernels.triton.backend import TritonBackend
from tests.oracle import max_rel_error

pytest.importorskip("triton")
clm = pytest.importorskip("perceiver_fast.models.text.clm")


def _model() -> torch.nn.Module:
    config = clm.CausalLanguageModelConfig(
        num_channels=64, num_heads=4, num_self_attention_layers=2, max_latents=8, max_seq_len=32
    )
    return clm.CausalLanguageModel(config).eval()


def _logits(model, x, prefix_len, pad_mask, backend, monkeypatch):
    monkeypatch.setenv("PERCEIVER_FAST_BACKEND", backend)
    with torch.no_grad():
        return model(x, prefix_len=prefix_len, pad_mask=pad_mask).logits


@pytest.mark.parametrize("padded", [False, True])
def test_clm_logits_match_eager(padded, monkeypatch):
    model = _model()
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    pad_mask = None
    if padded:
        pad_mask = torch.zeros(2, 32, dtype=torch.bool)
        pad_mask[1, :5] = True  # the second sequence is left-padded by five tokens
    eager = _logits(model, x, 24, pad_mask, "eager", monkeypatch)
    calls = []
    run = TritonBackend.run
    monkeypatch.setattr(TritonBackend, "run", lambda self, *a, **kw: calls.append(1) or run(self, *a, **kw))
    triton = _logits(model, x, 24, pad_mask, "triton", monkeypatch)
    assert len(calls) == 3  # one cross-attention and two self-attention layers ran on the kernels
    assert triton.shape == eager.shape == (2, 8, model.config.vocab_size)
    assert max_rel_error(triton, eager) <= 1e-5
