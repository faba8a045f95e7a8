"""Input adapters (task input -> generic Perceiver input), output adapters, and query providers."""

from __future__ import annotations

import torch
import torch.nn as nn

from perceiver_fast.models.core.position import FrequencyPositionEncoding, positions


class InputAdapter(nn.Module):
    """Transforms and position-encodes task input into ``[b, n, num_input_channels]``."""

    def __init__(self, num_input_channels: int, *args, **kwargs):
        super().__init__()
        self._num_input_channels = num_input_channels

    @property
    def num_input_channels(self) -> int:
        return self._num_input_channels


class RotarySupport(InputAdapter):
    """Mixin: an input adapter that also returns rotary angles for the input positions."""

    def __init__(self, rotated_channels_per_head: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frq_pos_encoding = FrequencyPositionEncoding(dim=rotated_channels_per_head)

    def forward(self, x: torch.Tensor, abs_pos: torch.Tensor | None = None):
        if abs_pos is None:
            abs_pos = positions(*x.shape, device=x.device)
        return super().forward(x, abs_pos), self.frq_pos_encoding(abs_pos)


class OutputAdapter(nn.Module):
    """Transforms decoder output into task output."""


class ClassificationOutputAdapter(OutputAdapter):
    def __init__(self, num_classes: int, num_output_query_channels: int):
        super().__init__()
        self.linear = nn.Linear(num_output_query_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(dim=1)


class QueryProvider:
    """Provides the query input of a cross-attention (latents of an encoder, output queries of a decoder)."""

    @property
    def num_query_channels(self) -> int:
        raise AttributeError(f"{type(self).__name__} must define num_query_channels")


class TrainableQueryProvider(nn.Module, QueryProvider):
    """Learned queries ``[num_queries, num_query_channels]`` shared by the whole batch."""

    def __init__(self, num_queries: int, num_query_channels: int, init_scale: float = 0.02):
        super().__init__()
        self._query = nn.Parameter(torch.empty(num_queries, num_query_channels))
        with torch.no_grad():
            self._query.normal_(0.0, init_scale)

    @property
    def num_query_channels(self) -> int:
        return self._query.shape[-1]

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self._query.unsqueeze(0)


class TokenInputAdapter(InputAdapter):
    """Token embedding plus (optionally) a learned absolute position embedding."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_input_channels: int, abs_pos_emb: bool = True):
        super().__init__(num_input_channels)
        self._max_seq_len = max_seq_len
        self._abs_pos_emb = abs_pos_emb
        self.txt_embedding = nn.Embedding(vocab_size, num_input_channels)
        if abs_pos_emb:
            self.pos_embedding = nn.Embedding(max_seq_len, num_input_channels)

    @property
    def vocab_size(self) -> int:
        return self.txt_embedding.num_embeddings

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    def forward(self, x: torch.Tensor, abs_pos: torch.Tensor | None = None) -> torch.Tensor:
        embedded = self.txt_embedding(x)
        if not self._abs_pos_emb:
            return embedded
        if abs_pos is None:
            abs_pos = positions(*x.shape, device=x.device)
        elif x.shape[1] < abs_pos.shape[1]:
            abs_pos = abs_pos[:, -x.shape[1] :]  # right-aligned: the newest tokens take the last positions
        return embedded + self.pos_embedding(abs_pos)


class TokenInputAdapterWithRotarySupport(RotarySupport, TokenInputAdapter):
    """Token adapter that also returns rotary angles (Perceiver AR text models)."""

    def __init__(
        self, rotated_channels_per_head: int, vocab_size: int, max_seq_len: int, num_input_channels: int,
        abs_pos_emb: bool,
    ):
        super().__init__(
            rotated_channels_per_head=rotated_channels_per_head,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            num_input_channels=num_input_channels,
            abs_pos_emb=abs_pos_emb,
        )


class TiedTokenOutputAdapter(OutputAdapter):
    """Logits from the token embedding matrix (weights tied with the input), plus an optional bias."""

    def __init__(self, vocab_size: int, emb_bias: bool = True):
        super().__init__()
        self._emb_bias = emb_bias
        if emb_bias:
            self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, txt_embedding: nn.Embedding) -> torch.Tensor:
        logits = torch.matmul(x, txt_embedding.weight.T)
        return logits + self.bias if self._emb_bias else logits

    def decoding_logits(self, x: torch.Tensor, txt_embedding: nn.Embedding) -> torch.Tensor:
        """``forward`` for the rows of a decoding step: the GEMM adds the bias (one launch where forward takes two;
        the sum is rounded once)."""
        if not self._emb_bias or torch.is_autocast_enabled(x.device.type) or x.dtype != self.bias.dtype:
            return self(x, txt_embedding)  # (autocast would round the logits to its dtype)
        logits = torch.addmm(self.bias, x.flatten(0, -2), txt_embedding.weight.T)
        return logits.view(*x.shape[:-1], logits.shape[-1])
