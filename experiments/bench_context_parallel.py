"""Context parallelism on the CPU: the part-1 probe's train step at T tokens with context = 1, 2, 4 on simulated
devices; per-device compiled memory (XLA's memory analysis) and step time. Each case in its own process,
the cases alternated (1 2 4 1 2 4), the load average printed.

    python -m experiments.bench_context_parallel                       # T = 32768: memory only (compile)
    python -m experiments.bench_context_parallel --seq-len 8192 --time # memory and one timed step

The probe is experiments/bench_long_context.py's (dim 256, 2 layers, 8 query / 2 KV heads, FFN 768, vocab
4096, float32, batch 1, flash attention with blocks of 512). The step is the trainer's (llama.train.make_train_step,
AdamW), on `context` simulated devices of one process (XLA_FLAGS=--xla_force_host_platform_device_count); the
devices share this machine's cores, so the time shows the overhead of the split, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--contexts", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--time", action="store_true", help="also run and time one step")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len, args.time)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(args.repeats):
        for cp in (int(c) for c in args.contexts.split(",")):
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={cp}")
            load = os.getloadavg()[0]
            cmd = [sys.executable, "-m", "experiments.bench_context_parallel", "--worker", str(cp),
                   "--seq-len", str(args.seq_len)] + (["--time"] if args.time else [])
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                return 1
            print(json.dumps({**json.loads(res.stdout.strip().splitlines()[-1]), "load_avg_1m": load}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
