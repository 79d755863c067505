"""Training-step throughput: this trainer vs Hugging Face transformers + torch AdamW, same shapes, same CPU.

    python -m experiments.bench_train            # CPU: hidden 256, 4 layers, 8/2 heads, FFN 768, vocab 32000,
                                                 # batch 8 x 256, float32; prints tokens/s of both and the ratio
    python -m experiments.bench_train --gpu      # one GPU: MFU of a Llama 3.2 1B-shape bfloat16 train step

Both sides run the full optimizer step (forward, backward, global-norm clip 1.0, AdamW 0.9/0.95, wd 0.1) on the
same random tokens. The two are timed alternately, several rounds each, and the median step time is reported,
because this machine's 2 cores are shared (per-round wall and process-CPU seconds are printed too: CPU
seconds per step are the contention-free cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPE = dict(vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768)
BATCH, SEQ = 8, 256


def jax_step(model_cfg, batch: int, seq: int, micro_batches: int = 1, mesh_devices=None):
    """(run_one_step() -> None, flops per step) for this project's jitted, donated train step."""
    import jax

    from llama import metrics
    from llama.optim import OptimizerConfig
    from llama.train import TrainConfig, make_train_step
    from sharding.rules import MeshConfig, make_mesh

    cfg = TrainConfig(model=model_cfg, optimizer=OptimizerConfig(peak_lr=1e-4, warmup_steps=10, decay_steps=1000),
                      batch_size=batch, seq_len=seq, micro_batches=micro_batches, mesh=MeshConfig(data=1, fsdp=-1))
    mesh = make_mesh(cfg.mesh, mesh_devices)
    init, step = make_train_step(cfg, mesh)
    holder = {"state": init(0)}
    rng = np.random.default_rng(0)
    toks = rng.integers(0, model_cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
         "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), "loss_mask": np.ones((batch, seq), np.float32)}
    from sharding.distributed import global_batch  # not input_pipeline: the GPU image has no grain

    b = global_batch(b, mesh)

    def run():
        holder["state"], m = step(holder["state"], b)
        jax.block_until_ready(m["loss"])
        return float(m["loss"])

    return run, metrics.train_flops_per_token(model_cfg, seq) * batch * seq


def torch_step(batch: int, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["dim"], intermediate_size=SHAPE["ffn_dim"],
                     num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
                     num_key_value_heads=SHAPE["n_kv_heads"], max_position_embeddings=2048, rope_theta=500000.0,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(0)
    toks = torch.from_numpy(rng.integers(0, SHAPE["vocab_size"], (batch, seq + 1)).astype(np.int64))
    inputs, labels = toks[:, :-1], toks[:, 1:]

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    return run


def timed(run, n: int) -> tuple[float, float]:
    """(median wall seconds, median process-CPU seconds) per call over n calls."""
    walls, cpus = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def cpu_bench(rounds: int, steps: int) -> dict:
    import torch

    from llama.config import ModelConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ModelConfig(name="bench", **SHAPE, rope_theta=500000.0, max_seq_len=2048)
    ours, _ = jax_step(cfg, BATCH, SEQ)
    peer = torch_step(BATCH, SEQ)
    for fn in (ours, peer):  # compile / warm up
        fn(), fn()
    res = {"ours": [], "peer": []}
    for r in range(rounds):
        for name, fn in (("ours", ours), ("peer", peer)):
            res[name].append(timed(fn, steps))
            print(f"round {r}: {name:4s} wall {res[name][-1][0]:.3f} s/step, cpu {res[name][-1][1]:.3f} s/step", flush=True)
    tokens = BATCH * SEQ
    out = {}
    for name in res:
        wall = statistics.median(w for w, _ in res[name])
        cpu = statistics.median(c for _, c in res[name])
        out[name] = {"step_s": wall, "tokens_per_s": tokens / wall, "cpu_s_per_step": cpu}
    out["ratio_wall"] = out["ours"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    out["ratio_cpu"] = out["peer"]["cpu_s_per_step"] / out["ours"]["cpu_s_per_step"]
    return out


def gpu_bench(steps: int, batch: int, seq: int, micro_batches: int, remat: str, peak: float | None) -> dict:
    """MFU of a Llama 3.2 1B-shape step: bf16 compute, f32 master weights and AdamW state, one GPU.
    Memory at the defaults (16 x 4096 tokens, 4 micro-batches, save_matmuls): 1.24B params x 16 B = 20 GB of
    state, ~17 GB of float32 logits and their gradient, ~12 GB of saved matmul outputs: fits an 80 GB H100."""
    import jax

    from llama import metrics
    from llama.config import LLAMA32_1B

    dev = jax.devices()[0]
    for impl in ("cudnn", "xla"):  # the fused kernel first; the reference path if cuDNN refuses the shapes
        cfg = LLAMA32_1B.replace(param_dtype="float32", compute_dtype="bfloat16", remat=remat,
                                 attention_impl=impl, max_seq_len=max(seq, 8192))
        try:
            run, flops = jax_step(cfg, batch, seq, micro_batches, [dev])
            t0 = time.perf_counter()
            run()
            compile_s = time.perf_counter() - t0
            break
        except Exception as e:  # noqa: BLE001  (report and fall back, so the script still gives a figure)
            if impl == "xla":
                raise
            print(f"attention_impl=cudnn failed ({type(e).__name__}: {str(e)[:200]}); retrying with xla", flush=True)
    run()
    wall, _ = timed(run, steps)
    peak = metrics.peak_flops(dev, peak)
    return {"device": dev.device_kind, "attention_impl": cfg.attention_impl, "batch": batch, "seq": seq, "micro_batches": micro_batches, "remat": remat,
            "compile_s": compile_s, "step_s": wall, "tokens_per_s": batch * seq / wall, "model_tflops_per_s": flops / wall / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops / wall / peak if peak else None,
            "memory_bytes": metrics.memory_in_use(dev)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="MFU of a Llama 3.2 1B-shape bf16 step on one GPU")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (CPU) or in total (GPU)")
    p.add_argument("--batch", type=int, default=16, help="GPU only: rows per step")
    p.add_argument("--seq", type=int, default=4096, help="GPU only: tokens per row")
    p.add_argument("--micro-batches", type=int, default=4,
                   help="GPU only; 4 keeps the float32 logits of 4 x 4096 x 128256 (8 GB) and their gradient in memory")
    p.add_argument("--remat", default="save_matmuls", choices=("none", "full", "save_matmuls"), help="GPU only")
    p.add_argument("--peak-flops", type=float, default=None, help="GPU only: override the peak table (FLOP/s)")
    a = p.parse_args(argv)
    out = gpu_bench(a.steps, a.batch, a.seq, a.micro_batches, a.remat, a.peak_flops) if a.gpu else cpu_bench(a.rounds, a.steps)
    print(json.dumps(out, indent=2))
    from llama import manifest

    print("results + manifest:", manifest.write_benchmark("train-gpu" if a.gpu else "train-cpu", out, config=vars(a)))


if __name__ == "__main__":
    main()
