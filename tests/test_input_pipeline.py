"""Input pipeline: packing invariants on real corpora, every source format, bad input.

Order, determinism, resume, per-process shares, prepare and device placement: test_input_pipeline_order.py.
"""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import require_shared
from input_pipeline import BLANK_LINES, DataConfig, DataError, Source, make_dataset, prepare_corpus
from input_pipeline.packing import PackIterDataset


class ByteTokenizer:
    """Exactly invertible stand-in for generated files: id = UTF-8 byte + 3; BOS 1, EOS 2."""

    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text, *, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


def collect(it, max_batches=10**6):
    batches = []
    for b in it:
        batches.append(b)
        if len(batches) >= max_batches:
            break
    it.close()
    return batches


def check_rows(batches, *, bos_id, eos_id, mask_boundary=True, complete=True):
    """Check the packing invariants of packing.py's docstring on consecutive batches of one process, and
    return the documents they contain, in order (each a tuple of ids, BOS..EOS). complete=False: the batches
    are a prefix of a longer stream (the last token's target is then unknown here)."""
    rows = [{k: b[k][r] for k in b} for b in batches for r in range(b["tokens"].shape[0])]
    T = rows[0]["tokens"].shape[0]
    stream, seg_start = [], []  # every real input token, in order; and whether it starts a document
    for row in rows:
        assert all(row[k].shape == (T,) for k in row)
        assert row["tokens"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
        seg, pos = row["segment_ids"], row["positions"]
        real = seg > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        assert (row["loss_mask"][~real] == 0).all()
        if n:
            assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
            change = np.flatnonzero(np.diff(seg[:n])) + 1
            # Positions count up inside a segment; a new segment inside a row is a new document (BOS, 0).
            same = np.ones(n - 1, bool)
            same[change - 1] = False
            assert (np.diff(pos[:n])[same] == 1).all()
            assert (pos[change] == 0).all() and (row["tokens"][change] == bos_id).all()
            starts = pos[:n] == 0
            assert (starts == (row["tokens"][:n] == bos_id)).all()
        stream.extend(row["tokens"][:n].tolist())
        seg_start.extend((pos[:n] == 0).tolist())
    stream = np.asarray(stream)
    # Targets: the next token of the stream; loss on all but EOS -> next BOS (if masked) and the stream's end.
    i = 0
    for row in rows:
        n = int((row["segment_ids"] > 0).sum())
        nxt = np.append(stream[i + 1:i + n + 1], [-1] * max(0, i + n + 1 - len(stream)))[:n]
        has_next = np.arange(i + 1, i + n + 1) < len(stream)
        assert (row["targets"][:n][has_next] == nxt[has_next]).all()
        expect = has_next.astype(np.float32)
        if mask_boundary:
            expect[row["tokens"][:n] == eos_id] = 0.0
        known = has_next | complete
        np.testing.assert_array_equal(row["loss_mask"][:n][known], expect[known])
        i += n
    cut = np.flatnonzero(seg_start)
    assert cut[0] == 0, "the stream starts with a document's BOS"
    docs = [tuple(d.tolist()) for d in np.split(stream, cut[1:])]
    assert all(d[0] == bos_id and d[-1] == eos_id for d in (docs if complete else docs[:-1]))
    return docs


def run_epoch(cfg, tok, **kw):
    kw = {"seq_len": 64, "global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1} | kw
    return collect(make_dataset(cfg, tok, **kw))


def test_packing_by_hand():
    """Three documents of 3, 6, 2 tokens in rows of 4: carry-over, positions, segments, masks, padding."""
    import grain

    docs = [np.array([1, 10, 2]), np.array([1, 20, 21, 22, 23, 2]), np.array([1, 2])]
    blocks = grain.MapDataset.source(docs).batch(2, batch_fn=list)  # blocks of 2, 1 documents
    rows = list(PackIterDataset(blocks.to_iter_dataset(), seq_len=4))
    stack = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    np.testing.assert_array_equal(stack["tokens"], [[1, 10, 2, 1], [20, 21, 22, 23], [2, 1, 2, 0]])
    np.testing.assert_array_equal(stack["targets"], [[10, 2, 1, 20], [21, 22, 23, 2], [1, 2, 0, 0]])
    np.testing.assert_array_equal(stack["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 2, 2, 0]])
    np.testing.assert_array_equal(stack["positions"], [[0, 1, 2, 0], [1, 2, 3, 4], [5, 0, 1, 0]])
    np.testing.assert_array_equal(stack["loss_mask"], [[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0]])


@pytest.mark.parametrize("mask_boundary", [True, False])
def test_tinystories_every_token_once(mask_boundary):
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    path = require_shared("assets", "text", "tinystories", "tinystories_v1_train_first2MiB.txt")
    cfg = DataConfig.from_paths(str(path), separator="<|endoftext|>", drop_unterminated=True, num_epochs=1,
                                mask_document_boundary=mask_boundary)
    batches = run_epoch(cfg, tok, seq_len=512, global_batch_size=8)
    got = check_rows(batches, bos_id=tok.bos_id, eos_id=tok.eos_id, mask_boundary=mask_boundary)
    stories = path.read_text().split("<|endoftext|>")[:-1]  # the slice ends mid-story (assets README)
    want = [tuple(tok.encode(s.strip(), bos=True, eos=True)) for s in stories]
    assert len(got) == len(want) == 2316
    assert sorted(got) == sorted(want)
    assert got != want, "shuffled"


def test_tinyshakespeare_one_long_document_llama3():
    """One 1.1 MB file = one document far longer than a row: it carries over, positions keep counting."""
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(require_shared("assets", "llama3_tokenizer", "tokenizer.model"))
    path = require_shared("assets", "text", "tinyshakespeare", "input.txt")
    batches = run_epoch(DataConfig.from_paths(str(path), num_epochs=1), tok, seq_len=2048, global_batch_size=8)
    (doc,) = check_rows(batches, bos_id=tok.bos_id, eos_id=tok.eos_id)
    assert doc == tuple(tok.encode(path.read_text().strip(), bos=True, eos=True))
    assert batches[1]["positions"][0, 0] == 8 * 2048 and (batches[0]["segment_ids"] == 1).all()
    assert batches[-1]["segment_ids"][-1, -1] == 0, "a finite run pads its last batch"


def test_blank_line_separator_tinystories_valid():
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    path = require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt")
    cfg = DataConfig.from_paths(str(path), separator=BLANK_LINES, num_epochs=1)
    got = check_rows(run_epoch(cfg, tok, seq_len=256), bos_id=tok.bos_id, eos_id=tok.eos_id)
    import re

    pieces = [p.strip() for p in re.split(r"\n(?:[ \t\r\f\v]*\n)+", path.read_text()) if p.strip()]
    assert sorted(got) == sorted(tuple(tok.encode(p, bos=True, eos=True)) for p in pieces)


DOCS = ["first document", "zweites Dokument: ü", "third\nwith a newline", "4", " ".join(["fifth"] * 40),
        "日本語の文書"]


def _write_formats(tmp_path):
    """The same six documents in every source format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    (tmp_path / "files").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "files" / f"doc{i}.txt").write_text(d)
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(DOCS[:3]) + "<|endoftext|>")
    (tmp_path / "b.txt").write_text("<|endoftext|>".join(DOCS[3:]))
    with open(tmp_path / "c.jsonl", "w") as fh:
        for d in DOCS:
            fh.write(json.dumps({"id": 0, "text": d}) + "\n")
    pq.write_table(pa.table({"text": DOCS[:4]}), tmp_path / "d0.parquet")
    pq.write_table(pa.table({"text": DOCS[4:]}), tmp_path / "d1.parquet")
    w = ArrayRecordWriter(str(tmp_path / "e.array_record"), "group_size:1")
    for d in DOCS:
        w.write(d.encode())
    w.close()
    return {"files": Source(str(tmp_path / "files" / "*.txt")),
            "separator": Source((str(tmp_path / "a.txt"), str(tmp_path / "b.txt")), separator="<|endoftext|>"),
            "jsonl": Source(str(tmp_path / "c.jsonl"), format="jsonl"),
            "parquet": Source(str(tmp_path / "d*.parquet"), format="parquet"),
            "array_record": Source(str(tmp_path / "e.array_record"), format="array_record"),
            "hf": Source(str(tmp_path / "c.jsonl"), format="hf")}


@pytest.mark.parametrize("fmt", ["files", "separator", "jsonl", "parquet", "array_record", "hf", "prepared"])
def test_every_format_gives_the_documents(tmp_path, fmt):
    if fmt == "hf":
        pytest.importorskip("datasets")
    tok = ByteTokenizer()
    sources = _write_formats(tmp_path)
    if fmt == "prepared":
        prepare_corpus(sources["jsonl"], tok, str(tmp_path / "prep"), num_shards=2, progress=False)
        src = Source(str(tmp_path / "prep"), format="prepared")
    else:
        src = sources[fmt]
    batches = run_epoch(DataConfig(sources=(src,), num_epochs=1), tok, seq_len=16, global_batch_size=2)
    got = check_rows(batches, bos_id=1, eos_id=2)
    assert sorted(tok.decode(d) for d in got) == sorted(DOCS)


def test_mixing_follows_weights(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("\n\n".join(f"a{i}" for i in range(300)))
    (tmp_path / "b.txt").write_text("\n\n".join(f"b{i}" for i in range(300)))
    cfg = DataConfig(sources=(Source(str(tmp_path / "a.txt"), separator=BLANK_LINES, weight=3.0),
                              Source(str(tmp_path / "b.txt"), separator=BLANK_LINES, weight=1.0)))
    docs = check_rows(collect(make_dataset(cfg, tok, seq_len=32, global_batch_size=4, seed=1, process_index=0,
                                           process_count=1), 30), bos_id=1, eos_id=2, complete=False)[:-1]
    first = [tok.decode(d)[0] for d in docs]
    assert abs(first.count("a") / len(first) - 0.75) < 0.02, first.count("a") / len(first)


# ---- bad input -------------------------------------------------------------------------------------------

def _make(cfg, tok=None, **kw):
    kw = {"seq_len": 8, "global_batch_size": 2, "seed": 0, "process_index": 0, "process_count": 1} | kw
    return make_dataset(cfg, tok or ByteTokenizer(), **kw)


def test_bad_input_errors_name_the_culprit(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello")
    for kw, msg in [({"seq_len": 0}, "seq_len"), ({"global_batch_size": 3, "process_count": 2}, "process_count"),
                    ({"process_index": 2, "process_count": 2}, "process_index")]:
        with pytest.raises(DataError, match=msg):
            _make(DataConfig.from_paths(str(good)), **kw)
    with pytest.raises(DataError, match="matches no files"):
        _make(DataConfig.from_paths(str(tmp_path / "nothing*.txt")))
    with pytest.raises(DataError, match="no such file"):
        _make(DataConfig.from_paths(str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="zero documents"):
        _make(DataConfig.from_paths(str(tmp_path / "empty.txt")))
    (tmp_path / "seps.txt").write_text("<|endoftext|>\n<|endoftext|>")
    with pytest.raises(DataError, match="zero documents"):
        _make(DataConfig.from_paths(str(tmp_path / "seps.txt"), separator="<|endoftext|>"))
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: no field 'text' \(found \['content'\]\)"):
        _make(DataConfig.from_paths(str(tmp_path / "x.jsonl"), format="jsonl"))
    (tmp_path / "y.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match="y.jsonl:2: not a JSON object"):
        _make(DataConfig.from_paths(str(tmp_path / "y.jsonl"), format="jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        _make(DataConfig.from_paths(str(tmp_path / "bad.parquet"), format="parquet"))
    with pytest.raises(DataError, match="utf8_errors"):
        DataConfig.from_paths(str(good), utf8_errors="ignore")
    with pytest.raises(DataError, match="format"):
        Source(str(good), format="csv")


def test_empty_files_and_pieces_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text("one<|endoftext|><|endoftext|>two<|endoftext|>")
    (tmp_path / "b.txt").write_text("  \n")
    it = _make(DataConfig.from_paths(str(tmp_path / "*.txt"), separator="<|endoftext|>", num_epochs=1))
    docs = check_rows(collect(it), bos_id=1, eos_id=2)
    assert sorted(ByteTokenizer().decode(d) for d in docs) == ["one", "two"]
    (stats,) = it.stats.values()
    assert stats["empty_files"] == 1 and stats["empty_documents"] == 2 and stats["documents"] == 2


def test_non_utf8_replace_counts_strict_fails(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1") + b"\n\nok\xff\xfe")
    it = _make(DataConfig.from_paths(str(path), separator=BLANK_LINES, num_epochs=1))
    docs = check_rows(collect(it), bos_id=1, eos_id=2)
    assert sorted(ByteTokenizer().decode(d) for d in docs) == ["caf\ufffd au lait", "ok\ufffd\ufffd"]
    assert next(iter(it.stats.values()))["invalid_utf8_replacements"] == 3
    with pytest.raises(DataError, match=r"latin1.txt: invalid UTF-8 at byte 3 .*utf8_errors='replace'"):
        _make(DataConfig.from_paths(str(path), separator=BLANK_LINES, utf8_errors="strict"))
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"l.jsonl:1: invalid UTF-8"):
        _make(DataConfig.from_paths(str(tmp_path / "l.jsonl"), format="jsonl", utf8_errors="strict"))


def test_prepared_refuses_another_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    prepare_corpus(Source(str(tmp_path / "a.txt")), ByteTokenizer(), str(tmp_path / "p"), progress=False)

    class Other(ByteTokenizer):
        def encode(self, text, *, bos=False, eos=False):
            return super().encode(text.upper(), bos=bos, eos=eos)

    with pytest.raises(DataError, match="prepared with tokenizer"):
        _make(DataConfig.from_paths(str(tmp_path / "p"), format="prepared"), Other())
    prepare_corpus(Source(str(tmp_path / "a.txt")), Other(), str(tmp_path / "q"), progress=False)
    with pytest.raises(DataError, match="prepared with tokenizer"):  # two tokenizers' ids never mix
        make_dataset(DataConfig.from_paths(str(tmp_path / "p"), str(tmp_path / "q"), format="prepared"), None,
                     seq_len=8, global_batch_size=2, seed=0, process_index=0, process_count=1)
    # Without a tokenizer the prepared one identifies the run: its state resumes a run that passed one.
    kw = {"seq_len": 8, "global_batch_size": 2, "seed": 0, "process_index": 0, "process_count": 1}
    cfg = DataConfig.from_paths(str(tmp_path / "p"), format="prepared")
    make_dataset(cfg, None, **kw).set_state(make_dataset(cfg, ByteTokenizer(), **kw).get_state())
    shutil.rmtree(tmp_path / "q")
    with pytest.raises(DataError, match="not a prepared directory"):
        _make(DataConfig.from_paths(str(tmp_path), format="prepared"))
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "p"], "no temporary directory left behind"


def test_many_small_files_and_jsonl_blank_lines(tmp_path):
    """More files than are kept memory-mapped (each map holds a descriptor) read the same way."""
    (tmp_path / "many").mkdir()
    for i in range(70):
        (tmp_path / "many" / f"{i:03d}.txt").write_text(f"document {i}\n")
    docs = check_rows(run_epoch(DataConfig.from_paths(str(tmp_path / "many" / "*.txt"), num_epochs=1),
                                ByteTokenizer(), seq_len=32), bos_id=1, eos_id=2)
    assert sorted(ByteTokenizer().decode(d) for d in docs) == sorted(f"document {i}" for i in range(70))
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    it = _make(DataConfig.from_paths(str(tmp_path / "b.jsonl"), format="jsonl", num_epochs=1))
    assert sorted(ByteTokenizer().decode(d) for d in check_rows(collect(it), bos_id=1, eos_id=2)) == ["a", "b"]
    assert next(iter(it.stats.values()))["blank_lines"] == 2


def test_prepare_failure_leaves_nothing(tmp_path):
    (tmp_path / "in.txt").write_text("good<|endoftext|>boom<|endoftext|>good")

    class Exploding(ByteTokenizer):
        def encode(self, text, *, bos=False, eos=False):
            if text == "boom":
                raise RuntimeError("tokenizer failed")
            return super().encode(text, bos=bos, eos=eos)

    with pytest.raises(RuntimeError, match="tokenizer failed"):
        prepare_corpus(Source(str(tmp_path / "in.txt"), separator="<|endoftext|>"), Exploding(),
                       str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == ["in.txt"], "neither the output nor a temporary directory remains"
