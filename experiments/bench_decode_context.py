"""Batch-1 decode tokens/s as the context grows: the KV cache's share of each decode step.

    python -m experiments.bench_decode_context [--prompts 16,1008,3952] [--runs 3]

Same shapes as experiments/bench_decode.py (hidden 256, 4 layers, 8/2 heads, FFN 768, vocab 32000, float32,
random weights). For each prompt length: one `generate` of 128 new tokens to compile, then `--runs` more; the
best decode tokens/s is printed with the cache slots (prompt + 128) and the first generated ids. To compare two
code trees, run it in each (e.g. a `git worktree` of the older commit) in alternation; docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

from experiments.bench_decode import NEW, SHAPE


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="16,1008,3952", help="prompt lengths, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per length (the best is printed)")
    a = ap.parse_args(argv)

    import jax

    from llama import generate as G
    from llama import model as M
    from llama.config import ModelConfig

    cfg = ModelConfig(**SHAPE, max_seq_len=8192, bos_id=1, eos_ids=(2,), name="bench-decode")
    params = M.init_params(cfg, jax.random.key(0))
    out = {}
    for n in (int(x) for x in a.prompts.split(",")):
        prompt = [[1] + [3 + i % 1000 for i in range(n - 1)]]
        G.generate(params, prompt, cfg=cfg, max_new_tokens=NEW, stop_ids=[])  # compile
        runs = [G.generate(params, prompt, cfg=cfg, max_new_tokens=NEW, stop_ids=[]) for _ in range(a.runs)]
        out[n + NEW] = {"decode_tokens_per_s_best": max(r.decode_tokens_per_s for r in runs),
                        "first_ids": runs[0].tokens[0][:8]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
