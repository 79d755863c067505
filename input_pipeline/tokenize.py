"""The tokenizer interface the pipeline needs, and the one function that turns a document into ids.

Any object with `encode(text, *, bos, eos) -> list[int]`, `bos_id`, `eos_id` and `vocab_size` works; the
project's `llama.tokenizer.load_tokenizer(path)` returns one (Llama 3 tiktoken or SentencePiece). The pipeline
never imports it, so it stays independent of the model code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import numpy as np

# A fixed text whose ids identify a tokenizer beyond its vocabulary size (two tokenizers with the same size and
# special ids still disagree here). Mixed scripts and digits so that most BPE merge families are exercised.
_PROBE = "The quick brown fox, 1234567 jumps! Ünïcödé 日本語 <tags> \t tabs\n\nnew paragraph."


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """[BOS, ..., EOS] as int32: every document is delimited the same way (Llama 3 pre-training format)."""
    return np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """Identity of a tokenizer, stored with prepared data and in iterator state fingerprints."""
    probe = tokenizer.encode(_PROBE, bos=False, eos=False)
    return {"vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id),
            "probe_sha256": hashlib.sha256(json.dumps([int(i) for i in probe]).encode()).hexdigest()[:16]}
