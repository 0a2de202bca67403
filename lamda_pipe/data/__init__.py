"""The data path, raw text to training batches, in the order data flows:

* ``text_sources``: documents from local files (.txt, .jsonl, .parquet, .gz) or a Hugging Face
  dataset, checked before the first one is read;
* ``tokenizer``: the SentencePiece-style BPE tokenizer, its special tokens and its hash;
* ``prepare``: documents -> a prepared data dir (token files per split + meta.json), in parallel
  worker processes;
* ``loader``: a prepared dir (or a weighted mixture) -> deterministic micro-batches, resumable
  from one number, the samples consumed.

Nothing is imported here: the preparation workers import ``prepare`` and must not pay for torch,
which ``loader`` needs.
"""
