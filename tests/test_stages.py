"""The staged schedule (TrainConfig.stages): starts by step or by tokens, checks, and a run that crosses a
boundary (re-packed data, recompiled step) resumes bit-exactly from a checkpoint at or right after it, also
after a SIGKILL."""

import math
import os
import subprocess
import sys

import pytest

from llama import optim
from llama.config import TINY, ConfigError
from llama.optim import OptimizerConfig
from llama.metrics import read_jsonl
from llama.train import Stage, TrainConfig, stage_at, stage_schedule
from sharding.mesh import MeshConfig
from test_train import ROOT, _launch, _logged, _wait_for, write_experiment


def test_stage_schedule_by_steps_and_tokens():
    # Llama 3 405B's batch ramp (paper section 3.4.1) in miniature: 4 x 16 tokens, then 8 x 32 once 640 tokens
    # are done (step 10), then 16 x 32 from step 15.
    cfg = TrainConfig(model=TINY, batch_size=4, seq_len=16, stages=(
        Stage(seq_len=32, batch_size=8, start_tokens=640), Stage(seq_len=32, batch_size=16, start_step=15)))
    assert stage_schedule(cfg) == [(0, 16, 4), (10, 32, 8), (15, 32, 16)]
    assert [stage_at(cfg, s)[0] for s in (0, 9, 10, 14, 15, 99)] == [0, 0, 1, 1, 2, 2]
    assert (stage_at(cfg, 12)[1].seq_len, stage_at(cfg, 12)[1].batch_size) == (32, 8)
    # a token start that is not a whole number of steps rounds up (the first step with at least that many)
    cfg = cfg.replace(stages=(Stage(seq_len=32, batch_size=8, start_tokens=650),))
    assert stage_schedule(cfg)[1][0] == 11
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # as stored in checkpoints


def test_a_stage_with_its_own_learning_rate_schedule():
    """Stage.optimizer: from the stage's first step its own warmup + cosine (counted from that step); before it
    the run's schedule, and a later stage without one keeps it."""
    run = OptimizerConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=2, decay_steps=8)
    rewarm = run.replace(peak_lr=1e-3, end_lr=1e-4, warmup_steps=2, decay_steps=4)
    cfg = TrainConfig(model=TINY, batch_size=4, seq_len=16, optimizer=run, stages=(
        Stage(32, 4, start_step=10, optimizer=rewarm), Stage(64, 2, start_step=20)))

    def lr(step):
        return float(optim.learning_rate(stage_at(cfg, step)[1].optimizer, step))

    assert [stage_at(cfg, s)[1].optimizer.start_step for s in (0, 9, 10, 19, 20, 30)] == [0, 0, 10, 10, 10, 10]
    # the run's: warmup, then 7/8 of its cosine (steps 2-10) at step 9
    assert lr(1) == pytest.approx(1.5e-3) and lr(9) == pytest.approx(3e-4 + 1.35e-3 * (1 + math.cos(7 * math.pi / 8)))
    assert lr(10) == 0 and lr(11) == pytest.approx(5e-4) and lr(12) == pytest.approx(1e-3)  # re-warmed
    assert lr(14) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the stage's cosine
    assert lr(16) == pytest.approx(1e-4) and lr(25) == pytest.approx(1e-4)  # held, also in the next stage
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # as stored in checkpoints
    with pytest.raises(ConfigError, match=r"stages\[0\]\.optimizer: only the schedule .* got \['b2'\]"):
        cfg.replace(stages=(Stage(32, 4, start_step=10, optimizer=rewarm.replace(b2=0.99)),))


def test_bad_stages_are_clear_errors():
    with pytest.raises(ConfigError, match=r"stages\[0\]: give exactly one of start_step and start_tokens"):
        TrainConfig(model=TINY, stages=(Stage(seq_len=32, batch_size=8),))
    with pytest.raises(ConfigError, match=r"stages\[1\] starts at step 5, not after the previous stage's start 10"):
        TrainConfig(model=TINY, stages=(Stage(32, 8, start_step=10), Stage(64, 8, start_step=5)))
    with pytest.raises(ConfigError, match=r"stages\[0\]: seq_len=512.*max_seq_len=256"):
        TrainConfig(model=TINY, stages=(Stage(512, 8, start_step=10),))
    with pytest.raises(ConfigError, match=r"stages\[0\]: seq_len=96 is not divisible by 2 x mesh.context = 64"):
        TrainConfig(model=TINY, seq_len=64, mesh=MeshConfig(context=32), stages=(Stage(96, 8, start_step=3),))


def staged_experiment(tmp_path, **changes) -> str:
    """tests/test_train.py's tiny experiment with a boundary at step 4: 8 x 32 tokens, then 4 x 64 with the
    learning rate re-warmed (a stage optimizer: 0 at step 5, 1e-3 from step 6)."""
    rewarm = OptimizerConfig(peak_lr=1e-3, warmup_steps=1, decay_steps=20)
    path = write_experiment(tmp_path, seq_len=32, stages=(
        Stage(seq_len=64, batch_size=4, start_tokens=1024, optimizer=rewarm),), **changes)
    text = open(path).read().replace("from llama.train import DataConfig, TrainConfig",
                                     "from llama.train import DataConfig, Stage, TrainConfig")
    open(path, "w").write(text)
    return path


def metrics(out) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["stage"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl"))}


@pytest.mark.slow
def test_resume_is_exact_across_a_stage_boundary(tmp_path):
    """8 steps straight == 4 steps (the checkpoint ends stage 0) + resume == 5 steps (one step into stage 1)
    + resume: the same losses bit for bit, and the metrics mark the stage of every step."""
    from llama.train import main

    exp = staged_experiment(tmp_path)
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert main(["--config", exp, "--out", a]) == 0
    for out, first in ((b, 4), (c, 5)):
        assert main(["--config", exp, "--out", out, "--set", f"steps={first}", "checkpoint_every=1"]) == 0
        assert main(["--config", exp, "--out", out]) == 0
    ma = metrics(a)
    assert sorted(ma) == list(range(1, 9)) and [ma[s][1] for s in range(1, 9)] == [0] * 4 + [1] * 4
    lrs = {r["step"]: r["lr"] for r in read_jsonl(os.path.join(a, "metrics.jsonl"))}
    assert lrs[4] > 1.5e-3 and lrs[5] == 0 and lrs[6] == pytest.approx(1e-3)  # the stage's own schedule
    assert metrics(b) == ma and metrics(c) == ma


@pytest.mark.slow
def test_sigkill_right_after_a_boundary_resumes_bit_exact(tmp_path):
    exp = staged_experiment(tmp_path, checkpoint_every=1)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert subprocess.run([sys.executable, "-m", "llama.train", "--config", exp, "--out", ref], cwd=ROOT,
                          capture_output=True).returncode == 0
    proc = _launch(exp, out)
    _wait_for(lambda: _logged(out) >= 5, proc)  # the first step of stage 1 is done
    proc.kill()
    proc.wait()
    assert subprocess.run([sys.executable, "-m", "llama.train", "--config", exp, "--out", out], cwd=ROOT,
                          capture_output=True).returncode == 0
    assert metrics(out) == metrics(ref)
