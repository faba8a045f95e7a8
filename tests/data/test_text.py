"""Text corpora: files -> documents -> ids (cached) -> packed chunks -> (labels, x, pad_mask)."""

import os
import re
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import perceiver_fast.data.text as text_module
from perceiver_fast.data import (
    BytesTokenizer,
    CLMCollator,
    TokenChunks,
    pack_chunks,
    prepare_clm_data,
    read_documents,
    resolve_data_files,
    split_train_valid,
    stdlib_source_files,
    tokenize_corpus,
    tokenize_documents,
)

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 20,
    "b.txt": "Größe, ça va? 🤗 [SEP] is plain text here.\n" * 10,
    "sub/c.py": "def f(x):\n    return x * 2\n" * 15,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, content in DOCS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


def test_resolve_data_files(corpus):
    files = resolve_data_files(corpus)
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.py"]
    assert resolve_data_files(str(corpus / "*.txt")) == files[:2]
    assert resolve_data_files([corpus / "b.txt", str(corpus / "**" / "*.txt")]) == [files[1], files[0]]
    with pytest.raises(ValueError, match="no data files match"):
        resolve_data_files(str(corpus / "missing*.txt"))
    with pytest.raises(TypeError):
        resolve_data_files([1])


def test_read_and_tokenize_documents(corpus):
    files = resolve_data_files(corpus)
    docs = read_documents(files)
    assert docs == [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.py"]]
    tokens = tokenize_documents(docs)
    tok = BytesTokenizer()
    expected = []
    for doc in docs:  # "[SEP]" in a file stays text: only the separator we add is a special token
        expected += tok.encode(doc, split_special_tokens=True) + [tok.eos_token_id]
    assert tokens.tolist() == expected
    assert tokenize_documents(docs[:1], separator_id=tok.sep_token_id)[-1].item() == tok.sep_token_id


def test_read_documents_rejects_invalid_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(ValueError, match="bad.txt"):
        read_documents([bad])


def test_chunks_and_collated_batches(corpus, tmp_path):
    data = prepare_clm_data(str(corpus), max_seq_len=32, valid_fraction=0.1, cache_dir=tmp_path / "cache")
    total = sum(len(d.encode()) + 1 for d in DOCS.values())
    assert data.num_tokens == total and data.num_documents == 3 and data.vocab_size == 262
    assert data.train.shape[1] == data.valid.shape[1] == 33
    assert data.train.shape[0] + data.valid.shape[0] == total // 33
    assert data.valid.shape[0] == round(total // 33 * 0.1)

    labels, x, pad_mask = CLMCollator()(list(TokenChunks(data.train))[:4])
    assert x.shape == labels.shape == pad_mask.shape == (4, 32)
    assert x.dtype == labels.dtype == torch.long and pad_mask.dtype == torch.bool and not pad_mask.any()
    assert torch.equal(labels[:, :-1], x[:, 1:])  # labels are the inputs shifted by one
    assert torch.equal(torch.cat([x, labels[:, -1:]], dim=1), data.train[:4].long())


def test_split_is_deterministic_and_disjoint():
    chunks = torch.arange(100 * 5).view(100, 5)
    train, valid = split_train_valid(chunks, valid_fraction=0.2, seed=7)
    train2, valid2 = split_train_valid(chunks, valid_fraction=0.2, seed=7)
    assert torch.equal(train, train2) and torch.equal(valid, valid2)
    assert valid.shape == (20, 5) and train.shape == (80, 5)
    rows = sorted(train[:, 0].tolist() + valid[:, 0].tolist())
    assert rows == list(range(0, 500, 5))
    _, valid3 = split_train_valid(chunks, valid_fraction=0.2, seed=8)
    assert not torch.equal(valid, valid3)
    train, valid = split_train_valid(chunks[:1], valid_fraction=0.5)
    assert train.shape[0] == 1 and valid.shape[0] == 0
    with pytest.raises(ValueError, match="valid_fraction"):
        split_train_valid(chunks, valid_fraction=1.0)


def test_cache_hit_does_not_tokenize_again(corpus, tmp_path, monkeypatch):
    calls = []
    real = text_module.tokenize_documents

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_module, "tokenize_documents", counting)
    cache = tmp_path / "cache"
    first = prepare_clm_data(str(corpus), max_seq_len=16, cache_dir=cache)
    second = prepare_clm_data(str(corpus), max_seq_len=16, cache_dir=cache)
    assert len(calls) == 1 and not first.from_cache and second.from_cache
    assert torch.equal(first.train, second.train) and torch.equal(first.valid, second.valid)
    assert len(list((cache / "tokens").glob("*.pt"))) == 1

    # A different chunk length or split reuses the same token cache...
    prepare_clm_data(str(corpus), max_seq_len=8, valid_fraction=0.3, cache_dir=cache)
    assert len(calls) == 1
    # ... while an edited file, or another separator, tokenizes again.
    path = corpus / "a.txt"
    path.write_text(DOCS["a.txt"] + "one more line\n", encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    edited = prepare_clm_data(str(corpus), max_seq_len=16, cache_dir=cache)
    assert len(calls) == 2 and edited.num_tokens == first.num_tokens + len("one more line\n")
    tokenize_corpus(resolve_data_files(corpus), separator_id=5, cache_dir=cache)
    assert len(calls) == 3


def _one_file_corpus(tmp_path: Path, name: str = "a.txt", text: str = "one two three\n" * 20) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _payload_not_a_cache(path: Path) -> None:
    torch.save([1, 2, 3], path)


def _payload_tokens_not_a_tensor(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "tokens": saved["tokens"].tolist()}, path)  # under the right key


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # a kill mid-copy, a full disk
        lambda path: path.write_bytes(b""),
        lambda path: path.write_bytes(b"x" * 100),
        _payload_not_a_cache,
        _payload_tokens_not_a_tensor,
    ],
    ids=["truncated", "empty", "garbage", "not a cache", "malformed"],
)
def test_an_unusable_token_cache_is_rebuilt_with_a_warning_naming_it(damage, tmp_path):
    """torch.load's own errors (EOFError, OSError 22) name no file and stopped the run: a cache is only a shortcut."""
    path = _one_file_corpus(tmp_path)
    fresh = tokenize_corpus([path], cache_dir=tmp_path / "cache")
    damage(fresh.cache_path)
    with pytest.warns(UserWarning, match=re.escape(f"ignoring the token cache {fresh.cache_path}: ")):
        rebuilt = tokenize_corpus([path], cache_dir=tmp_path / "cache")
    assert not rebuilt.from_cache and torch.equal(rebuilt.tokens, fresh.tokens)
    assert rebuilt.num_bytes == fresh.num_bytes and rebuilt.num_documents == fresh.num_documents
    again = tokenize_corpus([path], cache_dir=tmp_path / "cache")  # the bad file was overwritten
    assert again.from_cache and torch.equal(again.tokens, fresh.tokens)


def test_a_token_cache_recording_another_key_is_not_served(tmp_path):
    """A cache file copied or restored under another corpus's name holds that corpus's tokens: its key tells."""
    mine = _one_file_corpus(tmp_path, "mine.txt", "alpha beta\n" * 20)
    other = tokenize_corpus([_one_file_corpus(tmp_path, "other.txt", "gamma\n" * 7)], cache_dir=tmp_path)
    expected = tokenize_corpus([mine], cache_dir=tmp_path)
    expected.cache_path.write_bytes(other.cache_path.read_bytes())
    with pytest.warns(UserWarning, match=re.escape(str(expected.cache_path)) + ".*made for another corpus"):
        served = tokenize_corpus([mine], cache_dir=tmp_path)
    assert torch.equal(served.tokens, expected.tokens) and not served.from_cache
    assert tokenize_corpus([mine], cache_dir=tmp_path).from_cache


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_cache_write_leaves_no_temp_file(interruption, tmp_path, monkeypatch):
    """A write killed by Ctrl-C or a full disk must not leave its temp file (gigabytes for a big corpus) behind."""
    path = _one_file_corpus(tmp_path)

    def save_then_fail(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 the first bytes")
        raise interruption

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(type(interruption)):
        tokenize_corpus([path], cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []
    monkeypatch.undo()
    assert not tokenize_corpus([path], cache_dir=tmp_path / "cache").from_cache


def test_stale_cache_temp_files_are_swept_when_the_cache_is_written(tmp_path):
    """A kill -9 cannot remove its temp file: the next write removes those a day old, never another run's fresh one
    or a file that is not a cache temp file."""
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    stale, fresh, unrelated = tokens_dir / f"{'a' * 24}.tmp41", tokens_dir / f"{'b' * 24}.tmp42", tokens_dir / "x.tmp1"
    two_days_ago = time.time() - 2 * 24 * 3600
    for leftover in (stale, fresh, unrelated):
        leftover.write_bytes(b"partial")
    for old in (stale, unrelated):
        os.utime(old, (two_days_ago, two_days_ago))
    corpus = tokenize_corpus([_one_file_corpus(tmp_path)], cache_dir=tmp_path)
    assert sorted(p.name for p in tokens_dir.iterdir()) == sorted([corpus.cache_path.name, fresh.name, "x.tmp1"])


def test_the_cache_is_forced_to_disk_before_it_is_renamed_into_place(tmp_path, renames):
    """A rename can reach the disk before the data it names: after a power cut the cache would be empty or torn."""
    corpus = tokenize_corpus([_one_file_corpus(tmp_path)], cache_dir=tmp_path)
    assert (corpus.cache_path.name, True) in renames


def test_random_truncation_keeps_min_length():
    chunks = torch.randint(6, 262, (4, 65))
    collate = CLMCollator(random_truncation=True, min_seq_len=16, generator=torch.Generator().manual_seed(0))
    lengths = set()
    for _ in range(200):
        labels, x, pad_mask = collate(chunks)
        n = x.shape[1]
        assert 16 <= n <= 64 and labels.shape == pad_mask.shape == (4, n)
        assert torch.equal(x, chunks[:, :n]) and torch.equal(labels, chunks[:, 1 : n + 1])  # the start is kept
        lengths.add(n)
    assert {16, 64} <= lengths and len(lengths) > 30
    # Seeded generators give the same lengths.
    a = CLMCollator(True, 16, torch.Generator().manual_seed(3))
    b = CLMCollator(True, 16, torch.Generator().manual_seed(3))
    assert [a(chunks)[1].shape[1] for _ in range(5)] == [b(chunks)[1].shape[1] for _ in range(5)]
    with pytest.raises(ValueError, match="min_seq_len"):
        CLMCollator(random_truncation=True)
    with pytest.raises(ValueError, match="longer than"):
        CLMCollator(True, 100)(chunks)


def test_tiny_stdlib_selection(tmp_path):
    cap = 60_000
    files = stdlib_source_files(max_bytes=cap)
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and files == stdlib_source_files(max_bytes=cap)
    assert sum(f.stat().st_size for f in files) <= cap or len(files) == 1
    assert all(f.suffix == ".py" and not f.name.startswith("test_") for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in rel for part in f.split("/"))
    data = prepare_clm_data(max_seq_len=64, stdlib_max_bytes=cap, cache_dir=tmp_path)
    assert data.train.shape[1] == 65 and data.num_documents == len(files)
    assert abs(data.bits_per_byte(1.0) - 1.0 / 0.6931 / data.bytes_per_token) < 1e-3


def test_other_tokenizers(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(DOCS.values(), trainer)
    with pytest.raises(ValueError, match="separator_id"):
        prepare_clm_data(str(corpus), max_seq_len=8, tokenizer=tok, cache_dir=tmp_path)
    eos = tok.token_to_id("<eos>")
    data = prepare_clm_data(str(corpus), max_seq_len=8, tokenizer=tok, separator_id=eos, cache_dir=tmp_path)
    assert data.vocab_size == tok.get_vocab_size() and data.bytes_per_token > 1.5  # BPE merges bytes
    assert (data.train == eos).any()


def test_bad_input():
    with pytest.raises(ValueError, match="fewer than one chunk"):
        pack_chunks(torch.arange(5), 6)
    with pytest.raises(ValueError, match="1-D"):
        pack_chunks(torch.zeros(2, 3), 2)
    with pytest.raises(TypeError, match="encode"):
        tokenize_documents(["x"], tokenizer=object())
    with pytest.raises(TypeError, match="str"):
        tokenize_documents([b"bytes"])
    with pytest.raises(ValueError, match="out of range"):
        tokenize_documents(["x"], separator_id=262)
    with pytest.raises(ValueError, match="no local files match"):
        prepare_clm_data("surely-not-a-local-file-or-cached-dataset-xyz", max_seq_len=8)


def test_a_string_that_can_only_be_a_local_path_fails_at_once(tmp_path, monkeypatch):
    """Offline, a hub lookup of a mistyped path retries for long: a path that names nothing raises immediately."""
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was tried as a hub dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for data in [str(tmp_path / "notes.txt"), "./notes", "~/no-such-notes", "corpus.txt"]:
        with pytest.raises(FileNotFoundError, match="no such file"):
            prepare_clm_data(data, max_seq_len=16, cache_dir=tmp_path)


def test_a_local_dataset_folder_is_cached_by_its_files(tmp_path, monkeypatch):
    """A directory without text-suffix files is read by ``datasets`` as a dataset folder, however it is spelled; its
    token cache is keyed by its files, so another folder of the same name or an edited file is read again."""
    import json

    for run, rows in (("one", ["def f(x): return x\n"] * 30), ("two", ["完全に別のコーパス\n"] * 90)):
        folder = tmp_path / run / "corp"
        folder.mkdir(parents=True)
        (folder / "a.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path / "one")
    first = prepare_clm_data("corp", max_seq_len=16, cache_dir=cache)
    assert prepare_clm_data("./corp", max_seq_len=16, cache_dir=cache).from_cache  # the same folder
    monkeypatch.chdir(tmp_path / "two")
    second = prepare_clm_data("corp", max_seq_len=16, cache_dir=cache)
    assert not second.from_cache and second.num_documents == 90 and first.num_documents == 30


def test_files_under_an_excluded_directory_are_left_out(corpus, tmp_path):
    """Training passes its output directory: ``data="."`` must not take in the run's checkpoints, logs and configs."""
    run = corpus / "runs" / "a"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,loss\n0,5.5\n")
    (run / "config.json").write_text("{}")
    everything = prepare_clm_data(str(corpus), max_seq_len=16, cache_dir=tmp_path / "cache")
    kept = prepare_clm_data(str(corpus), max_seq_len=16, cache_dir=tmp_path / "cache", exclude=[run])
    assert everything.num_documents == len(DOCS) + 2 and kept.num_documents == len(DOCS)
    assert all(not f.is_relative_to(run.resolve()) for f in kept.files)
    with pytest.raises(ValueError, match="the run's own output directory"):
        prepare_clm_data(str(run), max_seq_len=16, cache_dir=tmp_path / "cache", exclude=[run])


# ---------------------------------------------------------------------------------------------------- what is cached

WORDS = ["[UNK]", "[EOS]", "[PAD]", "red", "green", "blue"]
EOS = WORDS.index("[EOS]")


def _word_level(words):
    """An in-memory `tokenizers.Tokenizer` with the ids in the order of `words` and ``[EOS]`` as a special token."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[EOS]"])
    return tok


def _same_class_same_size(kind):
    """Two tokenizers of one class and one vocabulary size, neither with a name or path, that give other ids."""
    if kind == "tokenizers":  # the same rules, but one reads a literal "[EOS]" in the text as plain words
        first, second = _word_level(WORDS), _word_level(WORDS)
        second.encode_special_tokens = True
        return first, second
    transformers = pytest.importorskip("transformers")
    if kind == "transformers fast":
        swapped = WORDS[:3] + WORDS[:2:-1]  # the colours in the opposite order
        return tuple(
            transformers.PreTrainedTokenizerFast(
                tokenizer_object=_word_level(words), eos_token="[EOS]", clean_up_tokenization_spaces=False
            )
            for words in (WORDS, swapped)
        )
    first, second = (transformers.PerceiverTokenizer(clean_up_tokenization_spaces=False) for _ in range(2))
    first.add_tokens(["red"])  # a slow tokenizer: one more token each, not the same one
    second.add_tokens(["blue"])
    return first, second


@pytest.mark.parametrize("kind", ["tokenizers", "transformers fast", "transformers slow"])
def test_token_cache_never_serves_another_tokenizers_ids(kind, tmp_path):
    """A tokenizer retrained in place or built in memory has the same class, size and name as another: only its rules
    tell them apart, and the cache must see them, or one tokenizer trains on the other's ids."""
    text = "red green blue [EOS] red blue\n" * 4
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    first, second = _same_class_same_size(kind)

    def real_ids(tok):
        ids = tok.encode(text, add_special_tokens=False)
        return list(getattr(ids, "ids", ids)) + [EOS]

    assert real_ids(first) != real_ids(second)
    for tok in (first, second, first):
        corpus = tokenize_corpus([path], tok, separator_id=EOS, cache_dir=tmp_path)
        assert corpus.tokens.tolist() == real_ids(tok)
    assert corpus.from_cache  # while each tokenizer still finds its own entry
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2


def test_a_tokenizer_whose_rules_cannot_be_told_is_not_cached(tmp_path):
    """Any object with `encode` is accepted, but nothing tells two of one class apart: caching them would mix ids up."""

    class CharTokenizer:
        def __init__(self, alphabet):
            self.alphabet, self.vocab_size, self.eos_token_id = alphabet, len(alphabet) + 1, len(alphabet)

        def encode(self, text):
            return [self.alphabet.index(c) for c in text]

    text = "abcabc\n" * 4
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    for alphabet in ("abc\n", "\ncba"):
        with pytest.warns(UserWarning, match="not cached"):
            corpus = tokenize_corpus([path], CharTokenizer(alphabet), cache_dir=tmp_path)
        assert corpus.tokens.tolist() == [alphabet.index(c) for c in text] + [4]
        assert not corpus.from_cache and corpus.cache_path is None
    assert not (tmp_path / "tokens").exists()


def test_truncation_or_padding_settings_never_cut_or_pad_documents(tmp_path):
    """A saved tokenizer.json often sets the model's input length: training documents must stay whole all the same."""
    tok = _word_level(WORDS)
    text = " ".join(WORDS[3 + i % 3] for i in range(300)) + "\n"
    expected = tok.encode(text, add_special_tokens=False).ids + [EOS]
    assert len(expected) == 301

    tok.enable_truncation(max_length=16)
    assert tokenize_documents([text], tok, separator_id=EOS).tolist() == expected
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    assert tokenize_corpus([path], tok, separator_id=EOS, cache_dir=tmp_path).tokens.tolist() == expected
    tok.no_truncation()
    tok.enable_padding(pad_id=WORDS.index("[PAD]"), pad_token="[PAD]", length=1024)
    assert tokenize_documents([text], tok, separator_id=EOS).tolist() == expected
    assert tok.padding["length"] == 1024  # the caller's tokenizer keeps its settings

    # A transformers tokenizer around such a tokenizer, with a short model_max_length, keeps documents whole too.
    transformers = pytest.importorskip("transformers")
    tok.enable_truncation(max_length=16)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="[EOS]", model_max_length=16, clean_up_tokenization_spaces=False
    )
    assert tokenize_documents([text], fast).tolist() == expected


# ---------------------------------------------------------------------------------------------------- file names


def _same_size_files_with_glob_characters(root):
    """Files whose names are glob patterns matching another file of the same size: only the content tells them apart."""
    names = {"notes[1].txt": "first\n", "notes1.txt": "other\n", "v[23].txt": "third\n", "v2.txt": "forth\n"}
    for name, content in names.items():
        (root / name).write_text(content, encoding="utf-8")
    return [root / name for name in names]


def test_read_documents_takes_file_names_literally(tmp_path, monkeypatch):
    """``datasets.load_dataset`` reads data_files as glob patterns: ``notes[1].txt`` would read ``notes1.txt``."""
    import datasets

    files = _same_size_files_with_glob_characters(tmp_path)
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append(kwargs["data_files"])
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    assert read_documents(files) == [f.read_text(encoding="utf-8") for f in files]
    assert len(calls) == 1  # through datasets, not the plain reads


def test_read_documents_checks_what_datasets_returns(tmp_path, monkeypatch):
    """Should `datasets` ever return documents that cannot be the files' texts, the files are read directly instead."""
    import datasets

    files = [tmp_path / "short.txt", tmp_path / "long.txt"]
    for f, content in zip(files, ["short\r\n", "a longer text\r\n\r\n"]):
        f.write_bytes(content.encode())
    swapped = datasets.Dataset.from_dict({"text": ["a longer text\n\n", "short\n"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: swapped)
    assert read_documents(files) == ["short\n", "a longer text\n\n"]


def test_a_corpus_of_empty_documents_is_refused(tmp_path):
    # Only separators, no byte of text: nothing to learn, and bits per byte would divide by zero.
    folder = tmp_path / "empty"
    folder.mkdir()
    for name in ["a.txt", "b.txt", "c.txt"]:
        (folder / name).write_text("")
    with pytest.raises(ValueError, match="the corpus has no text: all 3 documents are empty"):
        prepare_clm_data(str(folder), max_seq_len=1, cache_dir=tmp_path / "cache")  # 3 separators: one chunk of 2
    data = text_module.CLMData(torch.ones(1, 2, dtype=torch.long), torch.ones(0, 2, dtype=torch.long), 262, 3, 0, 3)
    assert data.bits_per_byte(1.0) is None


class OffsetTokenizer:
    """Ids ``ord(char) % 50 + offset``: past its `vocab_size` (or below 0) for the offsets the test gives."""

    eos_token_id = 1

    def __init__(self, vocab_size, offset):
        self.vocab_size, self.offset = vocab_size, offset

    def encode(self, text):
        return [ord(char) % 50 + self.offset for char in text]


@pytest.mark.parametrize(
    "vocab_size, offset, bad",
    [(100, 60, 109), (1000, 65536, 65585), (100, -60, -13)],  # "abc" -> 47..49 + offset
    ids=["past vocab_size", "past int16 (wrapped silently in the cache's dtype)", "negative"],
)
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, vocab_size, offset, bad):
    tokenizer = OffsetTokenizer(vocab_size, offset)
    message = rf"\(OffsetTokenizer\) gave token id {bad}, outside its vocabulary \[0, {vocab_size}\)"
    with pytest.raises(ValueError, match=message):
        tokenize_documents(["abc"], tokenizer)
    (tmp_path / "doc.txt").write_text("abc" * 20)
    with pytest.warns(UserWarning, match="not cached"), pytest.raises(ValueError, match=message):
        tokenize_corpus([tmp_path / "doc.txt"], tokenizer, cache_dir=tmp_path / "cache")
