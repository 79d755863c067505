"""Context parallelism on 8 simulated CPU devices equals one device: forward logits, the trainer's real step
(loss, gradients, updated parameters) on packed rows of ragged documents, for context = 2, 4 and 8 alone and
with fsdp and tensor; a context that does not split the row into 2 x CP chunks is a clear error; per-device
activation memory falls about as 1/CP (XLA's compiled memory analysis, nothing run)."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
from input_pipeline.context import from_load_balanced, load_balanced_order, to_load_balanced
from llama import model, optim, train
from llama.config import TINY
from sharding import rules
from conftest import mesh_of
from sharding.mesh import MeshConfig, ShardingError, make_mesh

# TINY (4 query / 2 KV heads, so tensor=2 splits both) with 8-slot attention tiles, so the flash kernel's tile
# skipping runs over several tiles per device; at context=8 a device's two chunks of T/16 = 4 slots share one
# query tile (the non-contiguous case).
CFG = TINY.replace(attention_block_q=8, attention_block_k=8)
B, T = 4, 64

# CP vs 1 device, float32: the same arithmetic except the order of the softmax's key-tile accumulation (tiles
# start at other slots) and of sharded reductions. Observed: logits 2e-7, loss 1e-7 relative, gradients 8e-7
# relative to the largest entry of each tensor; 1e-5 is the float32 bound of tests/test_sharding.py.
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("highest_precision")



def packed_rows() -> dict[str, np.ndarray]:
    """Rows of several ragged documents (boundaries differ per row, one row ends in padding), positions restarting
    per document, targets the next token, loss mask 0 on padding and on each document's last token."""
    rng = np.random.default_rng(0)
    lengths = [[10, 30, 24], [37, 27], [5, 6, 7, 46], [20, 33]]  # the last row: 11 slots of padding (segment 0)
    tokens = rng.integers(3, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    seg, pos, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros((B, T), np.float32)
    for b, row in enumerate(lengths):
        start = 0
        for d, n in enumerate(row):
            seg[b, start:start + n], pos[b, start:start + n] = d + 1, np.arange(n)
            mask[b, start:start + n - 1] = 1
            start += n
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
            "loss_mask": mask}


# --------------------------------------------------------------------------------------------- the layout
def test_load_balanced_order():
    order = load_balanced_order(16, 2)  # 4 chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(load_balanced_order(16, 1), np.arange(16))
    for cp in (2, 4, 8):  # every device does the same causal work: sum of (slot + 1) over its share
        work = (load_balanced_order(T, cp) + 1).reshape(cp, -1).sum(1)
        assert (work == work[0]).all(), work
    batch = packed_rows()
    lb = to_load_balanced(batch, 4)
    for k in batch:  # everything travels with its token, and comes back
        np.testing.assert_array_equal(lb[k], batch[k][:, load_balanced_order(T, 4)])
        np.testing.assert_array_equal(from_load_balanced(lb[k], 4), batch[k])


def test_context_that_does_not_split_the_row_is_a_clear_error():
    with pytest.raises(ShardingError, match=r"T=60 is not divisible by 2 x context = 16 chunks \(context=8"):
        load_balanced_order(60, 8)
    rows = {k: v[:, :60] for k, v in packed_rows().items()}
    with pytest.raises(ShardingError, match=r"T=60 .* 2 x context = 16"):
        input_pipeline.to_global_batch(rows, mesh_of("context=8"))
    with pytest.raises(ShardingError, match=r"T=60 .* 2 x context = 16"):  # the model under such a mesh too
        with jax.set_mesh(mesh_of("context=8")):
            jax.eval_shape(functools.partial(model.forward, cfg=CFG), model.abstract_params(CFG),
                           jax.ShapeDtypeStruct((B, 60), np.int32))


# ----------------------------------------------------------------------------------------------- forward
def test_forward_logits_equal_one_device():
    batch = packed_rows()
    params = model.init_params(CFG, jax.random.key(0))
    fwd = jax.jit(functools.partial(model.forward, cfg=CFG))
    want = np.asarray(fwd(params, batch["tokens"], batch["positions"], batch["segment_ids"]))
    mesh = mesh_of("context=4,tensor=2")
    lb = input_pipeline.to_global_batch(batch, mesh)
    with jax.set_mesh(mesh):
        args = (params, lb["tokens"], lb["positions"], lb["segment_ids"])
        assert "shard_map" in str(jax.make_jaxpr(fwd)(*args))  # the context-parallel attention ran
        logits = fwd(*args)
    assert logits.sharding.spec[1] == "context"  # each device holds its own chunks' logits
    np.testing.assert_allclose(from_load_balanced(np.asarray(logits), 4), want, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------- the train step
def train_cfg(mesh_text: str) -> train.TrainConfig:
    # eps=1e-5: AdamW's first step is then smooth in the gradient (tests/test_sharding.py explains why)
    return train.TrainConfig(model=CFG, mesh=MeshConfig.parse(mesh_text), batch_size=B, seq_len=T, steps=1,
                             optimizer=optim.OptimizerConfig(peak_lr=1e-3, warmup_steps=0, decay_steps=10, eps=1e-5),
                             sample_tokens=0)


@functools.lru_cache(maxsize=None)
def one_step(mesh_text: str):
    """(initial params, loss metrics, gradients, updated params) of the trainer's jitted step under the mesh,
    with the batch placed as the trainer places it (input_pipeline.to_global_batch: load-balanced under CP)."""
    cfg, mesh = train_cfg(mesh_text), mesh_of(mesh_text)
    with jax.set_mesh(mesh):
        init_state, step = train.make_train_step(cfg, mesh)
        state = init_state(0)
        params0 = jax.device_get(state.params)
        batch = input_pipeline.to_global_batch(packed_rows(), mesh)
        grads = jax.jit(lambda p, b: train.compute_grads(p, b, cfg=cfg, mesh=mesh)[0])(state.params, batch)
        state, metrics = step(state, batch)
    return params0, jax.device_get(metrics), jax.device_get(grads), jax.device_get(state.params)


def assert_same_step(mesh_text: str):
    ref0, ref_m, ref_g, ref1 = one_step("fsdp=1")
    p0, m, g, p1 = one_step(mesh_text)
    jax.tree.map(np.testing.assert_array_equal, p0, ref0)
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=TOL, err_msg=k)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        assert np.abs(a - b).max() <= TOL * np.abs(b).max(), (jax.tree_util.keystr(path[0]), np.abs(a - b).max())
    # AdamW's first step with eps=1e-5 on these gradients: float32 rounding, as in tests/test_sharding.py
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), p1, ref1)


def test_train_step_equals_one_device():
    assert_same_step("context=2,fsdp=2,tensor=2")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["context=8", "context=2", "context=4", "context=4,fsdp=2", "context=4,tensor=2",
                                       "data=2,context=4", "context=2,fsdp=4"])
def test_train_step_equals_one_device_more_meshes(mesh_text):
    assert_same_step(mesh_text)


@pytest.mark.slow
def test_greedy_decoding_from_a_context_sharded_cache_equals_one_device():
    from llama import generate
    from sharding import rules

    cfg = TINY.replace(name="tiny-shardable", dim=128, n_heads=16, n_kv_heads=8, head_dim=8, ffn_dim=256)
    prompts = [[1, 17, 99, 4, 250], [1, 3, 3, 200, 7, 64, 31, 9, 122]]
    params = model.init_params(cfg, jax.random.key(0))
    want = generate.generate(params, prompts, cfg=cfg, max_new_tokens=12, stop_ids=[]).tokens
    mesh = mesh_of("context=2,fsdp=2,tensor=2")
    assert generate.cache_sharding(cfg, mesh, 2, 64).spec[3] == "context"  # S split over context
    assert rules.RULES["cache_sequence"] == ("context",)
    with jax.set_mesh(mesh):
        got = generate.generate(generate.shard_params(params, cfg, mesh), prompts, cfg=cfg, max_new_tokens=12,
                                stop_ids=[], mesh=mesh).tokens
    # identical ids: logits agree to float32 rounding and the smallest top-1/top-2 gap on these sequences is
    # far larger (tests/test_sharding.py's greedy test, the same model and prompts)
    assert got == want


# ------------------------------------------------------------------------- decoding from a sharded cache
DEC_B, DEC_S = 4, 64
PROMPTS = [5, 23, 40, 17]  # prompt lengths: row 0 stays in device 0's slots, row 2 crosses two boundaries at CP=4


def cached_logits(mesh_text: str | None, cache_dtype=None, cache_len: int = DEC_S, steps: int = 4):
    """Logits [steps + 1, B, V] of a prefill (each row's last prompt token) and `steps` greedy decode steps against
    one cache, the rows at their own positions (ragged prompts; the slots past each row's position are empty or
    hold the padding's K/V, which no query reads before its own write). With a mesh: the params and the cache
    sharded by the rules table (the cache's S over `context`), traced under it. Also returns the decode step's
    jaxpr text."""
    from llama import generate

    params = model.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    T = max(PROMPTS)
    tokens = rng.integers(3, CFG.vocab_size, (DEC_B, T)).astype(np.int32)
    lengths = np.asarray(PROMPTS, np.int32)
    cache = model.init_cache(CFG, DEC_B, cache_len, cache_dtype)
    fwd = jax.jit(functools.partial(model.forward_cached, cfg=CFG))
    mesh = mesh_of(mesh_text) if mesh_text else None
    ctx = jax.set_mesh(mesh) if mesh else contextlib.nullcontext()
    with ctx:
        if mesh:
            params = generate.shard_params(params, CFG, mesh)
            cache = jax.device_put(cache, rules.cache_shardings(mesh, cache))
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (DEC_B, T))
        logits, cache = fwd(params, tokens, positions, cache, logits_at=jnp.asarray(lengths - 1))
        out = [np.asarray(logits[:, 0])]
        pos = jnp.asarray(lengths)
        for _ in range(steps):
            tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
            logits, cache = fwd(params, tok, pos[:, None], cache)
            out.append(np.asarray(logits[:, 0]))
            pos = pos + 1
        jaxpr = str(jax.make_jaxpr(fwd)(params, tok, pos[:, None], cache))
    return np.stack(out), jaxpr


@pytest.mark.parametrize("mesh_text,cache_dtype", [("context=4,tensor=2", None), ("context=2,fsdp=2,tensor=2", None),
                                                   ("context=8", "int8")])
def test_decoding_from_a_context_sharded_cache_equals_one_device(mesh_text, cache_dtype):
    want, one_jaxpr = cached_logits(None, cache_dtype)
    got, jaxpr = cached_logits(mesh_text, cache_dtype)
    assert "shard_map" in jaxpr and "shard_map" not in one_jaxpr  # flash-decoding across devices ran
    # float32; the same per-slot arithmetic, the softmax summed in another order (per device, then combined):
    # observed 2e-7 (TOL's 1e-5 is the float32 bound of this file)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # greedy ids follow (logits agree and the top-2 gaps here are far above 1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_a_cache_that_context_does_not_divide_takes_the_unsplit_path():
    # 66 slots are not a multiple of context=4: the rules replicate S on context (every device holds all slots)
    want, _ = cached_logits(None, cache_len=66, steps=2)
    got, jaxpr = cached_logits("context=4,tensor=2", cache_len=66, steps=2)
    assert "shard_map" not in jaxpr
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_decode_step_moves_statistics_not_the_cache():
    """The compiled decode step at 4,096 slots over context=4: its collectives (all-gather, all-reduce, ...) carry
    at most [B, 1, N, H] float32 per layer, never a shard of the cache."""
    from experiments.bench_context_parallel import collective_bytes
    from llama import generate

    S, B = 4096, DEC_B
    cfg = CFG.replace(max_seq_len=S)
    mesh = mesh_of("context=4")
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              model.abstract_params(cfg), generate.param_shardings(cfg, mesh))
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(lambda: model.init_cache(cfg, B, S)),
                             rules.cache_shardings(mesh, jax.eval_shape(lambda: model.init_cache(cfg, B, S))))
        tok = jax.ShapeDtypeStruct((B, 1), np.int32)
        hlo = jax.jit(functools.partial(model.forward_cached, cfg=cfg)).lower(params, tok, tok, cache).compile() \
            .as_text()
    sizes = collective_bytes(hlo)
    stats = B * cfg.n_heads * cfg.head_dim * 4  # one [B, 1, N, H] float32 output
    local_layer = B * cfg.n_kv_heads * (S // 4) * cfg.head_dim * 4  # one layer's K on one device
    assert sizes and max(sizes) <= stats, (sorted(sizes), stats)
    assert max(sizes) * 64 < local_layer


# ------------------------------------------------------------------------------------------------ memory
def compiled_temp_bytes(mesh_text: str, seq_len: int) -> int:
    """XLA's per-device temporary memory of the trainer's compiled step (compile only; nothing runs)."""
    cfg = train_cfg(mesh_text).replace(seq_len=seq_len, batch_size=1,
                                       model=CFG.replace(max_seq_len=seq_len, attention_block_q=256,
                                                         attention_block_k=256, remat="none"))
    mesh = mesh_of(mesh_text)
    with jax.set_mesh(mesh):
        _, step = train.make_train_step(cfg, mesh)
        state = train.abstract_state(cfg, mesh)
        batch = {k: jax.ShapeDtypeStruct((1, seq_len), np.float32 if k == "loss_mask" else np.int32)
                 for k in train.BATCH_KEYS}
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_activation_memory_falls_as_one_over_context():
    # At T=4096 with no remat the [T, D] and [T, F] activations dominate the step's temporaries (the tiny model's
    # parameters and optimizer state are ~1 MB); each device keeps its T/CP tokens' share. The all-gathered
    # K/V ([T, K, H] per layer) and the flash kernel's per-tile blocks do not shrink, hence "about".
    one, four = compiled_temp_bytes("fsdp=1", 4096), compiled_temp_bytes("context=4", 4096)
    assert four < 0.35 * one, (one, four)


# ------------------------------------------------------------------------------------------------ planner
def test_planner_405b_at_128k_with_the_papers_cp_and_tp(capsys):
    """Llama 3 405B at 131,072 tokens: CP 16 and TP 8 (paper Table 4), the rest of 16,384 GPUs fsdp (the paper's
    PP 16 x DP 8, which this project does not have), 128 rows of 128K = 16M tokens per batch, remat full."""
    from llama.config import LLAMA31_405B
    from llama.loss import LOSS_CHUNK
    from sharding import plan as P

    def at(mesh, devices, batch):
        return P.plan(LLAMA31_405B, MeshConfig.parse(mesh), devices, mode="training", remat="full",
                      seq_len=131072, batch=batch, attention="cudnn", device_memory=80e9)

    cp16 = at("fsdp=-1,context=16,tensor=8", 16384, 128)
    assert cp16.mesh == {"data": 1, "fsdp": 128, "context": 16, "tensor": 8} and cp16.fits
    # Per device: the state as with fsdp x tensor = 1024 (parameters are not sharded over context) ...
    # (plus the replicated norm gains, 2 x 126 x 16384 floats = 16.5 MB)
    assert cp16.params_bytes == pytest.approx(LLAMA31_405B.param_count() * 4 / 1024 + 2 * 126 * 16384 * 4, rel=1e-3)
    # ... and activations of 131072/16 tokens plus one layer's gathered K, V (and their float32 gradients).
    no_cp = at("fsdp=-1,tensor=8", 1024, 128)  # the same fsdp x tensor and rows per device (1), without CP
    kv = 131072 * 2 * 8 * 128 / 8 * (2 + 4)
    tiles = P.attention_tile_bytes(LLAMA31_405B.replace(attention_impl="cudnn"), 1, 8192, 8, training=True)
    # The fused output layer + loss (llama/loss.py) cuts each of the 128 rows into chunks of LOSS_CHUNK // 128 = 32
    # positions: far less than a layer's backward working set, which the planner counts instead (the two are
    # never alive together, sharding/plan.py), so the activations scale as a whole.
    assert LOSS_CHUNK // 128 == 32
    assert cp16.activations_bytes - tiles == pytest.approx((no_cp.activations_bytes - tiles) / 16 + kv, rel=1e-6)
    assert not no_cp.fits  # a whole 128K row per device does not fit 80 GB, even with remat
    # CP 16 on 2048 GPUs (fsdp 16): the state is then 8x larger per device and no longer fits.
    assert not at("fsdp=-1,context=16,tensor=8", 2048, 16).fits
    assert P.main(["--preset", "llama3.1-405b", "--mesh", "fsdp=-1,context=16,tensor=8", "--devices", "16384",
                   "--mode", "training", "--seq-len", "131072", "--batch", "128", "--remat", "full",
                   "--attention", "cudnn"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "context=16" in out and "PP 16" in out
    assert P.main(["--preset", "llama3.2-1b", "--mesh", "fsdp=2,context=4", "--mode", "training"]) == 0
    assert "(8 devices)" in capsys.readouterr().out  # context counts in the device total


# --------------------------------------------------------------------------------------------- multi-host
def losses_on_two_hosts_mesh(dcn_fsdp: int) -> list[float]:
    """Three steps of the trainer's step on fsdp=2 x context=4; with dcn_fsdp=2, fsdp crosses the two processes
    and each process's 4 devices form one context group (as CP stays inside a node, like TP). Each process places
    only its own rows."""
    cfg = train_cfg("fsdp=2,context=4").replace(mesh=MeshConfig(fsdp=2, context=4, dcn_fsdp=dcn_fsdp))
    mesh = make_mesh(cfg.mesh)
    rows, n, p = packed_rows(), B // jax.process_count(), jax.process_index()
    losses = []
    with jax.set_mesh(mesh):
        init_state, step = train.make_train_step(cfg, mesh)
        state = init_state(0)
        batch = input_pipeline.to_global_batch({k: v[p * n:(p + 1) * n] for k, v in rows.items()}, mesh)
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
def test_two_processes_with_context_4_match_one():
    import json
    import os
    import subprocess
    import sys

    from test_multihost import ROOT, _free_port

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, __file__, f"127.0.0.1:{port}", "2", str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reference = losses_on_two_hosts_mesh(1)  # this process: 8 devices, one process
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 0, f"worker failed:\n{err[-3000:]}"
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    # float32, another all-reduce order across processes (gloo): the 1e-5 bound of tests/test_multihost.py
    np.testing.assert_allclose(outs[0], reference, rtol=1e-5)
    assert reference[2] < reference[0]


if __name__ == "__main__":  # a worker of the two-process test: COORDINATOR NUM_PROCESSES PROCESS_ID
    import json
    import sys

    from sharding import distributed

    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), timeout_s=60)
    print(json.dumps(losses_on_two_hosts_mesh(2)))
