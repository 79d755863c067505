"""Context parallelism on the CPU: the part-1 probe's train step at T tokens with context = 1, 2, 4 on simulated
devices; per-device compiled memory (XLA's memory analysis) and step time. Each case in its own process,
the cases alternated (1 2 4 1 2 4), the load average printed.

    python -m experiments.bench_context_parallel                       # T = 32768: memory only (compile)
    python -m experiments.bench_context_parallel --seq-len 8192 --time # memory and one timed step
    python -m experiments.bench_context_parallel --decode [--baseline] # a decode step at 131,072 slots (compile)
    python -m experiments.bench_context_parallel --decode --time --seq-len 4096 --contexts 1,2   # decode tokens/s

The probe is experiments/bench_long_context.py's (dim 256, 2 layers, 8 query / 2 KV heads, FFN 768, vocab
4096, float32, batch 1, flash attention with blocks of 512). The step is the trainer's (llama.train.make_train_step,
AdamW), on `context` simulated devices of one process (XLA_FLAGS=--xla_force_host_platform_device_count); the
devices share this machine's cores, so the time shows the overhead of the split, not a speed-up.

--decode: the same probe serving one row from a KV cache of --seq-len slots (default 131,072) split over `context`
(flash-decoding across devices, llama/context_parallel.py `cached_attention`): XLA's per-device memory of the
compiled decode step (arguments: the cache shard and the parameters; temporaries) and the largest collective in
its HLO, in bytes. --baseline compiles the model's unsplit cache path on the same sharded cache instead, leaving
the reads to XLA's partitioner (the path before `cached_attention`). With --time: llama.generate.generate of a
prompt filling the cache but 64 slots, 64 new tokens, greedy; decode tokens/s as generate reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time

# Collectives in compiled HLO text, sync or async ("-start"), and the shapes of their results.
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo: str) -> list[int]:
    """Bytes of each collective's result in compiled HLO text (per device; an async start's tuple counts its
    largest member, the gathered or reduced buffer)."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            sizes = [_BYTES[t] * math.prod(int(n) for n in d.split(",") if n) for t, d in _SHAPE.findall(m.group(1))]
            out.append(max(sizes, default=0))
    return out


def worker(cp: int, seq_len: int, timed: bool) -> dict:
    import jax
    import numpy as np

    from experiments.bench_long_context import _cfg
    from input_pipeline import to_global_batch
    from llama import optim, train
    from sharding.mesh import MeshConfig, make_mesh

    model = _cfg().replace(max_seq_len=seq_len, remat="full")
    cfg = train.TrainConfig(model=model, mesh=MeshConfig(fsdp=1, context=cp), batch_size=1, seq_len=seq_len,
                            optimizer=optim.OptimizerConfig(warmup_steps=1, decay_steps=10), sample_tokens=0)
    mesh = make_mesh(cfg.mesh, jax.devices()[:cp])
    rng = np.random.default_rng(0)
    toks = rng.integers(3, model.vocab_size, (1, seq_len + 1)).astype(np.int32)
    rows = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((1, seq_len), np.int32),
            "positions": np.arange(seq_len, dtype=np.int32)[None], "loss_mask": np.ones((1, seq_len), np.float32)}
    with jax.set_mesh(mesh):
        init_state, step = train.make_train_step(cfg, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(train.abstract_state(cfg, mesh),
                              {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows.items()}).compile()
        out = {"context": cp, "seq_len": seq_len, "compile_s": time.perf_counter() - t0,
               "temp_mib_per_device": compiled.memory_analysis().temp_size_in_bytes / 2**20,
               "argument_mib_per_device": compiled.memory_analysis().argument_size_in_bytes / 2**20}
        if timed:
            state, batch = init_state(0), to_global_batch(rows, mesh)
            state, m = step(state, batch)  # the jit's own compile and a first step
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            out["step_s"] = time.perf_counter() - t0
    return out


def decode_worker(cp: int, slots: int, timed: bool, baseline: bool) -> dict:
    import jax
    import numpy as np

    from experiments.bench_long_context import _cfg
    from llama import context_parallel, generate, model
    from sharding import rules
    from sharding.mesh import MeshConfig, make_mesh

    if baseline:  # the model's unsplit cache path on the sharded cache: XLA partitions the reads and writes
        context_parallel.splits_cache = lambda cache: False
    cfg = _cfg().replace(max_seq_len=slots)
    mesh = make_mesh(MeshConfig(fsdp=1, context=cp), jax.devices()[:cp])
    out = {"context": cp, "slots": slots,
           "path": "one device" if cp == 1 else "baseline (XLA partitioner)" if baseline else "cached_attention"}
    with jax.set_mesh(mesh):
        def shaped(tree, shardings):  # abstract arrays already placed: compile only, nothing allocated
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        params = shaped(model.abstract_params(cfg), generate.param_shardings(cfg, mesh))
        cache = jax.eval_shape(lambda: model.init_cache(cfg, 1, slots))
        cache = shaped(cache, rules.cache_shardings(mesh, cache))
        tok = jax.ShapeDtypeStruct((1, 1), np.int32)
        t0 = time.perf_counter()
        compiled = jax.jit(lambda p, t, pos, c: model.forward_cached(p, t, pos, c, cfg=cfg),
                           donate_argnums=3).lower(params, tok, tok, cache).compile()
        mem = compiled.memory_analysis()
        sizes = collective_bytes(compiled.as_text())
        out.update(compile_s=time.perf_counter() - t0, argument_mib_per_device=mem.argument_size_in_bytes / 2**20,
                   temp_mib_per_device=mem.temp_size_in_bytes / 2**20,
                   cache_mib_per_device=sum(np.prod(c.sharding.shard_shape(c.shape)) * c.dtype.itemsize
                                            for c in jax.tree.leaves(cache)) / 2**20,
                   collectives=len(sizes), largest_collective_bytes=max(sizes, default=0))
    if timed:
        real = model.init_params(cfg, jax.random.key(0))
        prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, slots - 64).tolist()
        kw = dict(cfg=cfg, max_new_tokens=64, stop_ids=[])
        if cp > 1:
            kw["mesh"] = mesh
            real = generate.shard_params(real, cfg, mesh)
        ctx = jax.set_mesh(mesh) if cp > 1 else contextlib.nullcontext()
        with ctx:
            generate.generate(real, [prompt], **kw)  # compile
            res = generate.generate(real, [prompt], **kw)
        out.update(decode_tokens_per_s=res.decode_tokens_per_s, prefill_tokens_per_s=res.prefill_tokens_per_s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, help="tokens per row (default 32768); --decode: cache slots (131072)")
    ap.add_argument("--contexts", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--time", action="store_true", help="also run and time one step (--decode: decode tokens/s)")
    ap.add_argument("--decode", action="store_true", help="a decode step from a cache of --seq-len slots "
                    "(default 131072) instead of the train step")
    ap.add_argument("--baseline", action="store_true", help="--decode: the unsplit cache path (XLA partitions it)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seq_len = args.seq_len or (131072 if args.decode else 32768)
    if args.worker:
        res = decode_worker(args.worker, args.seq_len, args.time, args.baseline) if args.decode else \
            worker(args.worker, args.seq_len, args.time)
        print(json.dumps(res))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(args.repeats):
        for cp in (int(c) for c in args.contexts.split(",")):
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={cp}")
            load = os.getloadavg()[0]
            cmd = [sys.executable, "-m", "experiments.bench_context_parallel", "--worker", str(cp),
                   "--seq-len", str(args.seq_len)] + [f"--{f}" for f in ("time", "decode", "baseline")
                                                        if getattr(args, f)]
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            print(json.dumps({**json.loads(res.stdout.strip().splitlines()[-1]), "load_avg_1m": load}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
