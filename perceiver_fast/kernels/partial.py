"""Attention over the union of disjoint key sets, from each set's output and log-sum-exp: how a split computation
(decoding's cached prefix and new latents, the eager backend's two-part prefix-causal path) becomes one softmax."""

from __future__ import annotations

import torch


def merge_partial_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets from each set's output and log-sum-exp.

    ``out [b, n, h, d]``, ``lse [b, h, n]`` (``-inf`` where a set is empty). Returns ``(out, lse)`` in the lse's
    dtype: float32, or float64 where the parts are float64 (the attention op's lse of float64 inputs; an output
    is never wider than its lse).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Weights are taken against the lowest finite lse where a row sees no key at all (its lse is -inf): both are then
    # exp(-inf) = 0 and the row is 0, the op's rule, without the NaN of -inf - -inf or a mask (a step runs this
    # for every token; each op is a kernel launch on a GPU).
    reference = lse.clamp(min=torch.finfo(lse.dtype).min)
    # Both weights in one exp; a 16-bit output promotes to the weights' dtype inside its product, as a cast would.
    weights = torch.exp(torch.stack((lse_a, lse_b)) - reference).transpose(2, 3).unsqueeze(-1)
    # The second product and the sum in one kernel (addcmul).
    return torch.addcmul(out_a * weights[0], out_b, weights[1]), lse
