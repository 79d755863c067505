"""Input pipeline: text corpora -> packed, document-masked, resumable batches (grain). Knows nothing about
the model; the only JAX it touches is `to_global_batch` (and jax.process_index/count as defaults).

Public API
----------
    from input_pipeline import DataConfig, Source, make_dataset, to_global_batch

    Source(paths, format="text", weight=1.0, field="text", separator=None, drop_unterminated=False,
           hf_split="train", overlong="error", mask_special=False)
        paths: files / globs (tuple or one str); format: "text" | "jsonl" | "parquet" | "array_record" | "hf"
        | "prepared" (a directory written by `python -m input_pipeline.prepare`) | "chat" | "preference" (SFT and
        DPO JSONL rows, chat.py: rendered in the Llama 3.1 chat format, loss-masked, packed whole; overlong=
        "error" | "drop", mask_special for preference) | "segments" (pre-training text with a loss weight per
        span, JSONL {"segments": [{"text", "weight"}]}, chat.py; packed whole; overlong as for chat).
        separator (text only): None = one document per file, "<|endoftext|>", or BLANK_LINES ("\\n\\n": runs of
        blank lines).

    DataConfig(sources, shuffle=True, num_epochs=None, mask_document_boundary=True, utf8_errors="replace",
               num_threads=4, read_buffer=16, prefetch=4, holdout=0.0)
        holdout: share of each source's documents left out of training by a hash of each (sources.hash_split);
        frozen; .to_dict() / DataConfig.from_dict(d) (JSON-able, for the train config);
        DataConfig.from_paths(*paths, format=..., separator=..., num_epochs=...) for one source.

    make_dataset(config, tokenizer, *, seq_len, global_batch_size, seed, process_index=None,
                 process_count=None) -> BatchIterator
        tokenizer: anything with encode(text, *, bos, eos) -> list[int], bos_id, eos_id, vocab_size
        (llama.tokenizer.load_tokenizer(path)); may be None when every source is "prepared".
        process_index/count default to jax.process_index()/jax.process_count().

    BatchIterator: next(it) -> {"tokens", "targets", "segment_ids", "positions": int32 [B_local, T],
                                "loss_mask": float32 [B_local, T]}, B_local = global_batch_size/process_count,
                   T = seq_len exactly.
        it.get_state() -> JSON-serialisable dict (save it in the train checkpoint);
        it.set_state(state): the next batches are exactly those of an uninterrupted run (raises DataError if
        the state came from another seq_len/batch/seed/process layout/sources/tokenizer).
        it.stats: per-source counts (documents, empty files/documents skipped, UTF-8 replacements, ...).
        it.close() (stops the read/prefetch threads; `with make_dataset(...) as it:` closes it too).

    to_global_batch(batch, mesh) -> dict of jax.Array [B_global, T], sharded with
        sharding.rules.batch_sharding (= sharding.distributed.global_batch: make_array_from_process_local_data).

    prepare_corpus(source, tokenizer, out_dir, *, utf8_errors="replace", num_shards=None, num_threads=4,
            overwrite=False, progress=True) -> index dict      (CLI: python -m input_pipeline.prepare)

Batch semantics (see packing.py): documents are [BOS ... EOS], concatenated and cut into rows of T tokens;
targets are the next token of that stream. segment_ids 1, 2, ... per document within a row, 0 = padding;
positions restart at 0 per document and continue when a document carries over into the next row (where it
gets a new segment id). loss_mask is 0 on padding and, with mask_document_boundary, on each EOS (whose target
would be the next document's BOS). No token is dropped: with num_epochs=None the stream never ends; with a
finite num_epochs the last row and last batch are padded. Rows of the chat, preference and segments formats
are whole documents (chat.py) and their loss_mask is the per-token weight of each target (0/1 for chat and
preference, the segment's non-negative integer weight for segments); the trainer's loss is the weighted sum of
the token losses divided by the batch's summed weights (llama/train.py `_objective`).

Errors on bad input are `DataError` (a ValueError) naming the file, field or flag (see sources.py).
"""

from input_pipeline.packing import KEYS, PAD_ID
from input_pipeline.pipeline import BatchIterator, DataConfig, make_dataset, to_global_batch
from input_pipeline.prepared import open_prepared, prepare_corpus
from input_pipeline.sources import BLANK_LINES, WEIGHTED_FORMATS, DataError, Source
from input_pipeline.tokenize import Tokenizer, encode_document, tokenizer_info

__all__ = ["BLANK_LINES", "KEYS", "PAD_ID", "WEIGHTED_FORMATS", "BatchIterator", "DataConfig", "DataError", "Source",
           "Tokenizer", "encode_document", "make_dataset", "open_prepared", "prepare_corpus", "to_global_batch",
           "tokenizer_info"]
