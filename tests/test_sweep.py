"""The ablation sweep runner (llama.sweep): a 2-variant sweep of a tiny model for a few steps."""

import csv
import json
import math
import os

import jax
import pytest

from llama import sweep
from tests.conftest import require_shared

BASE = "experiments/ablation_remat_lr.py"


def test_grid_parsing_and_variant_names():
    assert sweep.split_values("none,full") == ["none", "full"]
    assert sweep.split_values("None,{'factor': 8.0, 'low_freq_factor': 1.0}") == ["None", "{'factor': 8.0, 'low_freq_factor': 1.0}"]
    grid = sweep.parse_grid(["model.remat=none,full", "optimizer.peak_lr=1e-3,3e-3"])
    names = [v.name for v in sweep.variants(grid)]
    assert names == ["remat=none__peak_lr=1e-3", "remat=none__peak_lr=3e-3", "remat=full__peak_lr=1e-3",
                     "remat=full__peak_lr=3e-3"]
    for bad in (["model.remat"], ["model.remat=none,", "x=1"], ["a={1,2"]):
        with pytest.raises(sweep.SweepError):
            sweep.variants(sweep.parse_grid(bad))
    # Every example sweep file builds every one of its variants with the trainer's override parser.
    for base in ("experiments/ablation_remat_lr.py", "experiments/ablation_rope_scaling.py"):
        vs = sweep.variants(sweep.load_base_grid(base))
        assert len({sweep.resolve(base, [], v) for v in vs}) == len(vs) >= 2


def test_bad_field_fails_before_anything_runs(tmp_path):
    assert sweep.main(["--base", BASE, "--grid", "model.nonexistent=1,2", "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_two_variant_sweep_writes_table_plot_and_manifests(tmp_path, capsys, monkeypatch):
    # The trainer subprocesses get one CPU device (conftest forces 8 for this process only), so a
    # 2-row batch fits the base's all-devices mesh. This process's backend starts first, with its 8 devices,
    # so clearing the flag cannot shrink it for the tests that run after this one.
    assert len(jax.devices()) == 8
    monkeypatch.setenv("XLA_FLAGS", "")
    tok = require_shared("assets", "llama2c_stories260K", "tok512.model")
    text = require_shared("assets", "text", "tinystories", "tinystories_v2_train_sample_cs336.txt")
    out = tmp_path / "sweep"
    common = ["--set", "steps=3", "batch_size=2", "seq_len=32", "log_every=1", "model.dim=64", "model.ffn_dim=192",
              f"data.tokenizer={tok}", f"data.paths={text}"]
    args = ["--base", BASE, "--grid", "model.remat=none,full", *common, "--out", str(out)]

    assert sweep.main([*args, "--mode", "print"]) == 0  # the per-variant (cluster job) commands
    commands = (out / "commands.sh").read_text().splitlines()[2:]
    assert len(commands) == 2 and all("-m llama.train" in c and "model.remat=" in c for c in commands)

    assert sweep.main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["remat=none", "remat=full"]
    assert [r["model.remat"] for r in rows] == ["none", "full"]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "3"
        assert math.isfinite(float(r["final_loss"])) and float(r["final_loss"]) < 7.0  # ~ln(512)=6.24 at init
        m = json.loads((out / r["manifest"]).read_text())
        assert m["config"]["model"]["remat"] == r["model.remat"] and m["config"]["steps"] == 3
        assert r["manifest"].endswith("/manifest.json")  # the trainer's own manifest, linked from the table
        sm = json.loads((out / r["manifest"]).with_name("sweep_manifest.json").read_text())
        assert sm["extra"]["overrides"] == [f"model.remat={r['model.remat']}"] and sm["extra"]["returncode"] == 0
        assert m["git"]["commit"] and m["environment"]["packages"]["jax"]
        assert {d["kind"] for d in m["data"]} == {"file"} and len(m["data"]) == 2  # text + tokenizer
    # Remat recomputes the same operations, so the losses agree to float32 rounding (XLA may fuse the
    # recomputed graph differently; 1e-5 relative is ~100 float32 ulps).
    assert math.isclose(float(rows[0]["final_loss"]), float(rows[1]["final_loss"]), rel_tol=1e-5)
    md = (out / "results.md").read_text()
    assert "| remat=full | full | ok |" in md and "](variants/remat=full/" in md
    assert (out / "loss.png").stat().st_size > 1000

    # A rerun skips finished variants; collect rebuilds the same table.
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("already finished, skipped") == 2
    os.remove(out / "results.csv")
    assert sweep.main([*args, "--mode", "collect"]) == 0
    with open(out / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows
