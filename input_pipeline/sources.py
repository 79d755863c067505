"""Document sources: files on disk -> random-access sequences of documents.

Every format becomes a `Documents` object: `len(docs)` documents, `docs[i]` is the text of document i (a str),
or, for a prepared directory, its token ids (np.int32, BOS..EOS included). Random access is what lets grain
shuffle globally, shard per process and resume at an exact index without reading anything twice.

Bad input is handled in one place per format, with counts kept in `docs.stats` (and logged):
- a glob with no match, a missing file, a directory given for a file format: `DataError` naming the path;
- an empty (0-byte or whitespace-only) file, or an empty piece between two separators: skipped and counted
  (`empty_files`, `empty_documents`); a source left with zero documents: `DataError`;
- invalid UTF-8: `utf8_errors="replace"` (default) decodes to U+FFFD and counts the replacements
  (`invalid_utf8_replacements`); `utf8_errors="strict"` raises `DataError` naming the file and byte offset;
- JSONL: a line that is not JSON, or lacks the text field, or whose field is not a string: `DataError` naming
  file, line and field; whitespace-only lines are skipped and counted (`blank_lines`);
- Parquet: an unreadable file or a missing column: `DataError` naming the file and the columns it has.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "array_record", "hf", "prepared", "chat", "preference", "segments")
# JSONL rows that chat.py tokenizes into documents carrying a per-token loss weight, packed whole into rows.
WEIGHTED_FORMATS = ("chat", "preference", "segments")
# Separator value meaning "one or more blank (whitespace-only) lines", as in TinyStories' validation file.
BLANK_LINES = "\n\n"
_BLANK_LINES_RE = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
_NON_SPACE = re.compile(rb"\S")
UTF8_ERRORS = ("replace", "strict")


class DataError(ValueError):
    """Input data that the pipeline cannot use; the message names the file, field or flag."""


@dataclass(frozen=True)
class Source:
    """One corpus. `paths` are files or globs (`**` allowed); for "prepared" a directory written by
    `python -m input_pipeline.prepare`; for "hf" local data files, a `save_to_disk` directory, or a hub name.

    format: "text" (one document per file, or split by `separator`), "jsonl" (one JSON object per line, text
    in `field`), "parquet" (text column `field`), "array_record" (one UTF-8 document per record), "hf"
    (Hugging Face `datasets`, optional dependency, column `field`), "prepared" (token ids, see prepare.py).
    separator: text only; None = one document per file; e.g. "<|endoftext|>"; BLANK_LINES ("\\n\\n") splits
      on runs of blank lines. Documents are stripped of surrounding whitespace.
    drop_unterminated: text with separator only: drop the text after a file's last separator (a corpus slice
      cut mid-document, e.g. TinyStories' first 2 MiB); counted as `dropped_unterminated`.
    weight: relative sampling weight (in documents) when several sources are mixed.
    "chat" / "preference": chat (SFT) and preference (DPO) JSONL rows, see chat.py. overlong: a row longer than
      seq_len is an "error" or is "drop"ped (counted); mask_special (preference only): header and termination
      tokens out of the completion mask (Llama 3 paper section 4.1.4).
    "segments": pre-training text with a loss weight per span, JSONL rows {"segments": [{"text": ..., "weight":
      k}, ...]} (chat.py, `encode_segments`); packed whole like chat rows, overlong as for them.
    """

    paths: tuple[str, ...]
    format: str = "text"
    weight: float = 1.0
    field: str = "text"
    separator: str | None = None
    drop_unterminated: bool = False
    hf_split: str = "train"
    overlong: str = "error"
    mask_special: bool = False

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if not self.paths:
            raise DataError("Source.paths is empty: give at least one file, glob or directory")
        if self.format not in FORMATS:
            raise DataError(f"Source.format {self.format!r} is not one of {FORMATS}")
        if not self.weight > 0:
            raise DataError(f"Source.weight must be > 0, got {self.weight} for {self.paths}")
        if self.overlong not in ("error", "drop"):
            raise DataError(f"Source.overlong={self.overlong!r}: expected 'error' or 'drop' (never truncated)")
        if self.separator is not None and (self.format != "text" or self.separator == ""):
            raise DataError(f"Source.separator={self.separator!r} applies only to format='text' and must be "
                            f"non-empty (got format {self.format!r})")

    def to_dict(self) -> dict[str, Any]:
        return {"paths": list(self.paths), "format": self.format, "weight": self.weight, "field": self.field,
                "separator": self.separator, "drop_unterminated": self.drop_unterminated,
                "hf_split": self.hf_split} | (  # only where they apply: older sources' fingerprints stay as they were
                    {"overlong": self.overlong, "mask_special": self.mask_special}
                    if self.format in WEIGHTED_FORMATS else {})


def expand_paths(patterns: Sequence[str], *, allow_dirs: bool = False) -> list[str]:
    """Files named by paths and globs, each glob sorted, in the given order; errors name the pattern."""
    out: list[str] = []
    for p in patterns:
        if glob.has_magic(p):
            hits = sorted(h for h in glob.glob(p, recursive=True) if allow_dirs or os.path.isfile(h))
            if not hits:
                raise DataError(f"glob {p!r} matches no files")
            out.extend(hits)
        elif not os.path.exists(p):
            raise DataError(f"{p}: no such file")
        elif os.path.isdir(p) and not allow_dirs:
            raise DataError(f"{p} is a directory; name its files or use a glob such as {os.path.join(p, '*')!r}")
        else:
            out.append(p)
    return out


def decode_utf8(data: bytes, where: str, errors: str, stats: dict, offset: int = 0) -> str:
    """Decode with the replace/strict policy; counts the U+FFFD characters that replacement introduced.
    `offset`: where `data` starts in its file, for the error message."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(f"{where}: invalid UTF-8 at byte {offset + e.start} ({data[e.start:e.start + 4]!r}); pass "
                            f"utf8_errors='replace' (DataConfig.utf8_errors, --utf8-errors replace) to decode it "
                            f"as U+FFFD") from None
        text = data.decode("utf-8", errors="replace")
        stats["invalid_utf8_replacements"] += text.count("\ufffd") - data.count("\ufffd".encode())
        return text


class Documents:
    """A random-access sequence of documents with `stats` (counts of everything skipped or replaced)."""

    name: str
    stats: dict[str, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int):
        raise NotImplementedError


def _new_stats(files: int) -> dict[str, int]:
    return {"files": files, "documents": 0, "empty_files": 0, "empty_documents": 0, "blank_lines": 0,
            "dropped_unterminated": 0, "invalid_utf8_replacements": 0}


_MAX_MAPPED_FILES = 64


class _SpanDocuments(Documents):
    """Documents stored as byte spans (file, start, end) of memory-mapped files: text and JSONL."""

    def __init__(self, name, files, spans, field=None):
        self.name, self._files, self._field = name, files, field
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._spans)

    def _bytes(self, i: int) -> bytes:
        f, start, end = (int(x) for x in self._spans[i])
        if len(self._files) > _MAX_MAPPED_FILES:  # an mmap holds a file descriptor: read instead
            with open(self._files[f], "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        m = self._maps.get(f)
        if m is None:
            with self._lock:
                m = self._maps.get(f)
                if m is None:
                    with open(self._files[f], "rb") as fh:
                        m = self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return m[start:end]

    def __getitem__(self, i: int) -> str:
        # Validity was checked (and counted) when the index was built; "replace" here only repeats that.
        text = self._bytes(i).decode("utf-8", errors="replace")
        if self._field is None:
            return text
        return json.loads(text)[self._field]


def _map(path: str) -> mmap.mmap | None:
    """The file memory-mapped (scans stay out of Python memory), or None for an empty file."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return None
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _split(data, src: Source) -> list[tuple[int, int]]:
    """(start, end) byte spans of the pieces between separators (the whole file without one)."""
    if src.separator is None:
        return [(0, len(data))]
    if src.separator == BLANK_LINES:
        bounds = [(m.start(), m.end()) for m in _BLANK_LINES_RE.finditer(data)]
    else:
        sep = src.separator.encode("utf-8")
        bounds, k = [], data.find(sep)
        while k >= 0:
            bounds.append((k, k + len(sep)))
            k = data.find(sep, k + len(sep))
    return list(zip([0] + [e for _, e in bounds], [s for s, _ in bounds] + [len(data)]))


def open_text(src: Source, utf8_errors: str) -> Documents:
    files = expand_paths(src.paths)
    stats = _new_stats(len(files))
    spans = []
    for f, path in enumerate(files):
        data = _map(path)
        if data is None or not _NON_SPACE.search(data):
            stats["empty_files"] += 1
            log.warning("%s: empty file, skipped", path)
            continue
        pieces = _split(data, src)
        if src.drop_unterminated and src.separator is not None and data[pieces[-1][0]:].strip():
            stats["dropped_unterminated"] += 1
            pieces = pieces[:-1]
        for start, end in pieces:
            piece = data[start:end]
            # Validate (and count) each piece once here; reads later only repeat the same decoding.
            decode_utf8(piece, path, utf8_errors, stats, offset=start)
            if not piece.strip():
                stats["empty_documents"] += 1
                continue
            # Strip surrounding whitespace by moving the span (bytes.strip: ASCII whitespace only).
            lead = len(piece) - len(piece.lstrip())
            trail = len(piece) - len(piece.rstrip())
            spans.append((f, start + lead, end - trail))
        data.close()
    return _finish(_SpanDocuments(f"text:{','.join(src.paths)}", files, spans), stats, src)


def open_jsonl(src: Source, utf8_errors: str) -> Documents:
    files = expand_paths(src.paths)
    stats = _new_stats(len(files))
    spans = []
    for f, path in enumerate(files):
        data = _map(path)
        if data is None:
            stats["empty_files"] += 1
            log.warning("%s: empty file, skipped", path)
            continue
        start, lineno = 0, 0
        while start < len(data):
            lineno += 1
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end
            line = data[start:end]
            if not line.strip():
                stats["blank_lines"] += 1
            else:
                text = decode_utf8(line, f"{path}:{lineno}", utf8_errors, stats)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                if not isinstance(obj, dict) or src.field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{path}:{lineno}: no field {src.field!r} (found {keys}); set Source.field "
                                    f"(--field) to the text field")
                if not isinstance(obj[src.field], str):
                    raise DataError(f"{path}:{lineno}: field {src.field!r} is {type(obj[src.field]).__name__}, "
                                    f"expected a string")
                if not obj[src.field].strip():
                    stats["empty_documents"] += 1
                else:
                    spans.append((f, start, end))
            start = end + 1
        data.close()
    return _finish(_SpanDocuments(f"jsonl:{','.join(src.paths)}", files, spans, field=src.field), stats, src)


class _ListDocuments(Documents):
    def __init__(self, name, items):
        self.name, self._items = name, items

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


def open_parquet(src: Source, utf8_errors: str) -> Documents:
    """Parquet text column, held in memory as Arrow arrays (fine for on-the-fly runs; large corpora go
    through `prepare`, which reads the same way once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = expand_paths(src.paths)
    stats = _new_stats(len(files))
    texts: list[str] = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError with varied texts
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        if src.field not in names:
            raise DataError(f"{path}: no column {src.field!r} (columns: {names}); set Source.field (--field)")
        try:
            col = pf.read(columns=[src.field]).column(src.field)
        except Exception as e:
            raise DataError(f"{path}: cannot read column {src.field!r} ({type(e).__name__}: {e})") from None
        if pf.metadata.num_rows == 0:
            stats["empty_files"] += 1
            log.warning("%s: Parquet file with no rows, skipped", path)
            continue
        binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
        if not (binary or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{path}: column {src.field!r} has type {col.type}, expected string or binary")
        for row, value in enumerate(col.to_pylist()):
            if value is None:
                raise DataError(f"{path}: row {row}: column {src.field!r} is null")
            if binary:
                value = decode_utf8(value, f"{path}: row {row}", utf8_errors, stats)
            if not value.strip():
                stats["empty_documents"] += 1
            else:
                texts.append(value)
    return _finish(_ListDocuments(f"parquet:{','.join(src.paths)}", texts), stats, src)


class _ArrayRecordText(Documents):
    def __init__(self, name, files, utf8_errors, stats):
        import grain.python as gp

        self.name, self._errors, self.stats = name, utf8_errors, stats
        self._ds = gp.ArrayRecordDataSource(files)
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        data = self._ds[i]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            with self._lock:  # counted when read: each read of a bad record counts again
                return decode_utf8(data, f"{self.name}: record {i}", self._errors, self.stats)


def open_array_record(src: Source, utf8_errors: str) -> Documents:
    files = expand_paths(src.paths)
    stats = _new_stats(len(files))
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file, not an ArrayRecord file")
    try:
        docs = _ArrayRecordText(f"array_record:{','.join(src.paths)}", files, utf8_errors, stats)
    except Exception as e:
        raise DataError(f"{files}: not readable as ArrayRecord ({type(e).__name__}: {e})") from None
    return _finish(docs, stats, src)


class _HFDocuments(Documents):
    def __init__(self, name, ds, field):
        self.name, self._ds, self._field = name, ds, field

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        return self._ds[int(i)][self._field]


_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv",
                ".arrow": "arrow"}


def open_hf(src: Source, utf8_errors: str) -> Documents:
    """Hugging Face `datasets` (imported only here: an optional dependency)."""
    try:
        import datasets
    except ImportError:
        raise DataError("format='hf' needs the optional package `datasets` (pip install datasets)") from None
    first = src.paths[0]
    if len(src.paths) == 1 and os.path.isdir(first):
        ds = datasets.load_from_disk(first)
        if isinstance(ds, datasets.DatasetDict):
            if src.hf_split not in ds:
                raise DataError(f"{first}: no split {src.hf_split!r} (splits: {list(ds)}); set Source.hf_split")
            ds = ds[src.hf_split]
    elif any(glob.has_magic(p) or os.path.exists(p) for p in src.paths):
        files = expand_paths(src.paths)
        exts = {os.path.splitext(f)[1].lower() for f in files}
        builders = {_HF_BUILDERS.get(e) for e in exts}
        if len(builders) != 1 or None in builders:
            raise DataError(f"{src.paths}: hf data files must share one extension of {sorted(_HF_BUILDERS)}, "
                            f"got {sorted(exts)}")
        ds = datasets.load_dataset(builders.pop(), data_files=files, split=src.hf_split)
    else:  # a hub dataset name (needs network on the user's machine)
        ds = datasets.load_dataset(first, split=src.hf_split)
    if src.field not in ds.column_names:
        raise DataError(f"{src.paths}: no column {src.field!r} (columns: {ds.column_names}); set Source.field")
    stats = _new_stats(len(src.paths))
    keep = [i for i, t in enumerate(ds[src.field]) if isinstance(t, str) and t.strip()]
    stats["empty_documents"] = len(ds) - len(keep)
    if len(keep) != len(ds):
        ds = ds.select(keep)
    return _finish(_HFDocuments(f"hf:{','.join(src.paths)}", ds, src.field), stats, src)


def _finish(docs: Documents, stats: dict, src: Source) -> Documents:
    stats["documents"] = len(docs)
    docs.stats = stats
    if len(docs) == 0:
        raise DataError(f"{docs.name}: zero documents (stats {stats}); check the paths, format "
                        f"{src.format!r}, separator {src.separator!r} and field {src.field!r}")
    skipped = {k: v for k, v in stats.items() if k not in ("files", "documents") and v}
    if skipped:
        log.warning("%s: %d documents; %s", docs.name, len(docs), skipped)
    return docs


def open_documents(src: Source, utf8_errors: str = "replace") -> Documents:
    """The documents of a text-bearing source (every format except "prepared", see prepare.py)."""
    if utf8_errors not in UTF8_ERRORS:
        raise DataError(f"utf8_errors={utf8_errors!r}: expected one of {UTF8_ERRORS}")
    opener = {"text": open_text, "jsonl": open_jsonl, "parquet": open_parquet,
              "array_record": open_array_record, "hf": open_hf}.get(src.format)
    if opener is None and src.format in WEIGHTED_FORMATS:
        raise DataError(f"format {src.format!r}: rows with per-token weights, not plain documents; open them with "
                        "input_pipeline.chat.open_chat (a run's held-out figures on them are its eval_* metrics)")
    if opener is None:
        raise DataError(f"format {src.format!r} holds token ids, not text; open it with "
                        f"input_pipeline.open_prepared")
    return opener(src, utf8_errors)


# ------------------------------------------------------------------------------------ held-out split
class _Subset(Documents):
    def __init__(self, docs: Documents, keep: list[int], name: str):
        self._docs, self._keep, self.name = docs, keep, name
        self.stats = dict(docs.stats, documents=len(keep))
        if hasattr(docs, "indexes"):  # a prepared source's index.json entries (tokenizer, fingerprint)
            self.indexes = docs.indexes

    def __len__(self):
        return len(self._keep)

    def __getitem__(self, i):
        return self._docs[self._keep[i]]


def hash_split(docs: Documents, share: float, *, heldout: bool) -> Documents:
    """The held-out documents (heldout=True) or the rest: a document is held out when the first 8 bytes of
    the sha256 of its content (UTF-8 text, or int32 ids for prepared data), as a fraction of 2**64, are below
    `share`. Stable across runs, orders, paths and process counts; identical copies of a document fall on the
    same side, so none leaks into training. Reads every document once."""
    if not 0.0 <= share < 1.0:
        raise DataError(f"held-out share {share} must be in [0, 1)")
    keep = []
    for i in range(len(docs)):
        d = docs[i]
        data = d.encode("utf-8") if isinstance(d, str) else np.asarray(d, np.int32).tobytes()
        h = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0**64
        if (h < share) == heldout:
            keep.append(i)
    side = "held-out" if heldout else "training"
    if not keep:
        raise DataError(f"{docs.name}: no {side} documents with held-out share {share} of {len(docs)} documents")
    return _Subset(docs, keep, f"{docs.name} ({side} share, {share})")
