"""Data: the UTF-8 bytes tokenizer, text corpora packed for causal language modelling, and MLM masking."""

from perceiver_fast.data.mlm import MLMCollator
from perceiver_fast.data.text import (
    CLMCollator,
    CLMData,
    TokenChunks,
    TokenizedCorpus,
    default_cache_dir,
    load_hub_documents,
    pack_chunks,
    prepare_clm_data,
    read_documents,
    resolve_data_files,
    split_train_valid,
    stdlib_source_files,
    tokenize_corpus,
    tokenize_documents,
)
from perceiver_fast.data.tokenizer import BytesTokenizer, IncrementalDecoder

__all__ = [
    "BytesTokenizer",
    "CLMCollator",
    "CLMData",
    "IncrementalDecoder",
    "MLMCollator",
    "TokenChunks",
    "TokenizedCorpus",
    "default_cache_dir",
    "load_hub_documents",
    "pack_chunks",
    "prepare_clm_data",
    "read_documents",
    "resolve_data_files",
    "split_train_valid",
    "stdlib_source_files",
    "tokenize_corpus",
    "tokenize_documents",
]
