"""Input pipeline: seeded order, exact resume, per-process shares, prepare (CLI) and device placement."""

import json
import os

import numpy as np
import pytest

from conftest import require_shared
from input_pipeline import DataConfig, DataError, Source, make_dataset, prepare_corpus, to_global_batch


@pytest.fixture(scope="module")
def tok():
    from llama.tokenizer import load_tokenizer

    return load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))


@pytest.fixture(scope="module")
def stories():
    return str(require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt"))


def cfg_for(path, **kw):
    return DataConfig.from_paths(path, separator="\n\n", **kw)


def take(it, n):
    out = [next(it) for _ in range(n)]
    return out


def same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_same_seed_same_batches_other_seed_other_order(tok, stories):
    kw = {"seq_len": 128, "global_batch_size": 4, "process_index": 0, "process_count": 1}
    a = take(make_dataset(cfg_for(stories), tok, seed=3, **kw), 5)
    b = take(make_dataset(cfg_for(stories, num_threads=1, prefetch=0), tok, seed=3, **kw), 5)
    c = take(make_dataset(cfg_for(stories), tok, seed=4, **kw), 5)
    assert same(a, b), "threads and prefetch change nothing"
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
    d = take(make_dataset(cfg_for(stories, shuffle=False), tok, seed=3, **kw), 1)
    first = open(stories).read().split("\n\n")[0].strip()
    assert d[0]["tokens"][0, :20].tolist() == tok.encode(first, bos=True)[:20]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact_across_epochs(tok, tmp_path, prefetch):
    """Save the state mid-document and mid-epoch (through JSON, as in a checkpoint), restore into a fresh
    iterator: the following batches equal the uninterrupted run's, through several epoch boundaries."""
    (tmp_path / "small.txt").write_text("\n\n".join(f"story number {i} " + "la " * (i % 23) for i in range(40)))
    cfg = cfg_for(str(tmp_path / "small.txt"), prefetch=prefetch)
    kw = {"seq_len": 48, "global_batch_size": 2, "seed": 7, "process_index": 0, "process_count": 1}
    ref = make_dataset(cfg, tok, **kw)
    full = take(ref, 40)  # ~6 epochs of this small corpus
    for stop in (3, 17):
        it = make_dataset(cfg, tok, **kw)
        take(it, stop)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        resumed = make_dataset(cfg, tok, **kw)
        resumed.set_state(state)
        assert resumed.get_state() == state, "a restored, not yet advanced iterator reports the same state"
        assert same(take(resumed, 40 - stop), full[stop:])
        resumed.close()
    ref.close()


def test_resume_refuses_another_configuration(tok, stories):
    kw = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}
    state = make_dataset(cfg_for(stories), tok, seq_len=64, **kw).get_state()
    with pytest.raises(DataError, match="seq_len"):
        make_dataset(cfg_for(stories), tok, seq_len=128, **kw).set_state(state)
    with pytest.raises(DataError, match="mask_document_boundary"):
        make_dataset(cfg_for(stories, mask_document_boundary=False), tok, seq_len=64, **kw).set_state(state)
    with pytest.raises(DataError, match="sources"):
        make_dataset(DataConfig.from_paths(stories), tok, seq_len=64, **kw).set_state(state)
    make_dataset(cfg_for(stories, num_threads=1), tok, seq_len=64, **kw).set_state(state)  # perf knobs may change


def test_config_round_trips_through_json(stories):
    cfg = DataConfig(sources=(Source(stories, separator="\n\n", weight=2.0), Source((stories,), format="text")),
                     num_epochs=2, mask_document_boundary=False)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _docs(batches, bos_id):
    toks = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    pos = np.concatenate([b["positions"][b["segment_ids"] > 0] for b in batches])
    return [tuple(d) for d in np.split(toks, np.flatnonzero(pos == 0)[1:])]


@pytest.mark.parametrize("count", [2, 3])
def test_process_shares_disjoint_and_complete(tok, stories, count, tmp_path):
    (tmp_path / "head.txt").write_text(open(stories).read()[:150_000])  # a slice keeps the test short
    cfg = cfg_for(str(tmp_path / "head.txt"), num_epochs=1)
    shares = []
    for p in range(count):
        it = make_dataset(cfg, tok, seq_len=256, global_batch_size=2 * count, seed=5, process_index=p,
                          process_count=count)
        batches = list(it)
        assert all(b["tokens"].shape == (2, 256) for b in batches)
        shares.append(_docs(batches, tok.bos_id))
    everything = _docs(list(make_dataset(cfg, tok, seq_len=256, global_batch_size=2, seed=5, process_index=0,
                                         process_count=1)), tok.bos_id)
    # Documents repeat in this corpus (e.g. identical short lines), so compare as multisets.
    assert sorted(sum(shares, [])) == sorted(everything)
    assert sum(len(s) for s in shares) == len(everything)
    assert all(abs(len(s) - len(everything) / count) <= 1 for s in shares)


def test_prepare_cli_then_same_batches_as_on_the_fly(tok, stories, tmp_path):
    import importlib

    prepare_mod = importlib.import_module("input_pipeline.prepare")

    tok_path = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    out = tmp_path / "prepared"
    argv = [str(out), stories, "--separator", "blank-lines", "--tokenizer", tok_path, "--shards", "3"]
    assert prepare_mod.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["prepared"], "no temporary directory left behind"
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == 3 and index["inputs"][0]["bytes"] == os.path.getsize(stories)
    assert prepare_mod.main(argv) == 2, "refuses to overwrite without --overwrite"
    kw = {"seq_len": 128, "global_batch_size": 4, "seed": 11, "process_index": 0, "process_count": 1}
    a = take(make_dataset(cfg_for(stories), tok, **kw), 6)
    b = take(make_dataset(DataConfig.from_paths(str(out), format="prepared"), tok, **kw), 6)
    c = take(make_dataset(DataConfig.from_paths(str(out), format="prepared"), None, **kw), 6)
    assert same(a, b) and same(a, c)
    assert index["num_documents"] == make_dataset(cfg_for(stories), tok, **kw).stats[
        f"text:{stories}"]["documents"]


def test_mixing_prepared_and_text_sources(tok, stories, tmp_path):
    shakespeare = str(require_shared("assets", "text", "tinyshakespeare", "input.txt"))
    prepare_corpus(Source(stories, separator="\n\n"), tok, str(tmp_path / "p"), progress=False)
    cfg = DataConfig(sources=(Source(str(tmp_path / "p"), format="prepared", weight=2.0),
                              Source(shakespeare, separator="\n\n", weight=1.0)))
    it = make_dataset(cfg, tok, seq_len=64, global_batch_size=2, seed=0, process_index=0, process_count=1)
    b = take(it, 3)
    assert all(x["tokens"].shape == (2, 64) for x in b)
    assert len(it.stats) == 2


def test_to_global_batch_on_8_devices(tok, stories):
    import jax

    from sharding.rules import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    batch = next(make_dataset(cfg_for(stories), tok, seq_len=32, global_batch_size=8, seed=0))
    out = to_global_batch(batch, mesh)
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert out[k].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert len(out["tokens"].addressable_shards) == 8
    assert {s.data.shape for s in out["tokens"].addressable_shards} == {(1, 32)}
