"""The comparison probe and diff (llama.compare): deterministic on CPU, a small stated float32-vs-bfloat16
difference, and a non-zero exit for different checkpoints under tight tolerances."""

import json

import jax
import numpy as np
import pytest

from llama import checkpoint, compare, model
from llama.config import TINY

PROBE_ARGS = ["--seq-len", "32", "--prompt-len", "8", "--gen-len", "8", "--train-steps", "3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    checkpoint.save_model(str(d / "a"), TINY, model.init_params(TINY, jax.random.key(0)))
    checkpoint.save_model(str(d / "b"), TINY, model.init_params(TINY, jax.random.key(1)))
    return d


@pytest.fixture(scope="module")
def report_f32(ckpts):
    out = ckpts / "report_f32"
    assert compare.main(["run", "--checkpoint", str(ckpts / "a"), "--out", str(out), *PROBE_ARGS]) == 0
    return out


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timing"}


def test_probe_twice_gives_identical_reports(report_f32, ckpts):
    # Recompile from scratch so the second run shares nothing with the first but the inputs.
    jax.clear_caches()
    compare._logits_jit.cache_clear()
    compare._train_fns.cache_clear()
    again = ckpts / "report_f32_again"
    assert compare.main(["run", "--checkpoint", str(ckpts / "a"), "--out", str(again), *PROBE_ARGS]) == 0
    (ra, xa), (rb, xb) = compare.load_report(str(report_f32)), compare.load_report(str(again))
    assert _without_timing(ra) == _without_timing(rb)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), k  # bit-identical
    assert len(ra["losses"]) == 3 and ra["losses"][2] < ra["losses"][0]  # the steps really train
    assert xa["greedy"].shape == (2, 8) and (xa["greedy"] >= 0).all()
    m = json.loads((again / "manifest.json").read_text())
    assert m["config"]["model"]["name"] == "tiny" and m["config"]["probe"]["seq_len"] == 32
    assert m["data"][0]["kind"] == "dir"  # the checkpoint's fingerprint
    # ... and the diff of the two says so.
    metrics = compare.diff_reports((ra, xa), (rb, xb))
    assert metrics["max_abs"] == 0 and metrics["kl"] == 0 and metrics["top1"] == 1 and metrics["loss"] == 0
    assert metrics["greedy_first_divergence"] is None


def test_float32_vs_bfloat16_is_small_and_nonzero(report_f32, ckpts, tmp_path, capsys):
    bf16 = ckpts / "report_bf16"
    assert compare.main(["run", "--checkpoint", str(ckpts / "a"), "--out", str(bf16), *PROBE_ARGS,
                         "--compute-dtype", "bfloat16"]) == 0
    # Stated bounds. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); the logits of this
    # randomly initialised tiny model are O(0.1-1) (std-0.02 weights, unit-RMS activations), so rounding of
    # activations and weights through 2 layers moves a logit by ~1e-3 (measured: max 3.2e-3, mean 6e-4,
    # KL 3e-7, train loss 4e-4 on 2026-11-27). The bounds are ~3-10x the measurement; the lower bounds
    # prove bfloat16 was really used.
    tol = "max_abs=2e-2,mean_abs=3e-3,kl=1e-5,top1=0.9,loss=5e-3"
    rc = compare.main(["diff", str(report_f32), str(bf16), "--tolerances", tol, "--out", str(tmp_path / "d")])
    m = json.loads((tmp_path / "d" / "diff.json").read_text())["metrics"]
    assert rc == 0, m
    assert m["max_abs"] > 1e-4 and m["mean_abs"] > 1e-5 and m["kl"] > 1e-9 and m["loss"] > 0
    assert m["a"]["compute_dtype"] == "float32" and m["b"]["compute_dtype"] == "bfloat16"
    assert m["mean_abs_over"] == "full vocabulary"  # tiny vocab: full logits at every position, exact KL
    assert (tmp_path / "d" / "diff.png").stat().st_size > 1000
    assert "| mean KL(A||B) |" in capsys.readouterr().out


def test_different_checkpoints_fail_tight_tolerances(report_f32, ckpts, tmp_path):
    other = ckpts / "report_b"
    assert compare.main(["run", "--checkpoint", str(ckpts / "b"), "--out", str(other), *PROBE_ARGS]) == 0
    rc = compare.main(["diff", str(report_f32), str(other), "--tolerances", "max_abs=1e-3,kl=1e-6,top1=0.99",
                       "--out", str(tmp_path / "d")])
    assert rc == 1
    out = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert len(out["violations"]) == 3 and out["metrics"]["max_abs"] > 0.1
    assert "EXCEEDED" in (tmp_path / "d" / "diff.md").read_text()
    # A probe with other settings (here of a random init instead of a checkpoint) is refused, not compared.
    wrong = ckpts / "report_wrong"
    assert compare.main(["run", "--init", "tiny", "--out", str(wrong), "--seq-len", "16", "--gen-len", "0",
                         "--train-steps", "0"]) == 0
    assert json.loads((wrong / "report.json").read_text())["checkpoint"].startswith("random init of preset 'tiny'")
    assert compare.main(["diff", str(report_f32), str(wrong), "--out", str(tmp_path / "e")]) == 2
    assert compare.main(["diff", str(report_f32), str(other), "--tolerances", "bogus=1", "--out",
                         str(tmp_path / "e")]) == 2


def test_topk_kl_is_a_lower_bound_of_the_exact_kl():
    """The compact-storage KL (top-k + logsumexp, coarse-grained) never exceeds the exact KL from full
    logits, and is close when the top-k ids hold most of the mass."""
    rng = np.random.default_rng(0)
    V, k = 500, 64
    a = rng.normal(size=(3, 5, V)) * 4.0  # peaked: the top 64 ids hold most of the mass
    b = a + rng.normal(size=a.shape) * 0.05

    def record(x):
        x = x.astype(np.float32)
        idx = np.argsort(-x, -1)[..., :k]
        lse = np.log(np.exp(x.astype(np.float64)).sum(-1))
        return {"topk_values": np.take_along_axis(x, idx, -1), "topk_indices": idx, "logsumexp": lse.astype(np.float32)}

    bound, _, _ = compare._kl_topk(record(a), record(b))
    exact = compare._kl_full(a.astype(np.float32), b.astype(np.float32))
    assert np.all(bound <= exact + 1e-7)
    assert bound.mean() > 0.5 * exact.mean()
