"""The UTF-8 bytes tokenizer of perceiver-io's text models (and of `transformers.PerceiverTokenizer`).

The vocabulary has 262 ids: six special tokens, then the 256 byte values shifted by six::

    0 [PAD]   1 [BOS]   2 [EOS]   3 [MASK]   4 [CLS]   5 [SEP]   6 + b  for each byte b of the UTF-8 encoding

Where this tokenizer and `PerceiverTokenizer` (transformers 4.44) agree, they give the same ids and text. They differ
on purpose in three places:

- `decode` defaults to `skip_special_tokens=True` and never applies `clean_up_tokenization_spaces` (which rewrites
  ``"a ."`` to ``"a."``), so ``decode(encode(text)) == text`` for every string.
- ids outside ``[0, 262)`` raise `ValueError` instead of an obscure error (or a wrong character) deep in the decoder.
- long texts are encoded without a Python loop over bytes (one `torch.frombuffer` call).
"""

from __future__ import annotations

import codecs
import numbers
import re
from collections.abc import Iterable, Sequence

import torch

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256

# PerceiverTokenizer treats the literal text "[SEP]" (etc.) as the special token, as every transformers slow tokenizer
# does with its added tokens; this pattern finds them so we can do the same.
_SPECIAL_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
_SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}


class BytesTokenizer:
    """UTF-8 bytes tokenizer with perceiver-io's 262-token vocabulary (see the module docstring).

    Example::

        tok = BytesTokenizer()
        ids = tok.encode("def f(x):")            # [106, 107, 108, 38, ...]
        tok.decode(ids)                          # 'def f(x):'
        input_ids, pad_mask = tok.batch_encode(["a", "abc"])   # left padded, pad_mask True = pad
    """

    special_tokens = SPECIAL_TOKENS

    # Read-only properties: the ids are fixed by the vocabulary, and a model trained with them depends on them.
    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def bos_token_id(self) -> int:
        return 1

    @property
    def eos_token_id(self) -> int:
        return 2

    @property
    def mask_token_id(self) -> int:
        return 3

    @property
    def cls_token_id(self) -> int:
        return 4

    @property
    def sep_token_id(self) -> int:
        return 5

    @property
    def vocab_size(self) -> int:
        """Number of ids (262): six special tokens plus 256 byte values."""
        return VOCAB_SIZE

    @property
    def num_special_tokens(self) -> int:
        """Number of special tokens (6); byte ``b`` has id ``b + num_special_tokens``."""
        return NUM_SPECIAL_TOKENS

    def __len__(self) -> int:
        return VOCAB_SIZE

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={VOCAB_SIZE})"

    # ------------------------------------------------------------------------------------------------ encoding

    def encode_to_tensor(
        self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False
    ) -> torch.Tensor:
        """Encode `text` into a 1-D `torch.long` tensor of ids (the fast path behind `encode`).

        :param text: the string to encode.
        :param add_special_tokens: wrap the ids as ``[CLS] ids [SEP]``, like `PerceiverTokenizer`.
        :param split_special_tokens: if False (the default, as in `PerceiverTokenizer`) a literal ``"[SEP]"`` etc.
            in `text` becomes that special token's id; if True all text is encoded as plain bytes, so any string
            round-trips exactly (what training data wants: a file never fakes a document boundary).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if split_special_tokens or "[" not in text:
            ids = _bytes_to_ids(text.encode("utf-8"))
        else:
            ids = self._encode_with_specials(text)
        if add_special_tokens:
            ids = torch.cat([ids.new_tensor([self.cls_token_id]), ids, ids.new_tensor([self.sep_token_id])])
        return ids

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Encode `text` into a list of ids; arguments as in `encode_to_tensor`."""
        return self.encode_to_tensor(text, add_special_tokens, split_special_tokens).tolist()

    def __call__(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens)

    def _encode_with_specials(self, text: str) -> torch.Tensor:
        pieces: list[torch.Tensor] = []
        start = 0
        for match in _SPECIAL_PATTERN.finditer(text):
            pieces.append(_bytes_to_ids(text[start : match.start()].encode("utf-8")))
            pieces.append(torch.tensor([_SPECIAL_IDS[match.group()]], dtype=torch.long))
            start = match.end()
        pieces.append(_bytes_to_ids(text[start:].encode("utf-8")))
        return torch.cat(pieces)

    def batch_encode(
        self,
        texts: Sequence[str],
        padding_side: str = "left",
        add_special_tokens: bool = False,
        max_length: int | None = None,
        truncation_side: str = "right",
        split_special_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of strings and pad them to the longest one.

        Perceiver AR needs prompts padded on the left (``padding_side="left"``, the default here).

        :param texts: the strings.
        :param padding_side: ``"left"`` or ``"right"``.
        :param add_special_tokens: wrap each sequence as ``[CLS] ids [SEP]``.
        :param max_length: if given, sequences longer than this are truncated on `truncation_side`, as
            transformers does: the text is shortened and ``[CLS]``/``[SEP]`` are kept (so `max_length` must leave
            room for them). ``"right"`` keeps the start (transformers' default), ``"left"`` keeps the end (what a
            prompt for generation usually wants).
        :param split_special_tokens: see `encode_to_tensor`.
        :return: ``(input_ids, pad_mask)``: a `long` tensor ``[B, L]`` and a `bool` tensor ``[B, L]``, True = pad.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError("texts must be a sequence (e.g. a list) of str")
        if len(texts) == 0:
            raise ValueError("texts must not be empty")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        specials = 2 if add_special_tokens else 0
        if max_length is not None and max_length < 1 + specials:
            held = " (room for [CLS], [SEP] and a token)" if specials else ""
            raise ValueError(f"max_length must be >= {1 + specials}{held}, got {max_length}")

        sequences = [self.encode_to_tensor(t, False, split_special_tokens) for t in texts]
        if max_length is not None:
            room = max_length - specials
            sequences = [s if len(s) <= room else (s[:room] if truncation_side == "right" else s[-room:])
                         for s in sequences]  # fmt: skip
        if add_special_tokens:
            cls, sep = torch.tensor([self.cls_token_id]), torch.tensor([self.sep_token_id])
            sequences = [torch.cat([cls, s, sep]) for s in sequences]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        pad_mask = torch.ones((len(sequences), length), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            n = len(seq)
            if n == 0:
                continue
            cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[row, cols] = seq
            pad_mask[row, cols] = False
        return input_ids, pad_mask

    # ------------------------------------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Decode ids into a string.

        Special tokens are dropped (``skip_special_tokens=True``) or written as their names (``"[SEP]"``). Byte
        sequences that are not valid UTF-8 decode to U+FFFD replacement characters, as in `PerceiverTokenizer`.

        :param ids: a list of ints or a 1-D integer tensor (a 0-D tensor or int is one id).
        """
        return self._to_bytes(_as_id_tensor(ids), skip_special_tokens).decode("utf-8", errors="replace")

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a 2-D tensor (or each list in a list); padding is a special token and is dropped."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for ids that arrive a few at a time (streaming generation); see `IncrementalDecoder`."""
        return IncrementalDecoder(self, skip_special_tokens)

    def _to_bytes(self, ids: torch.Tensor, skip_special_tokens: bool) -> bytes:
        is_special = ids < NUM_SPECIAL_TOKENS
        if skip_special_tokens or not bool(is_special.any()):
            return _ids_to_bytes(ids[~is_special])
        # Rare path: special tokens are kept and written out by name between runs of bytes.
        out = bytearray()
        for is_spec, run in _runs(ids, is_special):
            out += b"".join(SPECIAL_TOKENS[i].encode() for i in run.tolist()) if is_spec else _ids_to_bytes(run)
        return bytes(out)


class IncrementalDecoder:
    """Turns ids into text as they arrive, holding back an incomplete UTF-8 character until its last byte comes.

    ``decode(ids)`` returns the text completed by `ids`; ``flush()`` returns what is left (replacement characters
    for a truncated character).
    """

    def __init__(self, tokenizer: BytesTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self._decoder.decode(self._tokenizer._to_bytes(_as_id_tensor(ids), self._skip))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _bytes_to_ids(data: bytes) -> torch.Tensor:
    if len(data) == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.long)
    # bytearray: frombuffer wants a writable buffer; the copy is a memcpy, not a Python loop.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + NUM_SPECIAL_TOKENS


def _ids_to_bytes(ids: torch.Tensor) -> bytes:
    return (ids - NUM_SPECIAL_TOKENS).to(torch.uint8).numpy().tobytes()


def _as_id_tensor(ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() > 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)} (use batch_decode for a batch)")
        tensor = ids.detach().reshape(-1).cpu().long()
    else:
        if isinstance(ids, (str, bytes)):
            raise TypeError("ids must be integers, not a string (did you mean encode?)")
        if isinstance(ids, numbers.Integral):
            ids = [ids]
        ids = list(ids)
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
            raise TypeError("ids must be a sequence of ints or an integer tensor")
        tensor = torch.tensor(ids, dtype=torch.long)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= VOCAB_SIZE):
        bad = tensor[(tensor < 0) | (tensor >= VOCAB_SIZE)][0].item()
        raise ValueError(f"token id {bad} is out of range [0, {VOCAB_SIZE})")
    return tensor


def _runs(ids: torch.Tensor, flags: torch.Tensor) -> Iterable[tuple[bool, torch.Tensor]]:
    """Split `ids` into maximal runs of equal `flags`."""
    change = torch.nonzero(flags[1:] != flags[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(ids)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            yield bool(flags[start]), ids[start:end]
