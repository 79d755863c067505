"""Long context on the CPU: prefill, a train step and decode of a Llama 3.1-architecture probe, against
transformers' LlamaForCausalLM with sdpa attention, each run in its own process, the two sides alternated.

    python -m experiments.bench_long_context                          # the issue-13 set (the 128K prefill takes minutes)
    python -m experiments.bench_long_context --prefill 1024,2048 --train 1024 --decode 512:1024,512:4096 --quick

The probe: dim 256, 2 layers, 8 query / 2 KV heads (head 32), FFN 768, vocab 4096, llama3 RoPE scaling, float32,
batch 1, random weights (timings do not depend on them), max_seq_len 2^17 + 64 (a 131,072-token prompt and its
first new token fit).
- prefill T: ours is `generate`'s prefill program (chunks of `--prefill-chunk`, a KV cache of T + 64 slots, the
  first token from the logits at the last one), timed after an ahead-of-time compile (reported apart); the peer is
  the same job in transformers (`model(ids, use_cache=True, logits_to_keep=1)`, sdpa), timed after a 128-token
  warm-up call. Both report wall and process CPU seconds (all threads: CPU above wall means both cores worked)
  of the first timed call, and of each of `--repeat` calls.
- train T: value_and_grad of the mean next-token cross-entropy (ours: `model.forward`, flash attention with its
  custom VJP; the peer: `loss.backward()`), one step timed after a compile / warm-up step. `--docs N`: the row
  packs N documents of T/N tokens (ours: segment ids and positions restarting per document, as the input pipeline
  packs them; the peer: the same tokens as a batch of N separate sequences, which is what packing saves it from).
- decode P:S: ours only: 32 greedy decode steps starting at position P of an S-slot cache (the decode loop of
  `generate`; the cache's contents do not change the cost), tokens/s. Issue 13's target: P=1024 in a 131,072-slot
  cache at >= 80% of the speed of P=1024 in a 4,096-slot cache.
- attention T (`--attention`, none by default): ours only, the prefill's attention alone (`ours_attention`), the
  proxy for kernel changes: `--prefill '' --train '' --decode '' --attention 16384`.
Each job prints one JSON line: seconds, peak RSS (ru_maxrss of its own process) and the load average before it.

    python -m experiments.bench_long_context --gpu    # one GPU (experiments/gpu_bench.sh): fused-kernel parity
        # against "flash" at 4K (cudnn, bf16; flash against xla in float32), then Llama 3.1 8B-shape bf16 prefill
        # (random weights, chunks of 4096) at 32K and 128K: time, attention TFLOP/s (causal attention FLOPs over
        # the whole prefill time, a lower bound) and the device's peak memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROBE = dict(vocab_size=4096, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=768)
MAX_SEQ = 2**17 + 64
K = 1024


def _cfg():
    from llama.config import ModelConfig

    return ModelConfig(**PROBE, max_seq_len=MAX_SEQ, bos_id=1, eos_ids=(2,), name="long-context-probe")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _tokens(T: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, PROBE["vocab_size"], (1, T)).astype(np.int64)


# ------------------------------------------------------------------------------------------------ workers
def _timed(fn, repeat: int) -> dict:
    """Calls fn() `repeat` times: wall and process CPU seconds (all threads) of each call; "seconds" and
    "cpu_seconds" are the first call's, the figures the table compares. CPU seconds above wall seconds show the
    job using both cores; a wall time that swings while the CPU time holds is the machine, not the code."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    rounded = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    return {"seconds": walls[0], "cpu_seconds": cpus[0], **({"all_seconds": rounded(walls),
            "all_cpu_seconds": rounded(cpus)} if repeat > 1 else {})}, out


def ours_prefill(T: int, chunk: int, repeat: int = 1) -> dict:
    """`generate`'s prefill program (compiled ahead of time, reported apart), timed as `generate` times it: from
    the call to the cache and first token being ready."""
    import jax

    from llama import generate as G
    from llama import model as M
    from llama.sampling import GREEDY

    cfg = _cfg()
    params = M.init_params(cfg, jax.random.key(0))
    # the mesh `python -m llama.generate` picks (`--mesh auto`): one CPU device per core, heads split, from
    # CPU_SPLIT_TOKENS prompt tokens; LLAMA_CPU_DEVICES=1 gives the one-device figure
    mesh = G.cpu_mesh(cfg) if T >= G.CPU_SPLIT_TOKENS else None
    if mesh is not None:
        params = G.shard_params(params, cfg, mesh)
    args, static, *_ = G._prepare(params, [_tokens(T)[0].tolist()], cfg=cfg, max_new_tokens=1, sampling=GREEDY,
                                  seed=0, stop_ids=[], mesh=mesh, truncate=False, cache_dtype=None,
                                  prefill_chunk=chunk)
    t0 = time.perf_counter()
    prefill_fn = G._programs(args, static, mesh)[0]
    compile_s = time.perf_counter() - t0
    timing, (_, state) = _timed(lambda: jax.block_until_ready(prefill_fn(*args)), repeat)
    return {**timing, "compile_s": compile_s, "first_id": int(state.out[0, 0]),
            "devices": 1 if mesh is None else mesh.size}


def peer_prefill(T: int, repeat: int = 1) -> dict:
    import torch

    model = _peer_model()
    ids = torch.from_numpy(_tokens(T))
    with torch.no_grad():
        model(torch.from_numpy(_tokens(128)), use_cache=True, logits_to_keep=1)  # warm-up
        timing, out = _timed(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat)
    return {**timing, "first_id": int(out.logits[0, -1].argmax())}


def ours_attention(T: int, chunk: int) -> dict:
    """The prefill's attention alone: one layer of cached flash attention (the probe's 8 / 2 heads of 32, float32)
    over T queries in chunks of `chunk` against a T + 64-slot cache, best of 3 after a compile; wall and process
    CPU seconds (the CPU figure is steadier on a loaded machine). A proxy for kernel changes: the causal score
    elements, and so the time, grow as T^2."""
    import jax
    import jax.numpy as jnp

    from llama import attention as A

    B, N, KV, H, S = 1, PROBE["n_heads"], PROBE["n_kv_heads"], PROBE["dim"] // PROBE["n_heads"], T + 64
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    kc, vc = (jax.random.normal(k, (B, KV, S, H)) for k in ks[1:])  # the cache's [B, K, S, H] layout

    @jax.jit
    def run(q, kc, vc):
        def read(start, size):
            return tuple(jax.lax.dynamic_slice_in_dim(c, start, size, 2).transpose(0, 2, 1, 3) for c in (kc, vc))

        kv = A.CachedKV(read=read, length=S, kv_heads=KV)
        return jnp.concatenate([A.attention(q[:, c:c + chunk], kv, impl="flash",
                                            q_slots=jnp.arange(c, min(c + chunk, T), dtype=jnp.int32)[None])
                                for c in range(0, T, chunk)], axis=1)

    jax.block_until_ready(run(q, kc, vc))
    wall = cpu = float("inf")
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(run(q, kc, vc))
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return {"seconds": wall, "cpu_seconds": cpu, "checksum": float(jnp.sum(out))}


def ours_train(T: int, docs: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama import model as M

    cfg = _cfg()
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(_tokens(T), jnp.int32)
    seg = jnp.asarray(np.arange(T) * docs // T, jnp.int32)[None]  # N equal documents (T/N each, rounded)
    pos = jnp.arange(T, dtype=jnp.int32)[None] - jnp.searchsorted(seg[0], seg[0])[None]  # restart per document

    def loss(p, t):
        logits = M.forward(p, t[:, :-1], pos[:, :T - 1], seg[:, :T - 1], cfg=cfg)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], -1))

    t0 = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    timing, (value, _) = _timed(lambda: jax.block_until_ready(step(params, tokens)), 1)
    return {**timing, "compile_s": compile_s, "loss": float(value)}


def peer_train(T: int, docs: int = 1) -> dict:
    import torch

    model = _peer_model()
    model.train()

    def step(ids):
        ids = torch.from_numpy(ids)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    step(_tokens(128))  # warm-up
    ids = _tokens(T)[:, :T // docs * docs].reshape(docs, T // docs)
    timing, value = _timed(lambda: step(ids), 1)
    return {**timing, "loss": value}


def ours_decode(P: int, S: int, steps: int = 32) -> dict:
    import jax
    import jax.numpy as jnp

    from llama import generate as G
    from llama import model as M
    from llama.sampling import GREEDY

    cfg = _cfg()
    params = M.init_params(cfg, jax.random.key(0))
    mesh = G.cpu_mesh(cfg) if P >= G.CPU_SPLIT_TOKENS else None  # as `generate --mesh auto` with a P-token prompt
    if mesh is not None:
        params = G.shard_params(params, cfg, mesh)

    def state():
        cache = M.init_cache(cfg, 1, S)
        if mesh is not None:
            cache = jax.device_put(cache, G.cache_sharding(cfg, mesh, 1, S))
        return G.DecodeState(cache=cache, token=jnp.full((1,), 5, jnp.int32),
                             position=jnp.full((1,), P, jnp.int32), out=jnp.full((1, steps + 1), -1, jnp.int32),
                             n_out=jnp.ones((1,), jnp.int32), done=jnp.zeros((1,), bool),
                             limit=jnp.full((1,), steps + 1, jnp.int32), stop=jnp.full((1, 1), -1, jnp.int32),
                             step=jnp.ones((), jnp.int32), key=jax.random.key(0))

    until = jnp.asarray(steps + 1, jnp.int32)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        fn = G._decode_jit.lower(params, state(), until, cfg=cfg, sampling=GREEDY).compile()
    jax.block_until_ready(fn(params, state(), until))  # warm-up
    best = 0.0
    for _ in range(3):
        s = state()
        jax.block_until_ready(s)
        t = time.perf_counter()
        jax.block_until_ready(fn(params, s, until))
        best = max(best, steps / (time.perf_counter() - t))
    return {"tokens_per_s": best, "devices": 1 if mesh is None else mesh.size}


def _peer_model():
    import torch
    import transformers

    from llama.config import to_hf_config

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**to_hf_config(_cfg()))
    hf._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf).float().eval()


# ----------------------------------------------------------------------------------------------------- GPU
def gpu(lengths=(32768, 131072)) -> None:
    import jax
    import jax.numpy as jnp

    from llama import attention as A
    from llama import generate as G
    from llama import model as M
    from llama.config import LLAMA31_8B

    B, T, N, K, H = 1, 4096, 32, 8, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q32 = jax.random.normal(ks[0], (B, T, N, H))
    k32, v32 = (jax.random.normal(k, (B, T, K, H)) for k in ks[1:])
    seg = jnp.asarray([[0] * 1000 + [1] * 3000 + [2] * 96])
    run = lambda impl, q, k, v, s=None: jax.jit(  # noqa: E731
        lambda q, k, v: A.attention(q, (k, v), segment_ids=s, impl=impl))(q, k, v)
    with jax.default_matmul_precision("highest"):
        for s in (None, seg):
            err = float(jnp.abs(run("flash", q32, k32, v32, s) - run("xla", q32, k32, v32, s)).max())
            print(json.dumps({"parity": "flash vs xla, float32", "T": T, "packed": s is not None, "max_abs": err}))
    bf = [x.astype(jnp.bfloat16) for x in (q32, k32, v32)]
    ref = run("flash", *bf).astype(jnp.float32)
    for impl in [i for i in A.available() if i not in ("xla", "flash")]:
        err = float(jnp.abs(run(impl, *bf).astype(jnp.float32) - ref).max())
        print(json.dumps({"parity": f"{impl} vs flash, bf16 (8 mantissa bits: ~1e-2)", "T": T, "max_abs": err}))
    cfg = LLAMA31_8B.replace(max_seq_len=max(lengths) + 64)
    params = jax.jit(lambda: M.init_params(cfg, jax.random.key(0)))()
    for T in lengths:
        res = G.generate(params, [[1] + [3] * (T - 1)], cfg=cfg, max_new_tokens=1, stop_ids=[])
        flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * T / 2  # QK^T and PV, causal half
        stats = jax.devices()[0].memory_stats() or {}
        print(json.dumps({"prefill_8b_bf16_T": T, "seconds": res.prefill_s, "compile_s": res.compile_s,
                          "attention_tflops_per_s": flops / res.prefill_s / 1e12,
                          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}), flush=True)


# ------------------------------------------------------------------------------------------------- driver
def _worker(job: list[str]) -> None:
    kind, side, arg = job[0], job[1], job[2]
    load = os.getloadavg()
    if side == "ours":
        from llama import host

        host.use_huge_pages()  # as llama.generate and llama.train run (llama/host.py; LLAMA_HUGE_PAGES=0: off)
        if kind in ("prefill", "decode"):
            host.split_cpu()  # as llama.generate runs: one CPU device per core (LLAMA_CPU_DEVICES=1: one device)
    if kind == "attention":
        out = ours_attention(int(arg), int(job[3]))
    elif kind == "prefill":
        repeat = int(job[4])
        out = ours_prefill(int(arg), int(job[3]), repeat) if side == "ours" else peer_prefill(int(arg), repeat)
    elif kind == "train":
        docs = int(job[3]) if len(job) > 3 else 1
        out = ours_train(int(arg), docs) if side == "ours" else peer_train(int(arg), docs)
    else:
        P, S = (int(x) for x in arg.split(":"))
        out = ours_decode(P, S)
    print(json.dumps({"job": kind, "side": side, "arg": arg, **out, "peak_rss_mib": _peak_mib(),
                      "loadavg_before": [round(x, 2) for x in load]}), flush=True)


def _run(job: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench_long_context", "--worker", *job]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"job": job[0], "side": job[1], "arg": job[2], "error": f"timeout after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"job": job[0], "side": job[1], "arg": job[2],
                "error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", default="4096,16384,32768,131072", help="prefill lengths")
    ap.add_argument("--train", default="16384,32768", help="train-step lengths ('' for none)")
    ap.add_argument("--docs", type=int, default=1, help="documents packed in each train-step row")
    ap.add_argument("--decode", default="1024:4096,1024:131072,32768:131072,131000:131072",
                    help="decode position:cache slots pairs")
    ap.add_argument("--attention", default="", help="attention-only proxy lengths (ours only; `ours_attention`)")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1,
                    help="prefill calls timed per process, both sides (after compile / warm-up); the table shows "
                         "the first and the median")
    ap.add_argument("--peer", choices=("on", "off"), default="on", help="run transformers alongside")
    ap.add_argument("--quick", action="store_true", help="a shorter timeout per job (a smoke run)")
    ap.add_argument("--json", help="also write every job's result here")
    ap.add_argument("--gpu", action="store_true", help="the GPU set (module docstring)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.gpu:
        return gpu()
    if a.worker:
        return _worker(a.worker)
    sides = ("ours", "peer") if a.peer == "on" else ("ours",)
    jobs = [["prefill", s, str(T), str(a.prefill_chunk), str(a.repeat)] for T in a.prefill.split(",") if T
            for s in sides]
    jobs += [["attention", "ours", str(T), str(a.prefill_chunk)] for T in a.attention.split(",") if T]
    jobs += [["train", s, str(T), str(a.docs)] for T in a.train.split(",") if T for s in sides]
    jobs += [["decode", "ours", d] for d in a.decode.split(",") if d]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()}", flush=True)
    results = []
    for job in jobs:  # per size: ours then the peer, each in a fresh process (A B A B ...)
        r = _run(job, 300 if a.quick else 3600)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n| job | T / position:slots | ours | transformers sdpa | ours peak RSS | peer peak RSS | load before |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["job"], r["arg"], r["side"]): r for r in results}
    for kind, arg in dict.fromkeys((r["job"], r["arg"]) for r in results):
        o, p = by.get((kind, arg, "ours"), {}), by.get((kind, arg, "peer"), {})
        cpu = lambda r: f" (cpu {r['cpu_seconds']:.2f})" if "cpu_seconds" in r else ""  # noqa: E731
        # with --repeat, the median call too: a first call that the host slowed stands out beside it
        med = lambda r: "" if "all_seconds" not in r else (  # noqa: E731
            f"; median of {len(r['all_seconds'])} {statistics.median(r['all_seconds']):.2f} s "
            f"(cpu {statistics.median(r['all_cpu_seconds']):.2f})")
        fmt = lambda r: r.get("error") or (f"{r['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in r  # noqa: E731
                                           else f"{r['seconds']:.2f} s{cpu(r)}{med(r)}")
        rss = lambda r: f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else "-"  # noqa: E731
        print(f"| {kind} | {arg} | {fmt(o) if o else '-'} | {fmt(p) if p else '-'} | {rss(o)} | {rss(p)} | "
              f"{o.get('loadavg_before', ['-'])[0]} / {p.get('loadavg_before', ['-'])[0]} |")
    if a.json:
        from llama.manifest import atomic_write

        atomic_write(a.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
