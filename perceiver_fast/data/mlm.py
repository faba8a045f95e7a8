"""Masked language modelling batches for Perceiver IO: token sequences -> ``(labels, x_masked, pad_mask)``.

The masking is BERT's, as perceiver-io's ``TokenMaskingCollator`` gets it from transformers'
``DataCollatorForLanguageModeling(mlm_probability=0.15)``: each real token (not padding, not a special token) is
selected with probability `mask_prob`; a selected token's label is its id, every other label is -100 (ignored by
the loss); of the selected tokens 80% become ``[MASK]``, 10% a random token and 10% stay as they are.

With ``whole_word=True`` the unit is a word instead of a token, as in perceiver-io's ``WordMaskingCollator``: a word
is selected with probability `mask_prob` and all its tokens share one fate (all ``[MASK]``, all random, or all kept,
80/10/10). Words are perceiver-io's for its UTF-8 bytes tokenizer (``PerceiverTokenizerUtil.word_ids``): they split
at ASCII whitespace, and the whitespace before a word belongs to it (so spaces and indents are trained on too); a
special token belongs to no word and ends the one before it.

Sequences come from the same pipeline as causal language modelling (`perceiver_fast.data.text.prepare_clm_data`:
files -> documents -> ids -> packed chunks); `MLMCollator` also takes sequences of different lengths and right-pads
them (``pad_mask`` True at padding), so it serves unpacked text too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from perceiver_fast.data.tokenizer import BytesTokenizer


class MLMCollator:
    """Pad and mask a batch of token sequences for a masked language model.

    :param vocab_size: size of the vocabulary (random replacements are drawn from the non-special ids).
    :param mask_token_id: id written over 80% of the selected tokens.
    :param pad_token_id: id of padding (never selected).
    :param num_special_tokens: ids below this are special (never selected, never drawn as random replacements);
        the bytes tokenizer has 6.
    :param mask_prob: probability that a real token is selected for prediction.
    :param generator: random source (seed it to make the masking reproducible).
    :param whole_word: select whole words (perceiver-io's: a word with the whitespace before it) instead of single
        tokens.
    """

    def __init__(
        self,
        vocab_size: int = 262,
        mask_token_id: int = 3,
        pad_token_id: int = 0,
        num_special_tokens: int = 6,
        mask_prob: float = 0.15,
        generator: torch.Generator | None = None,
        whole_word: bool = False,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if not 0 <= num_special_tokens < vocab_size:
            raise ValueError(f"num_special_tokens must be in [0, vocab_size), got {num_special_tokens}")
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.num_special_tokens = num_special_tokens
        self.mask_prob = mask_prob
        self.generator = generator
        self.whole_word = whole_word
        # Ids of ASCII whitespace (bytes tokenizer layout: byte b has id b + num_special_tokens); they split words.
        self.whitespace_ids = torch.tensor([ord(c) + num_special_tokens for c in " \t\n\r\x0b\x0c"])

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: BytesTokenizer,
        mask_prob: float = 0.15,
        generator: torch.Generator | None = None,
        whole_word: bool = False,
    ) -> MLMCollator:
        """A collator with the bytes tokenizer's ids (``[PAD]`` 0, ``[MASK]`` 3, six specials, 262 ids)."""
        return cls(
            tokenizer.vocab_size,
            tokenizer.mask_token_id,
            tokenizer.pad_token_id,
            tokenizer.num_special_tokens,
            mask_prob,
            generator,
            whole_word,
        )

    def pad(self, sequences: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad 1-D id sequences into ``(ids [b, n], pad_mask [b, n])``; a 2-D tensor passes through unpadded."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"a tensor batch must be [batch, seq], got {tuple(sequences.shape)}")
            ids = sequences.long()
            return ids, torch.zeros(ids.shape, dtype=torch.bool)
        if not sequences:
            raise ValueError("empty batch")
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        pad_mask = torch.ones(len(sequences), length, dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            pad_mask[row, : len(seq)] = False
        return ids, pad_mask

    def mask(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels, x_masked)`` for padded ids: labels -100 except at selected tokens; 80/10/10 replacement."""
        g = self.generator
        candidates = ~pad_mask & (ids >= self.num_special_tokens)
        if self.whole_word:
            word = self.word_ids(ids, pad_mask)
            num_words = int(word.max()) + 1  # 0: only pads and special tokens
            word = word.clamp(min=0)
            selected, draw = torch.zeros_like(candidates), torch.zeros(ids.shape)
            if num_words:
                selected = (torch.rand(num_words, generator=g) < self.mask_prob)[word] & candidates
                draw = torch.rand(num_words, generator=g)[word]  # one fate per word
        else:
            selected = (torch.rand(ids.shape, generator=g) < self.mask_prob) & candidates
            draw = torch.rand(ids.shape, generator=g)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        random_ids = torch.randint(self.num_special_tokens, self.vocab_size, ids.shape, generator=g)
        x = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        x = torch.where(to_random, random_ids, x)
        return labels, x

    def word_ids(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` word numbers (0, 1, ... over the batch; -1 at pads and special tokens) of whole-word
        masking: a word starts at a token after a pad, a special token or a row start, and at whitespace after a
        token that is not whitespace; whitespace after whitespace, and the rest of a word, continue it."""
        candidates = ~pad_mask & (ids >= self.num_special_tokens)
        space = torch.isin(ids, self.whitespace_ids)

        def before(t: torch.Tensor) -> torch.Tensor:  # each token's left neighbour in its row (False at row starts)
            return torch.nn.functional.pad(t[:, :-1], (1, 0), value=False)

        starts = candidates & (~before(candidates) | (space & ~before(space)))
        word = torch.cumsum(starts.flatten(), 0).view(ids.shape) - 1
        return torch.where(candidates, word, -1)

    def __call__(
        self, sequences: Sequence[torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels, x_masked, pad_mask)`` like perceiver-io's collators (``pad_mask`` True = padding)."""
        ids, pad_mask = self.pad(sequences)
        labels, x = self.mask(ids, pad_mask)
        return labels, x, pad_mask
