"""Prepared corpora: tokenized once into ArrayRecord (`prepare_corpus`, CLI in prepare.py), read back as
random-access documents (`open_prepared`).

A prepared directory OUT_DIR holds `tokens-0000i-of-0000n.array_record` (one record per document: its
int32 little-endian ids, BOS..EOS included, in corpus order; the pipeline shuffles at read time) and
`index.json` (counts, the tokenizer's identity, each input file's size and SHA-256, the skipped/repaired
counts, and a fingerprint of all of it). It is written to a temporary sibling directory and renamed into
place when complete, so OUT_DIR is either absent or whole. Point a run at it with `Source(OUT_DIR, format="prepared")`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Sequence

import numpy as np

from input_pipeline.sources import DataError, Documents, Source, expand_paths, open_documents
from input_pipeline.tokenize import Tokenizer, encode_document, tokenizer_info
from llama import manifest  # staged directory writes, shared by every command that writes one

FORMAT_NAME = "llama-jax-prepared-tokens"
FORMAT_VERSION = 1
_SHARD_BYTES = 512 << 20  # target shard size: few enough files, small enough to copy around


def _file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def prepare_corpus(source: Source, tokenizer: Tokenizer, out_dir: str, *, utf8_errors: str = "replace",
            num_shards: int | None = None, num_threads: int = 4, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Tokenize every document of `source` into ArrayRecord shards under out_dir; returns the index."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if source.format == "prepared":
        raise DataError(f"{source.paths} is already prepared")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise DataError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    files = expand_paths(source.paths, allow_dirs=True) if source.format != "hf" or any(
        os.path.exists(p) for p in source.paths) else []
    # Replacing OUT_DIR must never delete an input, nor anything but an earlier prepared corpus.
    manifest.check_no_overlap(out_dir, {"input": files}, "OUT_DIR")
    manifest.check_replaceable(out_dir, "OUT_DIR", is_prepared, "a prepared corpus (index.json + tokens-*.array_record)")
    docs: Documents = open_documents(source, utf8_errors)
    inputs = [_file_digest(f) for f in files if os.path.isfile(f)]
    if num_shards is None:
        num_shards = max(1, min(len(docs), -(-sum(f["bytes"] for f in inputs) // _SHARD_BYTES)))
    if not 1 <= num_shards <= len(docs):
        raise DataError(f"--shards {num_shards}: must be between 1 and the number of documents ({len(docs)})")

    tmp = manifest.staging_dir(out_dir, overwrite=True)  # cleans staging a killed run left for out_dir
    try:
        names = [f"tokens-{s:05d}-of-{num_shards:05d}.array_record" for s in range(num_shards)]
        bounds = np.linspace(0, len(docs), num_shards + 1).astype(np.int64)  # contiguous, in corpus order
        num_tokens, max_len = 0, 0
        bar = tqdm(total=len(docs), unit="doc", desc=f"prepare {os.path.basename(out_dir)}", disable=not progress)
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            for s, name in enumerate(names):
                writer = ArrayRecordWriter(os.path.join(tmp, name), "group_size:1")  # 1: fastest random reads
                for lo in range(int(bounds[s]), int(bounds[s + 1]), 1024):
                    hi = min(lo + 1024, int(bounds[s + 1]))
                    for ids in pool.map(lambda i: encode_document(tokenizer, docs[i]), range(lo, hi)):
                        writer.write(ids.astype("<i4").tobytes())
                        num_tokens += len(ids)
                        max_len = max(max_len, len(ids))
                    bar.update(hi - lo)
                    bar.set_postfix(tokens=num_tokens)
                writer.close()
        bar.close()
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "int32", "bos_eos": True,
                 "num_documents": len(docs), "num_tokens": num_tokens, "max_document_tokens": max_len,
                 "shards": names, "shard_bounds": bounds.tolist(), "tokenizer": tokenizer_info(tokenizer),
                 "source": source.to_dict(), "inputs": inputs, "utf8_errors": utf8_errors, "stats": docs.stats}
        index["fingerprint"] = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
        index["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(tmp, "index.json"), "w") as fh:
            json.dump(index, fh, indent=1)
        manifest.commit_dir(tmp, out_dir)  # an old out_dir is moved aside, deleted only once replaced
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise manifest.naming(e, out_dir)
    return index


class PreparedDocuments(Documents):
    """Documents of one or more prepared directories: docs[i] is an int32 array [BOS, ..., EOS]."""

    def __init__(self, dirs: Sequence[str], indexes: list[dict]):
        import grain.python as gp

        self.name = "prepared:" + ",".join(dirs)
        self.indexes = indexes
        paths = [os.path.join(d, s) for d, ix in zip(dirs, indexes) for s in ix["shards"]]
        self._source = gp.ArrayRecordDataSource(paths)
        self.stats = {"files": len(paths), "documents": len(self._source),
                      "tokens": sum(ix["num_tokens"] for ix in indexes)}

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        return np.frombuffer(self._source[i], dtype="<i4").astype(np.int32, copy=False)


def is_prepared(path: str) -> bool:
    """A directory prepare_corpus wrote: index.json of this format and nothing but its shards beside it."""
    try:
        with open(os.path.join(path, "index.json")) as fh:
            index = json.load(fh)
        names = set(os.listdir(path))
    except (OSError, ValueError):
        return False
    return (isinstance(index, dict) and index.get("format") == FORMAT_NAME
            and names <= {"index.json", *index.get("shards", [])})


def read_index(path: str) -> dict[str, Any]:
    ix_path = os.path.join(path, "index.json")
    if not os.path.isfile(ix_path):
        raise DataError(f"{path}: not a prepared directory (no index.json); create one with "
                        f"`python -m input_pipeline.prepare {path} INPUT...`")
    try:
        with open(ix_path) as fh:
            index = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ix_path}: not valid JSON ({e}); prepare the corpus again") from None
    if not isinstance(index, dict):
        raise DataError(f"{ix_path}: expected a JSON object")
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise DataError(f"{ix_path}: format {index.get('format')!r} v{index.get('version')!r}, expected "
                        f"{FORMAT_NAME!r} v{FORMAT_VERSION}")
    for s in index["shards"]:
        if not os.path.isfile(os.path.join(path, s)):
            raise DataError(f"{path}: shard {s} listed in index.json is missing")
    return index


def open_prepared(paths: Sequence[str], tokenizer_check: dict[str, Any] | None = None) -> PreparedDocuments:
    """Prepared directories (globs allowed). A directory made with another tokenizer than tokenizer_check
    (tokenize.tokenizer_info of the run's tokenizer; default: the first directory's) is an error."""
    dirs = expand_paths(paths, allow_dirs=True)
    indexes = [read_index(d) for d in dirs]
    tokenizer_check = tokenizer_check or indexes[0]["tokenizer"]  # one tokenizer for all directories
    for d, ix in zip(dirs, indexes):
        if ix["tokenizer"] != tokenizer_check:
            raise DataError(f"{d}: prepared with tokenizer {ix['tokenizer']}, but this run's tokenizer is "
                            f"{tokenizer_check}; prepare the corpus again with the run's tokenizer")
        if ix["num_documents"] == 0:
            raise DataError(f"{d}: zero documents")
    return PreparedDocuments(dirs, indexes)
