"""The pipeline: sources -> shuffled, mixed, per-process documents -> tokens -> packed rows -> batches.

    per source: documents (random access) --shuffle(seed_i), new order each epoch--> repeat(num_epochs)
    all sources: mix by weight (grain MapDataset.mix) -> this process's share: [process_index::process_count]
    -> blocks of 32 documents -> tokenize (on the fly, `num_threads` grain threads) or read prepared ids
    -> pack into rows of seq_len
    -> batch (global_batch_size / process_count rows) -> background thread prefetch of `prefetch` batches

Everything before packing is a grain MapDataset indexed by position, so order depends only on the seed, and
the iterator state is one index plus an offset into a document (see packing.py): exact resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import grain
import numpy as np

from input_pipeline import packing
from input_pipeline.chat import ChatPackIterDataset, open_chat
from input_pipeline.prepared import open_prepared
from input_pipeline.sources import UTF8_ERRORS, WEIGHTED_FORMATS, DataError, Source, hash_split, open_documents
from input_pipeline.tokenize import Tokenizer, encode_document, tokenizer_info

STATE_VERSION = 1
# Documents per grain element: amortises grain's per-element cost; part of the state's meaning (fingerprint).
DOCS_PER_READ = 32


@dataclass(frozen=True)
class DataConfig:
    """What to read and how. Shapes, seed and process layout are arguments of `make_dataset`.

    sources: one or more `Source`s; with several, documents are drawn in proportion to their weights.
    shuffle: global shuffle of each source's documents, a new permutation each epoch (seeded).
    num_epochs: None = repeat forever (training; no remainder at all); an int = stop after that many epochs
      (of the first source to run out, when mixing); the last row and last batch are then padded (loss_mask 0),
      so no token is dropped.
    mask_document_boundary: loss_mask 0 on each document's EOS, whose target is the next document's BOS.
    utf8_errors: "replace" (count U+FFFD replacements, see `BatchIterator.stats`) or "strict" (raise).
    num_threads: threads reading and tokenizing documents (grain ReadOptions.num_threads).
    read_buffer: blocks of DOCS_PER_READ documents read ahead by those threads (ReadOptions.prefetch_buffer_size).
    prefetch: batches packed ahead by a background thread (0 = pack in the caller's thread).
    holdout: share of every source's documents left out, chosen by a stable hash of each document
      (`sources.hash_split`; the trainer evaluates on them, llama/eval.py); 0 = none.
    """

    sources: tuple[Source, ...]
    shuffle: bool = True
    num_epochs: int | None = None
    mask_document_boundary: bool = True
    utf8_errors: str = "replace"
    num_threads: int = 4
    read_buffer: int = 16
    prefetch: int = 4
    holdout: float = 0.0

    def __post_init__(self):
        sources = (self.sources,) if isinstance(self.sources, Source) else tuple(self.sources)
        object.__setattr__(self, "sources", sources)
        if not sources:
            raise DataError("DataConfig.sources is empty")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"DataConfig.num_epochs must be None or >= 1, got {self.num_epochs}")
        if self.utf8_errors not in UTF8_ERRORS:
            raise DataError(f"DataConfig.utf8_errors={self.utf8_errors!r}: expected one of {UTF8_ERRORS}")
        if self.num_threads < 0 or self.read_buffer < 0 or self.prefetch < 0:
            raise DataError(f"DataConfig num_threads/read_buffer/prefetch must be >= 0, got "
                            f"{self.num_threads}/{self.read_buffer}/{self.prefetch}")

    @classmethod
    def from_paths(cls, *paths: str, **kwargs) -> "DataConfig":
        """One source from paths; `format`, `field`, `separator`, `drop_unterminated`, `hf_split` go to the
        Source, everything else to the DataConfig."""
        src_keys = {f.name for f in dataclasses.fields(Source)} - {"paths"}
        src = Source(paths, **{k: kwargs.pop(k) for k in list(kwargs) if k in src_keys})
        return cls(sources=(src,), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = [s.to_dict() for s in self.sources]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = dict(d)
        d["sources"] = tuple(Source(**s) for s in d["sources"])
        return cls(**d)


def _process_layout(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults; the pipeline itself needs no JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def _source_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def _pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The last batch of a finite run, completed with padding rows so every batch has the same shape."""
    n = batch["tokens"].shape[0]
    if n == rows:
        return batch
    pad = packing.empty_rows(rows - n, batch["tokens"].shape[1])
    return {k: np.concatenate([batch[k], pad[k]]) for k in packing.KEYS}


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Process-local batches {"tokens","targets","segment_ids","positions","loss_mask"}, each [B_local, T].

    get_state() -> JSON-serialisable dict; set_state(state) makes the next batch the one an uninterrupted run
    would have produced next. The state records the configuration it belongs to and refuses another one.
    """

    def __init__(self, ds: grain.IterDataset, docs, fingerprint: dict[str, Any]):
        self._ds, self._docs, self._fingerprint = ds, docs, fingerprint
        self._it = ds.__iter__()
        self.local_batch_size = fingerprint["global_batch_size"] // fingerprint["process_count"]
        self.seq_len = fingerprint["seq_len"]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise ValueError("this BatchIterator was closed; make a new one (and set_state) to continue")
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self._fingerprint, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = state["config"]
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            raise DataError(f"data iterator state belongs to another data configuration; differing (saved, now):"
                            f" {diff}")
        self._it.set_state(state["grain"])

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per source: files, documents and the counts of skipped or repaired input (see sources.py)."""
        return {d.name: dict(d.stats) for d in self._docs}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stops the prefetch threads. Also drops the grain iterator now, while the interpreter is whole
        (grain's __del__ at interpreter exit otherwise prints an ignored exception)."""
        if self._it is not None:
            self._it.close()
            self._it = None


def make_dataset(config: DataConfig, tokenizer: Tokenizer | None, *, seq_len: int, global_batch_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """Batches for this process: [global_batch_size // process_count, seq_len] each (see BatchIterator).

    tokenizer: used for text sources and checked against prepared ones; may be None if all are prepared.
    process_index/process_count: default to jax.process_index()/jax.process_count().
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    process_index, process_count = _process_layout(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                        f"process_count={process_count} (each process reads global_batch_size/process_count rows)")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in [0, 2**32), got {seed}")
    tok_info = tokenizer_info(tokenizer) if tokenizer is not None else None

    all_docs, datasets = [], []
    for i, src in enumerate(config.sources):
        if src.format in WEIGHTED_FORMATS:
            if tokenizer is None:
                raise DataError(f"source {src.paths} ({src.format}) needs a tokenizer")
            if len(config.sources) > 1:
                raise DataError(f"source {src.paths} ({src.format}): chat, preference and segments sources are not "
                                "mixed with others (their rows are packed whole, see chat.py); give it alone")
            docs = open_chat(src, tokenizer, seq_len=int(seq_len), progress=process_index == 0)
            docs = hash_split(docs, config.holdout, heldout=False) if config.holdout else docs
            ds = grain.MapDataset.source(docs)
        elif src.format == "prepared":
            docs = open_prepared(src.paths, tokenizer_check=tok_info)
            docs = hash_split(docs, config.holdout, heldout=False) if config.holdout else docs
            # Without a tokenizer, the first prepared source's identifies the ids; the others must agree.
            tok_info = tok_info or docs.indexes[0]["tokenizer"]
            ds = grain.MapDataset.source(docs)
        else:
            if tokenizer is None:
                raise DataError(f"source {src.paths} ({src.format}) is text: make_dataset needs a tokenizer")
            docs = open_documents(src, config.utf8_errors)
            docs = hash_split(docs, config.holdout, heldout=False) if config.holdout else docs
            ds = grain.MapDataset.source(docs).map(lambda text, tok=tokenizer: encode_document(tok, text))
        all_docs.append(docs)
        if config.shuffle:
            ds = ds.shuffle(_source_seed(seed, i))  # index_shuffle with seed + epoch: new order each epoch
        datasets.append(ds.repeat(config.num_epochs))
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
        datasets, [s.weight for s in config.sources])
    ds = ds[process_index::process_count]  # disjoint, complete shares of the (mixed) document stream
    ds = ds.batch(DOCS_PER_READ, batch_fn=list)  # blocks of consecutive documents of this share
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.read_buffer)
    if config.sources[0].format in WEIGHTED_FORMATS:  # whole documents per row (chat.py)
        rows = ChatPackIterDataset(ds.to_iter_dataset(read), seq_len=int(seq_len))
    else:
        rows = packing.PackIterDataset(ds.to_iter_dataset(read), seq_len=int(seq_len),
                                       mask_document_boundary=config.mask_document_boundary)
    local = global_batch_size // process_count
    batches = rows.batch(local, drop_remainder=False).map(lambda b: _pad_batch(b, local))
    if config.prefetch:
        from grain.experimental import ThreadPrefetchIterDataset

        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch)

    # What the state's meaning depends on. Paths are left out (data may move between runs); the number of
    # documents per source, and a prepared directory's own fingerprint, stand for the contents.
    sources = [{k: v for k, v in s.to_dict().items() if k != "paths"} | {"documents": len(d)}
               | ({"prepared": [ix["fingerprint"][:16] for ix in d.indexes]} if s.format == "prepared" else {})
               for s, d in zip(config.sources, all_docs)]
    fingerprint = {"sources": sources, "shuffle": config.shuffle, "num_epochs": config.num_epochs,
                   "mask_document_boundary": config.mask_document_boundary, "utf8_errors": config.utf8_errors,
                   "tokenizer": tok_info, "seq_len": int(seq_len), "global_batch_size": int(global_batch_size),
                   "seed": int(seed), "process_index": process_index, "process_count": process_count,
                   "docs_per_read": DOCS_PER_READ} | ({"holdout": config.holdout} if config.holdout else {})
    return BatchIterator(batches, all_docs, fingerprint)


def to_global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Process-local numpy batch [B_local, T] -> global jax.Arrays [B_local * process_count, T], batch over the
    mesh's data and fsdp axes and T over `context` (`sharding.rules.batch_sharding`, via
    jax.make_array_from_process_local_data). With a context axis > 1 the rows are first put in the causal
    load-balanced order (input_pipeline/context.py). The placement is `sharding.distributed.global_batch`."""
    from input_pipeline.context import mesh_context, to_load_balanced
    from sharding.distributed import global_batch

    return global_batch(to_load_balanced(batch, mesh_context(mesh)), mesh)
