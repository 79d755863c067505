"""Decoding throughput: this project's on-device decode loop vs Hugging Face transformers `generate` (KV cache).

    python -m experiments.bench_decode          # CPU: hidden 256, 4 layers, 8/2 heads, FFN 768, vocab 32000,
                                                # float32; decode tokens/s at batch 1 and 8 (and at batch 1
                                                # after a 3968-token prompt), prefill tokens/s,
                                                # both sides on the same weights, next to the memory-bandwidth bound;
                                                # and ours at batch 1 with int8 weights and with an int8 KV cache
    python -m experiments.bench_decode --gpu    # one GPU: Llama 3.1 8B shapes (random weights, initialised on the
                                                # device), batch-1 decode tokens/s in bfloat16 and int8 next to
                                                # the bound (weight bytes per token / measured read bandwidth)

The bound: decoding one token must read every weight once (all but the token embedding, of which one row), so
tokens/s <= read bandwidth / bytes read per token. Bandwidth is measured here with a large-array reduction
(numpy on one thread and on every core, and jitted jax; the largest is used), measured
beside each batch-1 round because the load on this shared machine varies. Both sides are timed alternately, several rounds, median reported,
because this machine's cores are shared; greedy, no stop token, so every run decodes exactly the same count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

SHAPE = dict(vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768)
PROMPT, NEW, PREFILL = 16, 128, 512
LONG = 3968  # a long prompt: decode then attends over 4096 cache slots


def read_bandwidth(n_bytes: int = 1 << 30, rounds: int = 5, stat=min, host: bool = True) -> dict:
    """Bytes/s of a full read of an n_bytes array: numpy sum on one thread and on every core, a jitted jnp.sum,
    and a jitted vector x matrix. stat=min: the best of `rounds` reads; stat=sum: sustained over all of them."""
    import jax
    import jax.numpy as jnp

    from concurrent.futures import ThreadPoolExecutor

    n = rounds if stat is min else 1  # sustained: report total bytes / total time

    out = {}
    total = n_bytes * (rounds // n)
    if host:  # host memory: what a CPU decode reads from
        a = np.ones(n_bytes // 4, np.float32)
        out["numpy_GBps"] = total / stat(_timed(lambda: a.sum()) for _ in range(rounds)) / 1e9
        n_threads = os.cpu_count() or 1
        parts = np.array_split(a, n_threads)
        with ThreadPoolExecutor(n_threads) as pool:  # numpy releases the GIL: one reader per core
            t_mt = stat(_timed(lambda: list(pool.map(np.sum, parts))) for _ in range(rounds))
        out[f"numpy_{n_threads}threads_GBps"] = total / t_mt / 1e9
        del a, parts
    x = jnp.ones(n_bytes // 4, jnp.float32)
    f = jax.jit(lambda v: jnp.sum(v))
    f(x).block_until_ready()
    t_jax = stat(_timed(lambda: f(x).block_until_ready()) for _ in range(rounds))
    # The decode step's own access pattern: a vector times a large matrix (multi-threaded XLA dot).
    w = x.reshape(-1, 4096)
    v = jnp.ones((1, w.shape[0]), jnp.float32)
    g = jax.jit(lambda v, w: v @ w)
    g(v, w).block_until_ready()
    t_mv = stat(_timed(lambda: g(v, w).block_until_ready()) for _ in range(rounds))
    x = w = None  # free the 2 x n_bytes before returning (the timing lambdas above hold them)
    return {**out, "jax_sum_GBps": total / t_jax / 1e9, "jax_matvec_GBps": total / t_mv / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bytes_per_token(params) -> int:
    """Weight bytes one decode step reads: everything but the embedding table, plus one embedding row; a tied
    table (no lm_head) is the output projection too, so it is read whole."""
    from llama import quant

    emb = params["embed"]
    if "lm_head" not in params:
        return quant.param_bytes(params)
    return quant.param_bytes(params) - quant.param_bytes(emb) + emb.shape[1] * emb.dtype.itemsize


def ours(params, cfg, batch: int, prompt_len: int, new: int, cache_dtype=None):
    from llama import generate as G

    prompts = [list(range(1, prompt_len + 1)) for _ in range(batch)]
    return G.generate(params, prompts, cfg=cfg, max_new_tokens=new, stop_ids=[], cache_dtype=cache_dtype)


def hf_model(params, cfg):
    import torch
    import transformers

    from llama.config import to_hf_config
    from llama.convert import params_to_hf

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg))).float().eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(params, cfg).items()})
    return hf


def hf_run(hf, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of transformers greedy generate: a separate timed prompt forward gives
    the prefill share, the rest of generate is decode (its default sdpa attention and dynamic KV cache)."""
    import torch

    ids = torch.arange(1, prompt_len + 1).repeat(batch, 1)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new
    return prefill, total - prefill


def cpu(rounds: int) -> dict:
    import jax

    from llama import model as M
    from llama import quant
    from llama.config import ModelConfig

    cfg = ModelConfig(**SHAPE, max_seq_len=8192, bos_id=1, eos_ids=(2,), name="bench-decode")
    params = M.init_params(cfg, jax.random.key(0))
    hf = hf_model(params, cfg)
    bpt = bytes_per_token(params)
    # This project's int8 variants at batch 1 (no peer: transformers has no CPU int8 path to compare).
    variants = {"int8_weights": (quant.quantize_params(params), None), "int8_kv_cache": (params, "int8")}
    var_tps: dict = {k: [] for k in variants}
    res: dict = {"machine": "CPU", "devices": str(jax.devices()), "shape": SHAPE, "dtype": "float32",
                 "prompt": PROMPT, "new_tokens": NEW, "prefill_len": PREFILL, "bytes_per_token": bpt}
    bws, fractions = [], []
    for b in (1, 8):
        ours(params, cfg, b, PROMPT, NEW)  # compile
        if b == 1:
            for p, c in variants.values():
                ours(p, cfg, b, PROMPT, NEW, c)
        mine, peer = [], []
        for _ in range(rounds):
            if b == 1:  # the machine's load varies: measure the bound next to each run, best and sustained
                bw = read_bandwidth(1 << 28, 3)
                bws.append(bw)
                sustained = read_bandwidth(1 << 28, 20, stat=sum)  # ~0.3 s per method, like a decode run
            r = ours(params, cfg, b, PROMPT, NEW)
            mine.append(r.decode_tokens / r.decode_s)
            if b == 1:
                fractions.append(mine[-1] / (max(sustained.values()) * 1e9 / bpt))
                for k, (p, c) in variants.items():
                    r = ours(p, cfg, b, PROMPT, NEW, c)
                    var_tps[k].append(r.decode_tokens / r.decode_s)
            _, dec = hf_run(hf, b, PROMPT, NEW)
            peer.append(b * (NEW - 1) / dec)
        if b == 1:
            mine_b1 = list(mine)
        res[f"decode_b{b}"] = {"ours": statistics.median(mine), "hf": statistics.median(peer),
                               "ratio": statistics.median(mine) / statistics.median(peer)}
        print(json.dumps({f"decode_b{b}": res[f"decode_b{b}"]}), flush=True)
    ours(params, cfg, 1, PREFILL, 1)
    mine, peer = [], []
    for _ in range(rounds):
        r = ours(params, cfg, 1, PREFILL, 1)
        mine.append(r.prefill_tokens_per_s)
        pre, _ = hf_run(hf, 1, PREFILL, 1)
        peer.append(PREFILL / pre)
    res["prefill_b1"] = {"ours": statistics.median(mine), "hf": statistics.median(peer),
                         "ratio": statistics.median(mine) / statistics.median(peer)}
    ours(params, cfg, 1, LONG, NEW)  # batch-1 decode after a long prompt: the KV cache's share of each step
    mine, peer = [], []
    for _ in range(rounds):
        r = ours(params, cfg, 1, LONG, NEW)
        mine.append(r.decode_tokens / r.decode_s)
        _, dec = hf_run(hf, 1, LONG, NEW)
        peer.append((NEW - 1) / dec)
    res[f"decode_b1_after_{LONG}"] = {"ours": statistics.median(mine), "hf": statistics.median(peer),
                                      "ratio": statistics.median(mine) / statistics.median(peer)}
    print(json.dumps({f"decode_b1_after_{LONG}": res[f"decode_b1_after_{LONG}"]}), flush=True)
    res["read_GBps_best"] = {k: max(bw[k] for bw in bws) for k in bws[0]}
    best_read = max(res["read_GBps_best"].values()) * 1e9  # bytes/s
    res["bound_tokens_per_s_b1"] = best_read / bpt
    res["decode_b1_best"] = max(mine_b1)
    # Like with like on a loaded machine: best decode vs best read, and the median of per-round ratios.
    res["fraction_of_bound_b1"] = res["decode_b1_best"] / res["bound_tokens_per_s_b1"]
    res["fraction_of_sustained_bound_b1_median_per_round"] = statistics.median(fractions)
    bpt8 = bytes_per_token(variants["int8_weights"][0])
    res["int8_b1"] = {"weights_int8_tokens_per_s": statistics.median(var_tps["int8_weights"]),
                      "weights_int8_bytes_per_token": bpt8,
                      "weights_int8_fraction_of_bound_best": max(var_tps["int8_weights"]) / (best_read / bpt8),
                      "kv_cache_int8_tokens_per_s": statistics.median(var_tps["int8_kv_cache"]),
                      "float32_tokens_per_s": res["decode_b1"]["ours"]}
    return res


def gpu(new: int = 128, prompt: int = 128) -> dict:
    """8B shapes on one GPU. Parameters are created on the device by a jitted init (no host copy); int8 is
    quantized on the device from them, donating the bf16 copy. Compilation is timed apart (generate does)."""
    import jax

    from llama import generate as G
    from llama import model as M
    from llama import quant
    from llama.config import LLAMA31_8B

    cfg = LLAMA31_8B
    dev = jax.devices()[0]
    bw = read_bandwidth(4 << 30, 5, host=dev.platform == "cpu")  # device memory
    res: dict = {"device": dev.device_kind, "shape": "llama3.1-8b", "prompt": prompt, "new_tokens": new, **bw}
    params = jax.jit(M.init_params, static_argnums=0)(cfg, jax.random.key(0))
    for name in ("bfloat16", "int8"):
        if name == "int8":
            params = jax.jit(quant.quantize_params, donate_argnums=0)(params)
        bpt = bytes_per_token(params)
        runs = [G.generate(params, [list(range(1, prompt + 1))], cfg=cfg, max_new_tokens=new, stop_ids=[])
                for _ in range(3)]  # the first one compiles (timed apart) and warms up
        tps = max(r.decode_tokens_per_s for r in runs[1:])
        bound = max(bw.values()) * 1e9 / bpt
        res[name] = {"decode_tokens_per_s": tps, "bytes_per_token": bpt, "bound_tokens_per_s": bound,
                     "fraction_of_bound": tps / bound, "compile_s": runs[0].compile_s,
                     "prefill_tokens_per_s": max(r.prefill_tokens_per_s for r in runs[1:])}
        print(json.dumps({name: res[name]}), flush=True)
    res["int8_speedup"] = res["int8"]["decode_tokens_per_s"] / res["bfloat16"]["decode_tokens_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="8B shapes on one GPU, bf16 and int8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args()
    res = gpu() if a.gpu else cpu(a.rounds)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res, indent=2))
    from llama import manifest

    print("results + manifest:", manifest.write_benchmark("decode-gpu" if a.gpu else "decode-cpu", res))
    if a.json:
        manifest.atomic_write(a.json, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
