"""The trainer: gradients, accumulation, the loss falling on real text, exact resume, preemption, NaN stop,
and every experiment file building (abstract shapes only for the pod-scale ones)."""

import dataclasses
import functools
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.test_util  # noqa: F401  (check_grads; not loaded by `import jax`)
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from conftest import require_shared
from llama import optim
from llama.config import TINY, ModelConfig
from llama.model import init_params
from llama.metrics import read_jsonl, train_flops_per_token
from llama.optim import OptimizerConfig
from llama.train import (BATCH_KEYS, TrainConfig, _objective, abstract_state, apply_overrides,
                         checkpoint_manager, compute_grads, load_experiment, make_train_step, restore_checkpoint,
                         train_step)
from sharding.rules import MESH_AXES, MeshConfig, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ModelConfig(name="micro", vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                    rope_theta=10000.0, max_seq_len=64, bos_id=1, eos_ids=(2,))


def packed_batch(rng, B, T, V, docs_per_row=2):
    """Random tokens in rows of `docs_per_row` documents, with their segment ids and restarting positions."""
    toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    cut = T // docs_per_row
    seg = np.minimum(np.arange(T) // cut, docs_per_row - 1) + 1
    pos = np.arange(T) - (seg - 1) * cut
    mask = np.ones((B, T), np.float32)
    mask[:, -3:] = 0  # some masked targets, as padding would be
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.tile(seg.astype(np.int32), (B, 1)),
            "positions": np.tile(pos.astype(np.int32), (B, 1)), "loss_mask": mask}


@pytest.mark.parametrize("loss_chunk", [0, 6], ids=["plain", "chunked"])
def test_gradients_match_finite_differences(loss_chunk):
    cfg = TrainConfig(model=MICRO, batch_size=2, seq_len=8, loss_chunk=loss_chunk)
    params = init_params(MICRO, jax.random.key(0))
    batch = packed_batch(np.random.default_rng(0), 2, 8, MICRO.vocab_size)
    n = jnp.float32(batch["loss_mask"].sum())
    loss = jax.jit(lambda p: _objective(p, batch, cfg=cfg.replace(z_loss=1e-2), n_tokens=n)[0])
    # Central differences along a random direction in float32: eps 1e-3 keeps the rounding error (ulp of a
    # loss near ln 64 over eps, ~5e-4) and the O(eps^2) truncation error both well under the 1e-2 tolerance.
    jax.test_util.check_grads(loss, (params,), order=1, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)
    # ... and the train step's gradient (through the micro-batch scan) is the same gradient.
    grads, *_ = compute_grads(params, batch, cfg=cfg.replace(z_loss=1e-2))
    want = jax.grad(loss)(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_grad_accumulation_equals_one_big_batch():
    cfg = TrainConfig(model=MICRO, batch_size=8, seq_len=16, z_loss=1e-4)
    params = init_params(MICRO, jax.random.key(1))
    batch = packed_batch(np.random.default_rng(1), 8, 16, MICRO.vocab_size)
    batch["loss_mask"][3, :10] = 0  # micro-batches with different token counts
    one = compute_grads(params, batch, cfg=cfg)
    four = compute_grads(params, batch, cfg=cfg.replace(micro_batches=4))
    # Same sums in another order: float32 rounding only (~1e-7 relative per add, a few hundred adds).
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("loss_chunk", [0, 16], ids=["plain", "chunked"])
def test_segment_weights_make_the_loss_a_weighted_mean(tmp_path, loss_chunk):
    """data.format=segments: the step's loss is sum_t w_t nll_t / sum_t w_t over the batch, w the segment weights
    (here an answer x 20 and padding 0), computed by hand from the model's logits. The unweighted mean differs by
    far more than the tolerance (asserted), so dropping the weights (a 0/1 mask) fails this test."""
    import input_pipeline
    from llama.model import forward
    from llama.tokenizer import load_tokenizer
    from llama.train import objective_metrics

    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    rows = [{"segments": [{"text": f"Once upon a time the key was {k}. The key was", "weight": 1},
                          {"text": f" {k}", "weight": 20}, {"text": ". The end.", "weight": 1},
                          {"text": " ###", "weight": 0}]} for k in (31415, 27182, 14142, 17320)]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = input_pipeline.DataConfig.from_paths(str(path), format="segments", prefetch=0, shuffle=False)
    with input_pipeline.make_dataset(data, tok, seq_len=64, global_batch_size=2, seed=0, process_index=0,
                                     process_count=1) as it:
        batch = next(it)
    w = batch["loss_mask"]
    assert set(np.unique(w)) == {0.0, 1.0, 20.0}
    cfg_model = MICRO.replace(vocab_size=512)
    cfg = TrainConfig(model=cfg_model, batch_size=2, seq_len=64, loss_chunk=loss_chunk)
    params = init_params(cfg_model, jax.random.key(0))
    with jax.default_matmul_precision("highest"):
        _, sums, norms = jax.jit(functools.partial(compute_grads, cfg=cfg))(params, batch)
        logits = forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=cfg_model)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    want = (w * nll).sum() / w.sum()
    got = float(objective_metrics(sums, norms, cfg)["loss"])
    # float32 sums of ~100 terms near ln 512 = 6.2: relative error ~1e-6; the weights move the mean by > 1e-3
    assert got == pytest.approx(want, rel=1e-5)
    assert abs((nll * (w > 0)).sum() / (w > 0).sum() - want) > 1e-3 * want


def test_opt_state_shardings_follow_params():
    cfg = TrainConfig(model=TINY, batch_size=8, seq_len=16, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh = make_mesh(cfg.mesh)
    init, _ = make_train_step(cfg, mesh)
    state = init(0)
    adam = state.opt_state[1][0]
    for p, mu, nu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        assert mu.sharding == p.sharding == nu.sharding
    assert state.params["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_schedule_and_presets():
    c = optim.LLAMA3_405B
    lr = lambda s: float(optim.learning_rate(c, s))
    assert lr(0) == 0.0 and math.isclose(lr(8000), 8e-5, rel_tol=1e-6)
    assert math.isclose(lr(1_200_000), 8e-7, rel_tol=1e-5) and math.isclose(lr(2_000_000), 8e-7, rel_tol=1e-5)
    mask = optim.decay_mask(c, {"embed": 0, "final_norm": 0, "lm_head": 0, "layers": {"attn_norm": 0, "wq": 0}})
    assert mask == {"embed": False, "final_norm": False, "lm_head": True, "layers": {"attn_norm": False, "wq": True}}


def test_overrides():
    cfg = TrainConfig(model=TINY)
    new = apply_overrides(cfg, ["optimizer.peak_lr=3e-4", "steps=50", "model.n_layers=3", "data.paths=a/*.txt",
                                "optimizer.decay_norms=true"])
    assert (new.optimizer.peak_lr, new.steps, new.model.n_layers, new.data.paths) == (3e-4, 50, 3, "a/*.txt")
    assert new.optimizer.decay_norms is True
    with pytest.raises(ValueError, match="no field 'peak'"):
        apply_overrides(cfg, ["optimizer.peak=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["steps=1.5"])


def test_loss_falls_on_tiny_shakespeare():
    """Bytes of tiny-shakespeare (vocab 256) through TINY on a 2x2x2 mesh. ln(256) = 5.55 nats at init; the
    byte unigram entropy of the text is 3.3 nats, so a mean below 3.0 over the last 5 of 40 steps shows the
    model has learned more than byte frequencies."""
    text = np.frombuffer(require_shared("assets", "text", "tinyshakespeare", "input.txt").read_bytes(), np.uint8)
    cfg = TrainConfig(model=TINY, optimizer=OptimizerConfig(peak_lr=1e-2, end_lr=1e-3, warmup_steps=5, decay_steps=35),
                      batch_size=16, seq_len=64, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    init, step = make_train_step(cfg, make_mesh(cfg.mesh))
    state, rng, losses = init(0), np.random.default_rng(0), []
    T = cfg.seq_len
    for _ in range(40):
        starts = rng.integers(0, len(text) - T - 1, cfg.batch_size)
        rows = np.stack([text[s:s + T + 1] for s in starts]).astype(np.int32)
        batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((16, T), np.int32),
                 "positions": np.tile(np.arange(T, dtype=np.int32), (16, 1)), "loss_mask": np.ones((16, T), np.float32)}
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert abs(losses[0] - math.log(256)) < 0.1, losses[0]
    assert np.mean(losses[-5:]) < 3.0, losses


def test_flops_formula():
    # 6 * matmul params + 12 * L * N * H * T (metrics module docstring), by hand for MICRO at T = 8:
    # per layer 32*4*8 + 2*32*2*8 + 4*8*32 + 3*32*64 = 1024 + 1024 + 1024 + 6144 = 9216; head 32*64 = 2048.
    assert train_flops_per_token(MICRO, 8) == 6 * (9216 + 2048) + 12 * 1 * 4 * 8 * 8


# ----------------------------------------------------------------------------------- runs through main()
def write_experiment(tmp_path, **changes) -> str:
    """A tiny experiment on tiny-shakespeare with the llama2.c 512-piece SentencePiece tokenizer."""
    # The first 40 kB of tiny-shakespeare, one document per speech (blank-line separated): ~400 documents,
    # enough for 8 steps of 8 x 64 tokens without the pipeline tokenizing the whole 1 MB file.
    text = tmp_path / "shakespeare_head.txt"
    text.write_bytes(require_shared("assets", "text", "tinyshakespeare", "input.txt").read_bytes()[:40_000])
    tok = require_shared("assets", "llama2c_stories260K", "tok512.model")
    fields = dict(steps=8, batch_size=8, seq_len=64, log_every=1, checkpoint_every=4, keep_checkpoints=2,
                  sample_tokens=0)
    fields.update(changes)
    path = tmp_path / "exp.py"
    path.write_text(f'''"""Test experiment."""
from llama.config import TINY
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig
CONFIG = TrainConfig(model=TINY.replace(vocab_size=512), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
    optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=2, decay_steps=20),
    data=DataConfig(paths={str(text)!r}, separator="\\n\\n", tokenizer={str(tok)!r}), **{fields!r})
''')
    return str(path)


def losses_by_step(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))}


def final_data_state(out, cfg_path):
    cfg = load_experiment(cfg_path)
    mngr = checkpoint_manager(out, cfg)
    step = mngr.latest_step()
    state, data, _ = restore_checkpoint(mngr, step, cfg, make_mesh(cfg.mesh))
    mngr.close()
    return step, data, state


def test_exact_resume(tmp_path):
    """8 steps straight == 4 steps, a restart, 4 more: the same losses bit for bit, the same iterator state
    (hence the same next batches) and the same parameters. The restart reads the step-4 checkpoint with its
    iterator state in the first format (one process's state, before per-process positions), so older
    checkpoints resume too."""
    from llama.train import main

    exp = write_experiment(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--config", exp, "--out", a]) == 0
    assert main(["--config", exp, "--out", b, "--set", "steps=4"]) == 0
    item = os.path.join(b, "checkpoints", "4", "data", "metadata")
    with open(item) as f:
        saved = json.load(f)
    with open(item, "w") as f:
        json.dump(saved["processes"][0], f)
    assert main(["--config", exp, "--out", b]) == 0
    la, lb = losses_by_step(a), losses_by_step(b)
    assert sorted(la) == list(range(1, 9)) and la == lb
    sa, da, state_a = final_data_state(a, exp)
    sb, db, state_b = final_data_state(b, exp)
    assert sa == sb == 8 and da == db
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(x, y)
    assert os.path.exists(os.path.join(a, "loss.png"))


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """lr 1e12 blows the parameters up after the first non-zero-lr step; the loss of the step after is NaN."""
    from llama.train import main

    exp = write_experiment(tmp_path, steps=20, checkpoint_every=1)
    out = str(tmp_path / "nan")
    assert main(["--config", exp, "--out", out, "--set", "optimizer.peak_lr=1e12", "optimizer.warmup_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step" in err, err
    bad = int(err.split("non-finite loss at step ")[1].split()[0])
    step, _, state = final_data_state(out, exp)
    assert step == bad - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_metrics_fetched_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    """No host stall: the loop fetches step N's metrics only after dispatching step N+1, except where it saves:
    saving step N waits for N's metrics (the NaN check), so a checkpoint step is fetched before the save."""
    from llama import train

    events, owner = [], {}
    real_make, real_get, real_save = train.make_train_step, jax.device_get, train.save_checkpoint

    def make(cfg, mesh):
        init, step = real_make(cfg, mesh)

        def dispatch(state, batch):
            state, m = step(state, batch)
            owner[id(m)] = n = sum(e[0] == "dispatch" for e in events) + 1
            events.append(("dispatch", n))
            return state, m

        return init, dispatch

    def device_get(x):
        if id(x) in owner:
            events.append(("fetch", owner[id(x)]))
        return real_get(x)

    def save(mngr, state, cfg, data_state):
        events.append(("save", int(real_get(state.step))))
        return real_save(mngr, state, cfg, data_state)

    monkeypatch.setattr(train, "make_train_step", make)
    monkeypatch.setattr(jax, "device_get", device_get)
    monkeypatch.setattr(train, "save_checkpoint", save)
    out = str(tmp_path / "run")
    assert train.main(["--config", write_experiment(tmp_path), "--out", out]) == 0  # 8 steps, saves at 4 and 8
    d, f, s = (lambda n: ("dispatch", n)), (lambda n: ("fetch", n)), (lambda n: ("save", n))
    assert events == [d(1), d(2), f(1), d(3), f(2), d(4), f(3), f(4), s(4),
                      d(5), d(6), f(5), d(7), f(6), d(8), f(7), f(8), s(8)]
    assert sorted(losses_by_step(out)) == list(range(1, 9))  # log_every=1: every step's metrics still logged


def _launch(exp, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "llama.train", "--config", exp, "--out", out, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.002)


def _logged(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_sigterm_saves_and_exits_zero(tmp_path):
    exp = write_experiment(tmp_path, steps=100000, checkpoint_every=1000)
    out = str(tmp_path / "term")
    proc = _launch(exp, out)
    _wait_for(lambda: _logged(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    step, _, _ = final_data_state(out, exp)
    assert step == max(losses_by_step(out))


@pytest.mark.slow
def test_sigkill_never_leaves_a_bad_checkpoint(tmp_path):
    """Kill -9 during a step and during an async save, restart each time; the finished run's losses equal an
    uninterrupted run's bit for bit, so every checkpoint it resumed from restored exactly."""
    exp = write_experiment(tmp_path, steps=16, checkpoint_every=2, keep_checkpoints=3)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert subprocess.run([sys.executable, "-m", "llama.train", "--config", exp, "--out", ref], cwd=ROOT,
                          capture_output=True).returncode == 0
    ckpts = os.path.join(out, "checkpoints")
    saving = lambda: any("tmp" in n for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else []))
    for when in (lambda: _logged(out) >= 3, saving, lambda: _logged(out) >= 9 and saving()):
        proc = _launch(exp, out)
        _wait_for(when, proc)
        proc.kill()
        proc.wait()
    assert subprocess.run([sys.executable, "-m", "llama.train", "--config", exp, "--out", out], cwd=ROOT,
                          capture_output=True).returncode == 0
    assert losses_by_step(out) == losses_by_step(ref)


# ------------------------------------------------------------------------------------- experiment files
EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     if not os.path.basename(p).startswith(("bench_", "__")))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_builds(path):
    """Every experiment loads, its state shards over its own mesh, and a train step type-checks
    (jax.eval_shape: no memory, so the 405B pod config is checked here too)."""
    cfg = load_experiment(path)
    assert "python -m " in open(path).read()  # states its run command
    # cuDNN attention cannot be traced without a GPU; the xla path has the same shapes.
    cfg = cfg.replace(model=cfg.model.replace(attention_impl="xla"))
    sizes = cfg.mesh.shape(8) if -1 in dataclasses.astuple(cfg.mesh) else dataclasses.asdict(cfg.mesh)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    state = abstract_state(cfg, mesh)
    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in BATCH_KEYS}
    tx = optim.make_optimizer(cfg.optimizer)
    new_state, metrics = jax.eval_shape(functools.partial(train_step, cfg=cfg, tx=tx), state, batch)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), new_state.params) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), state.params)
    assert metrics["loss"].shape == ()
