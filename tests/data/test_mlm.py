"""MLM batches: BERT's 15% selection with 80/10/10 replacement, labels -100 elsewhere, padding never touched."""

import pytest
import torch

from perceiver_fast.data import BytesTokenizer, MLMCollator


def test_masking_statistics_and_labels():
    ids = torch.randint(6, 262, (64, 512))
    collate = MLMCollator.for_tokenizer(BytesTokenizer(), generator=torch.Generator().manual_seed(0))
    labels, x, pad_mask = collate(ids)
    assert labels.shape == x.shape == pad_mask.shape == ids.shape and not pad_mask.any()

    selected = labels != -100
    assert torch.equal(labels[selected], ids[selected])  # a label is the original token
    assert torch.equal(x[~selected], ids[~selected])  # unselected tokens are untouched
    n = selected.sum().item()
    assert n / ids.numel() == pytest.approx(0.15, abs=0.005)  # 32768 tokens: 3 sigma is about 0.006

    masked = (x == 3) & selected
    changed = (x != ids) & (x != 3) & selected
    kept = (x == ids) & selected
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.015)
    # a random replacement can draw the original token (1 in 256): it then counts as kept
    assert changed.sum().item() / n == pytest.approx(0.1 * 255 / 256, abs=0.01)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 256, abs=0.01)
    assert x[changed].min() >= 6  # random replacements are never special tokens


def test_padding_and_special_tokens_are_never_selected():
    tokenizer = BytesTokenizer()
    rows = [tokenizer.encode_to_tensor("hello world, " * 20), tokenizer.encode_to_tensor("short")]
    rows.append(torch.tensor([4, 10, 11, 2, 5]))  # [CLS] ... [EOS] [SEP]: specials stay unmasked
    collate = MLMCollator.for_tokenizer(tokenizer, mask_prob=0.5, generator=torch.Generator().manual_seed(1))
    labels, x, pad_mask = collate(rows)
    assert x.shape == (3, len(rows[0]))
    assert pad_mask[1, 5:].all() and not pad_mask[1, :5].any() and not pad_mask[0].any()
    assert (x[pad_mask] == 0).all() and (labels[pad_mask] == -100).all()
    assert (labels[2, [0, 3, 4]] == -100).all() and torch.equal(x[2, [0, 3, 4]], torch.tensor([4, 2, 5]))
    assert (labels[0] != -100).any()  # with mask_prob 0.5 the long row has selections


def test_seeded_masking_is_reproducible_and_validated():
    ids = torch.randint(6, 262, (4, 64))
    a = MLMCollator(generator=torch.Generator().manual_seed(3))(ids)
    b = MLMCollator(generator=torch.Generator().manual_seed(3))(ids)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="mask_prob"):
        MLMCollator(mask_prob=0.0)
    with pytest.raises(ValueError, match="empty batch"):
        MLMCollator()([])


def test_whole_word_masking_gives_each_word_one_fate():
    tokenizer = BytesTokenizer()
    words = [f"w{i}x{'y' * (i % 4)}" for i in range(3000)]
    ids = tokenizer.encode_to_tensor(" ".join(words))[None]
    collate = MLMCollator.for_tokenizer(tokenizer, generator=torch.Generator().manual_seed(2), whole_word=True)
    labels, x, _ = collate(ids)
    assert (labels[ids == ord(" ") + 6] == -100).all()  # whitespace is never selected
    fates, start = [], 0
    for word in words:
        span = slice(start, start + len(word))
        selected = labels[0, span] != -100
        assert selected.all() or not selected.any()  # a word is selected as a whole
        if selected.all():
            masked = x[0, span] == 3
            assert masked.all() or not masked.any()  # ... and masked as a whole (or not at all)
            fates.append("mask" if masked.all() else "kept" if torch.equal(x[0, span], ids[0, span]) else "random")
        start += len(word) + 1
    assert len(fates) / len(words) == pytest.approx(0.15, abs=0.02)
    assert fates.count("mask") / len(fates) == pytest.approx(0.8, abs=0.06)
