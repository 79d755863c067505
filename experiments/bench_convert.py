"""Peak host memory of checkpoint conversion, against the largest tensor and the model size.

Makes a random Hugging Face checkpoint of >= 1 GB (bfloat16, sharded safetensors + index) in a temporary
directory, then runs `python -m llama.convert hf-to-orbax` and `orbax-to-hf` each in a fresh subprocess
and reads that process's peak RSS (getrusage ru_maxrss). A baseline subprocess converts a tiny model the
same way, to separate the fixed cost of Python + JAX + Orbax from what grows with the model.

The peer is the naive conversion (every tensor read, the whole param pytree built, one Orbax save).

    python -m experiments.bench_convert            # ~1.1 GiB model; prints a JSON summary
    python -m experiments.bench_convert --layers 4 # smaller/larger; --keep to keep the files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from llama.config import TINY, ModelConfig, to_hf_config
from llama.convert import hf_names, table, torch_shape
from llama.tensor_files import write_safetensors_shards

# The naive peer: read every tensor, build the whole param pytree in memory, then one Orbax save.
_NAIVE = ("import resource, sys\nfrom llama.convert import open_source, hf_to_params\n"
          "from llama.checkpoint import save_model\ncfg, state = open_source('hf', sys.argv[1])\n"
          "save_model(sys.argv[2], cfg, hf_to_params(state, cfg))\n"
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
_CHILD = ("import resource, sys\nfrom llama.convert import main\nrc = main(sys.argv[1:])\n"
          "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")


def make_hf_checkpoint(directory: str, cfg: ModelConfig, shard_bytes: int = 2**30, seed: int = 0) -> int:
    """Random HF checkpoint written tensor by tensor; returns its size in bytes."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16)
    plan = [(n, torch_shape(t, cfg), dtype) for t in table(cfg) for n in hf_names(t, cfg)]
    rng = np.random.default_rng(seed)
    tensors = ((n, (0.02 * rng.standard_normal(s, np.float32)).astype(dtype)) for n, s, _ in plan)
    os.makedirs(directory, exist_ok=True)
    write_safetensors_shards(directory, tensors, plan, shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f)
    return sum(int(np.prod(s)) * dtype.itemsize for _, s, _ in plan)


def run_convert(*args: str, code: str = _CHILD) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one conversion in a fresh Python process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"conversion {args} failed:\n{out.stderr[-3000:]}")
    kb = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KB")][0]
    return kb * 1024, time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=args.layers, n_heads=16, n_kv_heads=4, ffn_dim=5632,
                      rope_theta=500000.0, param_dtype="bfloat16", compute_dtype="bfloat16", name="bench")
    work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        t = time.time()
        size = make_hf_checkpoint(os.path.join(work, "hf"), cfg)
        made = time.time() - t
        make_hf_checkpoint(os.path.join(work, "tiny_hf"), TINY.replace(param_dtype="bfloat16"))
        base_rss, _ = run_convert("hf-to-orbax", os.path.join(work, "tiny_hf"), os.path.join(work, "tiny_orbax"))
        h2o_rss, h2o_s = run_convert("hf-to-orbax", os.path.join(work, "hf"), os.path.join(work, "orbax"))
        o2h_rss, o2h_s = run_convert("orbax-to-hf", os.path.join(work, "orbax"), os.path.join(work, "hf2"))
        naive_rss, naive_s = run_convert(os.path.join(work, "hf"), os.path.join(work, "naive"), code=_NAIVE)
        largest_tensor = max(int(np.prod(torch_shape(t, cfg))) for t in table(cfg)) * 2
        largest_param = max(int(np.prod(torch_shape(t, cfg))) * (cfg.n_layers if "{}" in t.hf else 1)
                            for t in table(cfg)) * 2
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        results = {
            "machine": f"{os.cpu_count()}-core {platform.machine()}, {mib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')) / 1024:.0f} GiB",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model_params": cfg.param_count(),
            "model_MiB": mib(size), "largest_tensor_MiB": mib(largest_tensor),
            "largest_stacked_param_MiB": mib(largest_param), "make_checkpoint_s": round(made, 1),
            "baseline_tiny_hf_to_orbax_peak_rss_MiB": mib(base_rss),
            "hf_to_orbax_peak_rss_MiB": mib(h2o_rss), "hf_to_orbax_s": round(h2o_s, 1),
            "orbax_to_hf_peak_rss_MiB": mib(o2h_rss), "orbax_to_hf_s": round(o2h_s, 1),
            "naive_whole_model_hf_to_orbax_peak_rss_MiB": mib(naive_rss), "naive_s": round(naive_s, 1),
        }
        print(json.dumps(results, indent=2))
        from llama import manifest

        print("results + manifest:", manifest.write_benchmark("convert", results, config=vars(args)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
