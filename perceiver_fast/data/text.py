"""Text corpora for causal language modelling: files -> documents -> ids -> packed chunks -> ``(labels, x, pad_mask)``.

The pipeline, one function per step:

1. `resolve_data_files` / `stdlib_source_files`: which files (a path, a directory, a glob; or, by default, the Python
   standard library's own ``.py`` sources, so the demo needs no download).
2. `read_documents`: one document per file, through ``datasets.load_dataset("text", sample_by="document")`` when the
   `datasets` package imports, else plain reads (same result). `load_hub_documents` reads a named dataset (online).
3. `tokenize_documents`: ids of each document followed by a separator token (EOS by default), concatenated.
   `tokenize_corpus` caches the result under a key made of the file list (paths, sizes, modification times), the
   tokenizer and the separator, so a second run reads one ``.pt`` file instead of tokenizing again.
4. `pack_chunks`: fixed chunks of ``max_seq_len + 1`` tokens (the remainder is dropped), so each chunk gives an input
   ``x = chunk[:-1]`` and labels ``chunk[1:]`` of ``max_seq_len`` tokens.
5. `split_train_valid`: a seeded, deterministic split of the chunks.
6. `CLMCollator`: stacks chunks into ``(labels, x, pad_mask)`` as perceiver-io's collator does, optionally truncating
   each batch at random.

`prepare_clm_data` runs steps 1-5 and returns a `CLMData`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perceiver_fast.data.tokenizer import BytesTokenizer
from perceiver_fast.durable import replace_atomically

DEFAULT_STDLIB_MAX_BYTES = 4_000_000

# Directories of the standard library that are not its own sources (installed packages), are test suites, or hold
# generated tables (codecs, pydoc topics): large and repetitive, not what a small demo model should learn Python from.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo"}
    | {"encodings", "pydoc_data"}
)
_TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".text", ".json", ".csv", ".html", ".xml", ".c", ".h", ".js")
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Where tokenized corpora are cached: ``$PERCEIVER_FAST_CACHE`` or ``~/.cache/perceiver_fast``."""
    return Path(os.environ.get("PERCEIVER_FAST_CACHE", Path.home() / ".cache" / "perceiver_fast"))


# ---------------------------------------------------------------------------------------------------- 1. files


def stdlib_source_files(max_bytes: int = DEFAULT_STDLIB_MAX_BYTES, root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, as many as fit in `max_bytes`.

    Test suites (``test/``, ``tests/``, ``test_*.py``), ``site-packages`` and a few non-library folders are left out.
    The selection is deterministic: relative paths are sorted and files are taken in that order until the next one
    would pass `max_bytes` (the first file is always taken).

    :param max_bytes: size cap of the selection in bytes.
    :param root: the library folder; by default ``sysconfig.get_paths()["stdlib"]``.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"standard library folder {root} does not exist")
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                candidates.append(Path(dirpath, name))
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())

    selected, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if selected and total + size > max_bytes:
            break
        selected.append(path)
        total += size
    if not selected:
        raise ValueError(f"no .py files found under {root}")
    return selected


def resolve_data_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand a file, a directory, a glob pattern, or a list of these into files.

    A directory gives its files with a text suffix (``.txt``, ``.py``, ``.md``, ``.rst``, ...), recursively, skipping
    hidden ones; name other files explicitly or with a glob.

    The result is sorted per entry and free of duplicates, so the same spec always gives the same order.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError("no data files given")
    files: list[Path] = []
    for item in specs:
        if not isinstance(item, (str, Path)):
            raise TypeError(f"data file entries must be str or Path, got {type(item).__name__}")
        path = Path(item).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in _visible_files(path) if p.suffix in _TEXT_SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"no data files match {str(item)!r}")
        files.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def _visible_files(directory: Path) -> Iterator[Path]:
    """The files below ``directory``, recursively, hidden ones (and those in hidden folders) aside."""
    return (p for p in directory.rglob("*") if p.is_file() and not _hidden(p, directory))


def _every_file(directory: Path) -> list[Path]:
    """Every visible file below ``directory``, resolved: what a dataset folder is made of."""
    return sorted(p.resolve() for p in _visible_files(directory))


def _without_excluded(files: list[Path], exclude: Sequence[str | Path], spec: Any) -> list[Path]:
    """``files`` less those under a directory of ``exclude``; ``ValueError`` (naming ``spec``) when none is left."""
    roots = [Path(d).expanduser().resolve() for d in exclude]
    kept = [f for f in files if not any(f.is_relative_to(root) for root in roots)]
    if files and not kept and spec is not None:
        where = ", ".join(str(r) for r in roots)
        raise ValueError(f"every file {str(spec)!r} matches is in the run's own output directory ({where})")
    return kept


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# ---------------------------------------------------------------------------------------------------- 2. documents


def read_documents(files: Sequence[str | Path]) -> list[str]:
    """Read each file as one UTF-8 document (universal newlines), in order.

    Uses ``datasets.load_dataset("text", data_files=..., sample_by="document")`` when `datasets` imports (it works
    offline for local files); otherwise reads the files directly, which gives the same documents. A file that is not
    valid UTF-8 raises `ValueError` naming it.

    `datasets` takes data files as glob patterns, so each path goes to it escaped (``notes[1].txt`` would otherwise
    read ``notes1.txt``), and only when its own resolver finds exactly that file for it; its documents are used only
    if each has a size its file's text can have. Otherwise the files are read directly.
    """
    files = [Path(f) for f in files]
    try:
        import datasets
    except ModuleNotFoundError:  # the optional `data` extra is not installed: plain reads do the same job
        datasets = None
    except Exception as e:  # installed but broken (e.g. an incompatible huggingface_hub): say so, then read directly
        warnings.warn(f"the datasets package failed to import ({e}); reading the text files directly", stacklevel=2)
        datasets = None
    if datasets is not None:
        paths = [os.path.abspath(f) for f in files]
        patterns = [glob.escape(p) for p in paths]
        try:
            if _patterns_name_exactly(patterns, paths):  # else e.g. "a::b.txt", which datasets reads as a URL chain
                ds = datasets.load_dataset("text", data_files=patterns, sample_by="document", split="train")
                documents = list(ds["text"])
                # One document per file (should datasets ever drop an empty file), each of its file's size.
                if len(documents) == len(files) and all(map(_could_be_read_from, documents, files)):
                    return documents
        except Exception as e:  # e.g. a file that is not UTF-8: the plain read below names the file
            warnings.warn(f"datasets could not load the files ({e}); reading them directly", stacklevel=2)
    documents = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                documents.append(fh.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not valid UTF-8 text: {e}") from None
    return documents


def _patterns_name_exactly(patterns: Sequence[str], paths: Sequence[str]) -> bool:
    """Whether the resolver that ``datasets.load_dataset`` uses finds each pattern's own file and nothing else."""
    from datasets.data_files import resolve_pattern

    for pattern, path in zip(patterns, paths):
        try:
            found = resolve_pattern(pattern, base_path=os.getcwd())
        except FileNotFoundError:
            return False
        if [os.path.normpath(f) for f in found] != [os.path.normpath(path)]:
            return False
    return True


def _could_be_read_from(document: str, path: Path) -> bool:
    """Whether `document` has a size that text read from `path` can have.

    Reading with universal newlines turns CR LF and a lone CR into LF, so the file has as many bytes as the document's
    UTF-8, plus at most one per newline. A cheap check, not a proof: it catches another file's text unless both have
    the same size.
    """
    size, num_bytes = path.stat().st_size, len(document.encode("utf-8"))
    return num_bytes <= size <= num_bytes + document.count("\n")


def load_hub_documents(name: str, split: str = "train", text_column: str = "text") -> list[str]:
    """Documents of a dataset by name or path through ``datasets.load_dataset`` (may need the network)."""
    try:
        import datasets
    except Exception as e:
        raise ValueError(f"loading dataset {name!r} needs a working `datasets` package: {e}") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise ValueError(f"could not load dataset {name!r} (split {split!r}): {e}") from e
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r} (columns: {ds.column_names})")
    return list(ds[text_column])


# ---------------------------------------------------------------------------------------------------- 3. tokens


@dataclass(frozen=True)
class _TokenizerInfo:
    encode: Callable[[str], torch.Tensor]
    vocab_size: int
    fingerprint: str | None  # None: nothing identifies the tokenizer's rules, so its ids are not cached
    default_separator: int | None


def _tokenizer_info(tokenizer: Any) -> _TokenizerInfo:
    """Adapt the bytes tokenizer, a `tokenizers.Tokenizer`, a transformers tokenizer, or any object with `encode`.

    Documents are encoded whole: a truncation or padding setting of the tokenizer (a saved ``tokenizer.json`` often
    carries the model's input length) would cut every document to that length or fill it with pad tokens.

    The fingerprint, part of the token cache's key, hashes the rules the ids come from, never a name: a tokenizer
    retrained in the same folder, or built in memory, has the same class, name and size as another one.

    - `tokenizers.Tokenizer`: its serialized form (normalizer, pre-tokenizer, model, added tokens) without truncation
      and padding, and whether it splits special tokens (not serialized);
    - fast transformers tokenizer: the same of its backend tokenizer, and its class and `split_special_tokens`;
    - slow transformers tokenizer: the vocabulary files it saves (vocabulary, merges or sentencepiece model), its
      vocabulary with added tokens and their flags, and its init settings (lower-casing, special tokens, ...);
    - any other object with `encode`: nothing tells two of one class apart (ids for a probe text would not prove the
      same ids for the corpus), so its ids are not cached (fingerprint None).
    """
    if isinstance(tokenizer, BytesTokenizer):
        # Training text is plain bytes: a literal "[SEP]" in a source file must not fake a document boundary.
        return _TokenizerInfo(
            lambda text: tokenizer.encode_to_tensor(text, split_special_tokens=True),
            tokenizer.vocab_size,
            "BytesTokenizer/v1",
            tokenizer.eos_token_id,
        )
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    if kind.startswith("tokenizers."):  # tokenizers.Tokenizer: encode(...) returns an Encoding
        whole = _without_truncation_or_padding(tokenizer)
        return _TokenizerInfo(
            lambda text: torch.tensor(whole.encode(text, add_special_tokens=False).ids, dtype=torch.long),
            whole.get_vocab_size(),
            f"{kind}/{_sha256(whole.to_str())}/split={getattr(whole, 'encode_special_tokens', False)}",
            None,
        )
    if _is_transformers_tokenizer(tokenizer):
        rules: str | None = None
        if tokenizer.is_fast:
            rules = _sha256(_without_truncation_or_padding(tokenizer.backend_tokenizer).to_str())
        else:
            try:
                rules = _slow_tokenizer_rules(tokenizer)
            except Exception:  # e.g. no save_vocabulary: its ids are not cached, as for any unknown tokenizer
                rules = None
        return _TokenizerInfo(
            # verbose=False: documents longer than model_max_length are expected here (they are packed), not an error
            lambda text: torch.tensor(
                tokenizer.encode(text, add_special_tokens=False, truncation=False, padding=False, verbose=False),
                dtype=torch.long,
            ),
            len(tokenizer),
            None if rules is None else f"{kind}/{rules}/split={getattr(tokenizer, 'split_special_tokens', False)}",
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
        )

    def encode(text: str) -> torch.Tensor:
        out = tokenizer.encode(text)
        return torch.as_tensor(getattr(out, "ids", out), dtype=torch.long)

    vocab_size = getattr(tokenizer, "vocab_size", None)
    if vocab_size is None and callable(getattr(tokenizer, "get_vocab_size", None)):
        vocab_size = tokenizer.get_vocab_size()
    if not isinstance(vocab_size, int):
        raise TypeError(f"cannot tell the vocabulary size of {kind}: give it a vocab_size attribute")
    return _TokenizerInfo(encode, vocab_size, None, getattr(tokenizer, "eos_token_id", None))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _without_truncation_or_padding(tokenizer: Any) -> Any:
    """A copy of a `tokenizers` tokenizer that neither truncates nor pads; the caller's keeps its settings."""
    import tokenizers

    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    if hasattr(copy, "encode_special_tokens"):  # whether a literal "[EOS]" is plain text; not part of to_str()
        copy.encode_special_tokens = getattr(tokenizer, "encode_special_tokens", False)
    return copy


def _is_transformers_tokenizer(tokenizer: Any) -> bool:
    # An instance means transformers is imported; importing it here would cost every other tokenizer seconds.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase)


def _slow_tokenizer_rules(tokenizer: Any) -> str:
    """A hash of a slow transformers tokenizer's rules (see `_tokenizer_info`).

    The vocabulary files are what `save_vocabulary` writes (from memory, or copied from where the tokenizer was
    loaded); ``name_or_path`` is left out, since a folder's name says nothing of what it holds. Settings that are not
    JSON go in by `repr`: one that holds a memory address only costs a cache miss.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(tokenizer.save_vocabulary(tmp)):
            digest.update(Path(path).read_bytes())
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k != "name_or_path"}
    added = {i: repr(token) for i, token in tokenizer.added_tokens_decoder.items()}  # lstrip, normalized, ...
    rules = [sorted(tokenizer.get_vocab().items()), sorted(added.items()), settings]
    digest.update(json.dumps(rules, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def tokenizer_vocab_size(tokenizer: Any = None) -> int:
    """The number of ids `tokenizer` can give, added tokens included (a transformers tokenizer's ``vocab_size``
    leaves them out: ``len(tokenizer)`` counts them). This is the vocabulary a model for its ids needs."""
    return _tokenizer_info(tokenizer if tokenizer is not None else BytesTokenizer()).vocab_size


def tokenize_documents(
    documents: Sequence[str], tokenizer: Any = None, separator_id: int | None = None
) -> torch.Tensor:
    """Tokenize and concatenate documents, each followed by `separator_id` (by default the tokenizer's EOS).

    :param documents: the texts.
    :param tokenizer: a `BytesTokenizer` (default), `tokenizers.Tokenizer`, transformers tokenizer, or any object
        with ``encode(text)`` returning ids.
    :return: a 1-D `torch.long` tensor.
    :raises ValueError: the tokenizer gave an id outside ``[0, vocab_size)``.
    """
    info = _tokenizer_info(tokenizer if tokenizer is not None else BytesTokenizer())
    separator = _separator(info, separator_id)
    sep = torch.tensor([separator], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be str, got {type(doc).__name__}")
        pieces += [info.encode(doc), sep]
    tokens = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    _check_token_range(tokens, info.vocab_size, tokenizer if tokenizer is not None else BytesTokenizer())
    return tokens


def _check_token_range(tokens: torch.Tensor, vocab_size: int, tokenizer: Any) -> None:
    """Refuse ids outside ``[0, vocab_size)``: the model's embedding has `vocab_size` rows, so such an id fails deep
    in the first step (or, past 32767 in an int16 cache, silently wraps to another token and trains on it)."""
    if not tokens.numel():
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_size:
        return
    bad = high if high >= vocab_size else low
    raise ValueError(
        f"the tokenizer ({type(tokenizer).__qualname__}) gave token id {bad}, outside its vocabulary [0, {vocab_size}) "
        f"(vocab_size {vocab_size}): its vocab_size must count every id its encode returns"
    )


def _separator(info: _TokenizerInfo, separator_id: int | None) -> int:
    separator = separator_id if separator_id is not None else info.default_separator
    if separator is None:
        raise ValueError("this tokenizer has no EOS token: pass separator_id")
    if not 0 <= separator < info.vocab_size:
        raise ValueError(f"separator_id {separator} is out of range [0, {info.vocab_size})")
    return separator


@dataclass
class TokenizedCorpus:
    """A corpus as one id sequence: `tokens` (1-D, int16/int32 to keep the cache small), and what it was made of."""

    tokens: torch.Tensor
    num_bytes: int
    num_documents: int
    vocab_size: int
    cache_path: Path | None = None
    from_cache: bool = False


def tokenize_corpus(
    files: Sequence[str | Path] | None = None,
    tokenizer: Any = None,
    separator_id: int | None = None,
    cache_dir: str | Path | None = None,
    dataset_name: str | None = None,
    use_cache: bool = True,
) -> TokenizedCorpus:
    """Read and tokenize `files` (or the named dataset), caching the ids on disk.

    The cache key hashes each file's absolute path, size and modification time (or the dataset name), the tokenizer's
    rules and the separator, so editing a file or changing the tokenizer re-tokenizes, and nothing else does. A
    tokenizer whose rules cannot be told (an object of another kind with `encode`, see `_tokenizer_info`) is not
    cached: it tokenizes on every call, with a warning. A cache file that cannot be read (truncated, empty), or that
    records another key, is tokenized again and overwritten, with a warning naming it.
    """
    if (files is None) == (dataset_name is None):
        raise ValueError("give either files or dataset_name")
    tokenizer = tokenizer if tokenizer is not None else BytesTokenizer()
    info = _tokenizer_info(tokenizer)
    separator = _separator(info, separator_id)
    if use_cache and info.fingerprint is None:
        warnings.warn(
            f"token ids are not cached for a {type(tokenizer).__qualname__}: nothing tells its rules from another "
            "tokenizer's of the same class (a tokenizers.Tokenizer or transformers tokenizer is cached)",
            stacklevel=2,
        )
        use_cache = False
    if files is not None:
        files = [Path(f).resolve() for f in files]
        if not files:
            raise ValueError("no data files given")
        source: Any = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    elif Path(dataset_name).expanduser().is_dir():
        # A local dataset folder (datasets reads it): its files, as for files given directly, or another folder of
        # the same name, or an edited file, would find the tokens of the first.
        folder = Path(dataset_name).expanduser()
        source = ["dataset folder", [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _every_file(folder)]]
    else:
        source = ["dataset", dataset_name]
    key = json.dumps({"format": _CACHE_FORMAT, "source": source, "tokenizer": info.fingerprint, "sep": separator})
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "tokens" / f"{digest}.pt"

    saved = _read_token_cache(cache_path, key) if use_cache else None
    if saved is not None:
        return TokenizedCorpus(
            saved["tokens"], saved["num_bytes"], saved["num_documents"], info.vocab_size, cache_path, True
        )

    documents = read_documents(files) if files is not None else load_hub_documents(dataset_name)
    tokens = tokenize_documents(documents, tokenizer, separator)
    # int16 holds any vocabulary below 32768 ids (the bytes tokenizer's 262): a quarter of int64 on disk and in memory.
    # No id wraps: tokenize_documents has checked that each is below vocab_size.
    tokens = tokens.to(torch.int16 if info.vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32)
    num_bytes = sum(len(d.encode("utf-8")) for d in documents)
    if use_cache:
        _write_token_cache(
            cache_path, {"tokens": tokens, "num_bytes": num_bytes, "num_documents": len(documents), "key": key}
        )
    return TokenizedCorpus(tokens, num_bytes, len(documents), info.vocab_size, cache_path if use_cache else None)


def _read_token_cache(cache_path: Path, key: str) -> dict[str, Any] | None:
    """The payload cached at `cache_path` for `key`, or None when there is none or it cannot be used.

    An unusable file (truncated, empty, not a torch file, another corpus's tokens) gets a warning naming it and is
    then tokenized again and overwritten by the caller: a cache is never worth a failed run, nor wrong tokens.
    """
    if not cache_path.is_file():
        return None
    try:
        saved = torch.load(cache_path, weights_only=True)
    except Exception as e:  # torch's own errors (EOFError, OSError 22, UnpicklingError) name no file
        problem = f"it cannot be read ({_describe_error(e)})"
    else:
        problem = _token_cache_problem(saved, key)
    if problem is None:
        return saved
    message = f"ignoring the token cache {cache_path}: {problem}; tokenizing again and overwriting it"
    warnings.warn(message, stacklevel=3)
    return None


def _token_cache_problem(saved: Any, key: str) -> str | None:
    """Why a loaded cache payload cannot be used, or None."""
    if not isinstance(saved, dict) or not {"tokens", "num_bytes", "num_documents", "key"} <= saved.keys():
        return "it does not hold a token cache (tokens, num_bytes, num_documents, key)"
    if saved["key"] != key:  # a file copied or restored under this name: its tokens come from another corpus
        return "it was made for another corpus, tokenizer or separator (the key it records differs)"
    tokens = saved["tokens"]
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in (torch.int16, torch.int32):
        return "its tokens are not a 1-D int16 or int32 tensor"
    if not all(isinstance(saved[name], int) and saved[name] >= 0 for name in ("num_bytes", "num_documents")):
        return "its num_bytes or num_documents is not a count"
    return None


def _describe_error(error: BaseException) -> str:
    """An error's type and the first line of its message (torch's can run to a dozen lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


# <digest>.tmp<pid>: the temp files _write_token_cache writes, and the only files its sweep may remove.
_TOKEN_CACHE_TEMP = re.compile(r"[0-9a-f]{24}\.tmp\d+")
# A write still running after a day is not one: its process died without removing the file (a kill -9, a power cut).
_STALE_TEMP_SECONDS = 24 * 3600


def _write_token_cache(cache_path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `cache_path` atomically: a temp file, forced to disk, then renamed over the old file.

    A concurrent or interrupted run never sees a half-written cache, and an interrupted write (an exception, Ctrl-C)
    removes its temp file, which for a big corpus holds gigabytes. Temp files that a killed process left behind are
    swept when they are a day old.
    """
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temp_files(cache_path.parent)
    temporary = cache_path.with_suffix(f".tmp{os.getpid()}")  # the name the sweep recognises (_TOKEN_CACHE_TEMP)
    replace_atomically(cache_path, lambda tmp: torch.save(payload, tmp), temporary)


def _sweep_stale_temp_files(directory: Path) -> None:
    """Remove the token-cache temp files in `directory` last written over a day ago (other runs' fresh ones stay)."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for path in directory.iterdir():
        if not _TOKEN_CACHE_TEMP.fullmatch(path.name):
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # swept by another run first, or not ours to remove: the sweep is housekeeping, never an error
            pass


# ---------------------------------------------------------------------------------------------------- 4-5. chunks


def pack_chunks(tokens: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Cut a 1-D id sequence into ``[num_chunks, chunk_len]`` (a view); the remainder at the end is dropped."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2 (an input and a label), got {chunk_len}")
    num_chunks = tokens.numel() // chunk_len
    if num_chunks == 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one chunk of {chunk_len}")
    return tokens[: num_chunks * chunk_len].view(num_chunks, chunk_len)


def split_train_valid(
    chunks: torch.Tensor, valid_fraction: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split chunks at random, reproducibly for a given `seed`; at least one chunk stays in training.

    With ``valid_fraction > 0`` and two or more chunks, validation gets ``max(1, round(n * valid_fraction))``.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n = chunks.shape[0]
    num_valid = 0 if valid_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return chunks[order[num_valid:]], chunks[order[:num_valid]]


class TokenChunks(torch.utils.data.Dataset):
    """A `Dataset` over the rows of a ``[num_chunks, chunk_len]`` tensor."""

    def __init__(self, chunks: torch.Tensor) -> None:
        if chunks.dim() != 2:
            raise ValueError(f"chunks must be 2-D, got shape {tuple(chunks.shape)}")
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.chunks[index]


# ---------------------------------------------------------------------------------------------------- 6. batches


class CLMCollator:
    """Stack chunks of ``n + 1`` tokens into ``(labels, x, pad_mask)``: ``x = chunk[:-1]``, ``labels = chunk[1:]``.

    This is the triple perceiver-io's collator gives its causal language model (``pad_mask`` True = pad; packed chunks
    have no padding, so it is all False).

    Random truncation: perceiver-io's ``random_train_truncation`` (its `RandomTruncateCollator`) shortens a whole
    batch at a time by cutting tokens off the *end* of every row, keeping the start; the number cut is drawn once per
    batch. Its documentation says the length is drawn from ``randint(random_min_seq_len, max_seq_len + 1)``, but its
    code draws the number cut from ``[1, n - min_seq_len]``, so the full length ``n`` never occurs. Here the length is
    uniform in ``[min_seq_len, n]``, the full length included. Because Perceiver AR's prefix is the sequence minus its
    latents, training on shorter batches teaches the model short prefixes (short prompts at generation time), and the
    model needs ``min_seq_len >= max_latents`` (the number of latents never exceeds the sequence).

    :param random_truncation: truncate each batch to a random length.
    :param min_seq_len: the shortest length truncation may give (required with `random_truncation`).
    :param generator: the random source for truncation (seed it to make batches reproducible).
    """

    def __init__(
        self,
        random_truncation: bool = False,
        min_seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if random_truncation and (min_seq_len is None or min_seq_len < 1):
            raise ValueError("random_truncation needs min_seq_len >= 1")
        self.random_truncation = random_truncation
        self.min_seq_len = min_seq_len
        self.generator = generator

    def __call__(
        self, chunks: Sequence[torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = chunks if isinstance(chunks, torch.Tensor) else torch.stack(list(chunks))
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"chunks must form a [batch, n + 1] tensor with n >= 1, got {tuple(batch.shape)}")
        batch = batch.long()
        x, labels = batch[:, :-1], batch[:, 1:]
        if self.random_truncation:
            n = x.shape[1]
            if self.min_seq_len > n:
                raise ValueError(f"min_seq_len {self.min_seq_len} is longer than the sequences ({n})")
            length = int(torch.randint(self.min_seq_len, n + 1, (1,), generator=self.generator))
            x, labels = x[:, :length], labels[:, :length]
        pad_mask = torch.zeros(x.shape, dtype=torch.bool)
        return labels.contiguous(), x.contiguous(), pad_mask


# ---------------------------------------------------------------------------------------------------- all together


@dataclass
class CLMData:
    """Packed training and validation chunks (``[num, max_seq_len + 1]``) and what the training loop needs to know."""

    train: torch.Tensor
    valid: torch.Tensor
    vocab_size: int
    num_tokens: int
    num_bytes: int
    num_documents: int
    files: list[Path] = field(default_factory=list)
    from_cache: bool = False

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token over the corpus, to turn a loss per token into bits per byte."""
        return self.num_bytes / max(1, self.num_tokens)

    def bits_per_byte(self, loss: float) -> float | None:
        """Convert a mean cross-entropy in nats per token into bits per byte of text; None for a corpus of no bytes.

        An approximation: the loss is divided by the bytes per token of the whole corpus (`bytes_per_token`), not of
        the tokens it was scored on. It is exact, up to the separators (one token of no bytes per document), when
        every token is one byte (the bytes tokenizer). With tokens of varying length (BPE, a character tokenizer on
        mixed scripts) the scored tokens can hold more or fewer bytes each than the corpus's mean: a validation
        split of 3-byte characters in a mostly 1-byte corpus is off by as much as their ratio.
        """
        if self.num_bytes == 0:
            return None
        return loss / math.log(2) / self.bytes_per_token


def refuse_empty_corpus(num_bytes: int, num_documents: int) -> None:
    """Refuse a corpus with no text: its tokens are only separators, which teach nothing, and it has no bytes to
    measure bits per byte against."""
    if num_bytes == 0:
        which = "its only document is" if num_documents == 1 else f"all {num_documents} documents are"
        raise ValueError(f"the corpus has no text: {which} empty")


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "wikitext", "owner/name"
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")  # ".txt", ".jsonl", ".gz"; not the ".2" of "v1.2"


def looks_like_local_path(data: str) -> bool:
    """Whether ``data`` can only mean a local path, not a Hugging Face hub dataset name.

    Local: it starts with ``.``, ``~`` or ``/``, holds a backslash or more than one ``/``, or ends in a file suffix
    (``notes.txt``). Hub names are ``name`` or ``owner/name`` without such a suffix, so ``owner/name`` is left to the
    hub when no such local path exists.
    """
    if data.startswith((".", "~", "/")) or "\\" in data or data.count("/") > 1:
        return True
    return bool(_FILE_SUFFIX.search(data)) or not _HUB_NAME.fullmatch(data)


def prepare_clm_data(
    data: str | Path | Sequence[str | Path] | None = None,
    max_seq_len: int = 512,
    tokenizer: Any = None,
    valid_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    stdlib_max_bytes: int = DEFAULT_STDLIB_MAX_BYTES,
    separator_id: int | None = None,
    exclude: Sequence[str | Path] = (),
) -> CLMData:
    """Files (or the standard library's sources when `data` is None) -> packed, split chunks of ``max_seq_len + 1``.

    `data` may be a file, a directory, a glob, a list of these, or, when no local file matches a string, the name of
    a dataset for ``datasets.load_dataset`` (network needed unless it is in the local Hugging Face cache), a local
    dataset folder among them (a directory without text files, read by ``datasets``). A string that can only be a
    local path (see `looks_like_local_path`) and names nothing raises ``FileNotFoundError``. Files under a directory
    in `exclude` are left out (training passes its output directory: a run must not train on its own checkpoints,
    logs and configs when `data` is a directory holding it).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    files: list[Path] = []
    dataset_name = None
    if data is None:
        files = stdlib_source_files(stdlib_max_bytes)
    else:
        try:
            files = _without_excluded(resolve_data_files(data), exclude, data)
        except ValueError:
            if not isinstance(data, str) or any(c in data for c in "*?["):
                raise
            local = Path(data).expanduser()
            if local.is_dir() and not _without_excluded(_every_file(local), exclude, None):
                raise  # only the run's own files are there
            if looks_like_local_path(data) and not local.is_dir():  # fail at once: offline, a hub lookup retries
                raise FileNotFoundError(f"no such file or directory: {data!r}") from None
            dataset_name = data  # no local text file of that name: try it as a dataset name (or dataset folder)
    try:
        corpus = tokenize_corpus(
            files or None, tokenizer, separator_id=separator_id, cache_dir=cache_dir, dataset_name=dataset_name
        )
    except ValueError as e:
        if dataset_name is None:
            raise
        if Path(dataset_name).expanduser().is_dir():
            suffixes = " ".join(_TEXT_SUFFIXES)
            raise ValueError(
                f"{data!r} is a directory without files of a text suffix ({suffixes}; name others with a glob such as "
                f"'{data.rstrip('/')}/*.jsonl'), and datasets could not read it as a dataset folder: {e}"
            ) from None
        raise ValueError(f"no local files match {data!r}, and {e}") from None
    refuse_empty_corpus(corpus.num_bytes, corpus.num_documents)
    chunks = pack_chunks(corpus.tokens, max_seq_len + 1)
    train, valid = split_train_valid(chunks, valid_fraction, seed)
    return CLMData(
        train=train,
        valid=valid,
        vocab_size=corpus.vocab_size,
        num_tokens=corpus.tokens.numel(),
        num_bytes=corpus.num_bytes,
        num_documents=corpus.num_documents,
        files=files,
        from_cache=corpus.from_cache,
    )
