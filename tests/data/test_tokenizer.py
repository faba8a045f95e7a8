"""BytesTokenizer against transformers.PerceiverTokenizer (the tokenizer perceiver-io's text models use)."""

import pytest
import torch

from perceiver_fast.data import BytesTokenizer
from perceiver_fast.data.tokenizer import IncrementalDecoder

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x * 2  # a . b ? c !\n",
    "héllo wörld, ça va? Größe",
    "日本語のテキスト",
    "emoji 🤗🚀 and flags 🇩🇪, zwj 👩‍💻",
    "tabs\tand\r\nwindows newlines\x00nul",
    "literal specials: x [SEP] y[PAD]z [MASK][CLS][BOS][EOS]",
    "almost specials: [SEP [sep] [SEP]] []",
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    tok = transformers.PerceiverTokenizer(clean_up_tokenization_spaces=False)  # no files needed
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def tok():
    return BytesTokenizer()


def test_vocabulary(tok, hf):
    assert tok.vocab_size == len(tok) == 262 == hf.vocab_size + 6
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (hf.pad_token_id, hf.bos_token_id, 2)
    assert (tok.mask_token_id, tok.cls_token_id, tok.sep_token_id) == (hf.mask_token_id, hf.cls_token_id, 5)
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.encode("A") == [ord("A") + 6]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_perceiver_tokenizer(tok, hf, text, add_special_tokens):
    assert tok.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
        text, add_special_tokens=add_special_tokens
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_perceiver_tokenizer(tok, hf, text, skip):
    ids = hf.encode(text, add_special_tokens=True)
    expected = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=skip) == expected


def test_round_trip_is_exact(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text, split_special_tokens=True)) == text
    # PerceiverTokenizer's default clean-up would turn "a ." into "a."; ours never rewrites text.
    assert tok.decode(tok.encode("a . b")) == "a . b"


def test_split_special_tokens_encodes_literal_text(tok):
    assert tok.encode("[SEP]") == [5]
    assert tok.encode("[SEP]", split_special_tokens=True) == [b + 6 for b in b"[SEP]"]


@pytest.mark.parametrize(
    "ids",
    [
        [0xFF + 6, 0xC3 + 6, ord("H") + 6, 5, 0xE2 + 6, 0x82 + 6],  # invalid start byte, truncated sequences
        [0xC3 + 6, 5, 0xA9 + 6],  # a two-byte character split by a special token
        [0xED + 6, 0xA0 + 6, 0x80 + 6],  # an encoded surrogate (invalid in UTF-8)
        [0xF0 + 6, 0x9F + 6, 0xA4 + 6],  # emoji missing its last byte
    ],
)
@pytest.mark.parametrize("skip", [False, True])
def test_invalid_utf8_decodes_like_perceiver_tokenizer(tok, hf, ids, skip):
    expected = hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=skip) == expected
    assert tok.decode(torch.tensor(ids), skip_special_tokens=skip) == expected


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_batch_encode_left_padding_matches_perceiver_tokenizer(tok, hf, add_special_tokens):
    texts = ["ab", "héllo 🤗", "", "x"]
    enc = hf(texts, padding=True, add_special_tokens=add_special_tokens, return_tensors="pt")
    input_ids, pad_mask = tok.batch_encode(texts, add_special_tokens=add_special_tokens)
    assert input_ids.dtype == torch.long and pad_mask.dtype == torch.bool
    assert torch.equal(input_ids, enc["input_ids"])
    assert torch.equal(pad_mask, enc["attention_mask"] == 0)
    assert tok.batch_decode(input_ids) == texts


def test_batch_encode_right_padding_and_truncation(tok):
    input_ids, pad_mask = tok.batch_encode(["abcdef", "ab"], padding_side="right", max_length=4)
    assert input_ids.tolist() == [[103, 104, 105, 106], [103, 104, 0, 0]]
    assert pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    input_ids, _ = tok.batch_encode(["abcdef"], max_length=3, truncation_side="left")
    assert tok.decode(input_ids[0]) == "def"


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_the_special_tokens_like_perceiver_tokenizer(tok, hf, side):
    """transformers shortens the text and keeps ``[CLS]`` and ``[SEP]``; slicing after wrapping dropped one."""
    texts = ["abcdef", "ab", "abcd"]
    hf.truncation_side = side
    try:
        enc = hf(texts, add_special_tokens=True, max_length=4, truncation=True, padding=True, return_tensors="pt")
    finally:
        hf.truncation_side = "right"  # the module's tokenizer, shared with other tests
    input_ids, pad_mask = tok.batch_encode(texts, add_special_tokens=True, max_length=4, truncation_side=side)
    assert torch.equal(input_ids, enc["input_ids"]) and torch.equal(pad_mask, enc["attention_mask"] == 0)
    with pytest.raises(ValueError, match="room for"):
        tok.batch_encode(texts, add_special_tokens=True, max_length=1)


def test_long_text_fast_path(tok):
    text = "print('héllo')\n" * 50_000
    ids = tok.encode_to_tensor(text)
    assert ids.dtype == torch.long and ids.shape == (len(text.encode()),)
    assert tok.decode(ids) == text


def test_incremental_decoder_holds_back_split_characters(tok):
    ids = tok.encode("ä🤗b")
    decoder = tok.incremental_decoder()
    assert isinstance(decoder, IncrementalDecoder)
    pieces = [decoder.decode(ids[i : i + 1]) for i in range(len(ids))]
    assert pieces[0] == "" and pieces[1] == "ä"  # the first byte of "ä" alone is held back
    assert "".join(pieces) + decoder.flush() == "ä🤗b"
    decoder = tok.incremental_decoder()
    assert decoder.decode(ids[:2] + ids[2:4]) == "ä" and decoder.flush() == "\ufffd"


def test_bad_input_raises(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([6, 262])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        tok.decode("abc")
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        tok.batch_encode("abc")
    with pytest.raises(ValueError, match="padding_side"):
        tok.batch_encode(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        tok.batch_encode([])


def test_ids_are_read_only(tok):
    with pytest.raises(AttributeError):
        tok.pad_token_id = 7
    assert [tok.special_tokens[i] for i in (tok.pad_token_id, tok.eos_token_id, tok.sep_token_id)] == [
        "[PAD]",
        "[EOS]",
        "[SEP]",
    ]
