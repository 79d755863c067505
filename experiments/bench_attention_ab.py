"""Flash attention's forward + backward, this tree's llama/attention.py against another checkout's, in one process,
alternated call by call, so both sides see the same machine load (this machine's speed moves 2x within minutes).

    python -m experiments.bench_attention_ab --base ../old/llama/attention.py --T 8192 --docs 8 --repeat 5
    git worktree add ../base HEAD~1 && python -m experiments.bench_attention_ab --base ../base/llama/attention.py

The probe's attention (issue 13): batch 1, 8 query / 2 KV heads of 32, float32; the row packs `--docs` documents
of T/docs slots (segment ids 1..docs; 1: one document); the loss is sum(attention(q, k, v) * ct), its gradient
with respect to q, k and v is timed (the forward runs inside it). Prints the median wall and process-CPU seconds
of each side over `--repeat` alternated calls after one compile call each, the load average, and whether the two
sides' gradients agree (max abs difference).
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="path of the other llama/attention.py")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    if not os.path.isfile(a.base):
        sys.exit(f"--base {a.base}: no such file (expected a checkout's llama/attention.py)")
    import jax
    import jax.numpy as jnp

    from llama import attention as this

    spec = importlib.util.spec_from_file_location("attention_base", a.base)
    base = importlib.util.module_from_spec(spec)
    sys.modules["attention_base"] = base  # dataclasses resolve their module by name
    spec.loader.exec_module(base)
    B, N, K, H, T = 1, 8, 2, 32, a.T
    ks = jax.random.split(jax.random.key(0), 4)
    q, ct = jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[3], (B, T, N, H))
    k, v = jax.random.normal(ks[1], (B, T, K, H)), jax.random.normal(ks[2], (B, T, K, H))
    seg = jnp.asarray((np.arange(T) * a.docs // T + 1)[None], jnp.int32)
    sides = {}
    for name, mod in (("base", base), ("this", this)):
        loss = lambda q, k, v, mod=mod: jnp.sum(mod.attention(q, (k, v), segment_ids=seg, impl="flash") * ct)  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        sides[name] = (grad, jax.block_until_ready(grad(q, k, v)), [])
    load = os.getloadavg()
    for _ in range(a.repeat):
        for grad, _, times in sides.values():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(grad(q, k, v))
            times.append((time.perf_counter() - t, time.process_time() - c))
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(sides["base"][1], sides["this"][1]))
    print(f"T={T} docs={a.docs}, {a.repeat} alternated calls, load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, (_, _, times) in sides.items():
        w, c = np.median(np.array(times), axis=0)
        print(f"  {name}: fwd+bwd {w:.3f} s wall, {c:.3f} s CPU (median)")
    print(f"  max |grad difference| {diff:.2e}")


if __name__ == "__main__":
    main()
