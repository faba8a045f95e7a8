"""The residual wrapper: dropout on the module's output while training, the identity (and no dropout call) in eval
mode, where decoding runs."""

from __future__ import annotations

import torch

from perceiver_fast.models.core.utils import Residual


def test_residual_drops_out_only_while_training(monkeypatch):
    residual = Residual(torch.nn.Linear(8, 8), dropout=0.5)
    x = torch.randn(64, 8)
    residual.train()
    torch.manual_seed(0)
    trained = residual(x)
    torch.manual_seed(0)
    assert torch.equal(trained, torch.nn.functional.dropout(residual.module(x), 0.5) + x)
    residual.eval()
    monkeypatch.setattr(residual.dropout, "forward", lambda t: (_ for _ in ()).throw(AssertionError("called")))
    assert torch.equal(residual(x), residual.module(x) + x)
