"""Training-step throughput: this trainer vs Hugging Face transformers + torch AdamW, same shapes, same CPU.

    python -m experiments.bench_train            # CPU: hidden 256, 4 layers, 8/2 heads, FFN 768, vocab 32000,
                                                 # batch 8 x 256, float32; tokens/s of both and the ratio
    python -m experiments.bench_train --side ours --side ours:loss_chunk=0    # A/B of two variants of ours
    python -m experiments.bench_train --memory   # XLA's compiled temp memory of the 1B-shape step (no allocation)
    python -m experiments.bench_train --gpu      # one GPU: MFU of a Llama 3.2 1B-shape bfloat16 train step

Both sides run the full optimizer step (forward, backward, global-norm clip 1.0, AdamW 0.9/0.95, wd 0.1) on the
same random tokens. Methodology (docs/benchmarks.md): each side runs in its own process, a fresh one per round,
the sides alternated A B A B in one command; the 1-minute load average is printed before each round; per round
the median wall and process-CPU seconds per step of `--steps` timed steps after two warm-up steps. The result
gives the peer's tokens/s next to its range in earlier runs of this script (runs/benchmarks/train-cpu-*), so a
peer slowed down by other load is visible, and says whether the ratio held in every round at a quiet load.

A side is `ours` or `peer`, optionally with `:key=value;...` settings of ours: loss_chunk, compute_dtype
(bfloat16 is an experiment option: the trainer's default stays float32), xla_flags (added to XLA_FLAGS), huge_pages
(`1`, the default, as `python -m llama.train` runs: glibc's malloc on huge pages, llama/host.py; `0`: glibc's own
settings).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768)
BATCH, SEQ = 8, 256
QUIET_LOAD = 2.5  # 1-minute load average on this 2-core machine below which a round counts as quiet


def jax_step(model_cfg, batch: int, seq: int, micro_batches: int = 1, mesh_devices=None, loss_chunk=None):
    """(run_one_step() -> loss, flops per step) for this project's jitted, donated train step."""
    import jax

    from llama import metrics
    from llama.optim import OptimizerConfig
    from llama.train import TrainConfig, make_train_step
    from sharding.rules import MeshConfig, make_mesh

    extra = {} if loss_chunk is None else {"loss_chunk": loss_chunk}
    cfg = TrainConfig(model=model_cfg, optimizer=OptimizerConfig(peak_lr=1e-4, warmup_steps=10, decay_steps=1000),
                      batch_size=batch, seq_len=seq, micro_batches=micro_batches, mesh=MeshConfig(data=1, fsdp=-1),
                      **extra)
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


# ------------------------------------------------------------------------------------- CPU: one side
def parse_side(side: str) -> tuple[str, dict]:
    name, _, rest = side.partition(":")
    if name not in ("ours", "peer"):
        raise SystemExit(f"--side {side!r}: expected ours[:key=value;...] or peer")
    settings = dict(kv.split("=", 1) for kv in rest.split(";") if kv) if rest else {}
    unknown = set(settings) - {"loss_chunk", "compute_dtype", "xla_flags", "huge_pages"}
    if unknown or (name == "peer" and settings) or settings.get("huge_pages", "1") not in ("1", "0"):
        raise SystemExit(f"--side {side!r}: unknown settings {sorted(unknown or settings)}; ours takes "
                         "loss_chunk, compute_dtype, xla_flags, huge_pages=1|0")
    return name, settings


def run_side(side: str, steps: int) -> dict:
    """One side in this process: build, two warm-up steps (compile), `steps` timed steps."""
    name, settings = parse_side(side)
    if name == "peer":
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        fn = torch_step(BATCH, SEQ)
    else:
        from llama import host
        from llama.config import ModelConfig

        if settings.get("huge_pages", "1") == "1":
            host.use_huge_pages()  # as the trainer's command does (llama/host.py: re-executes this side's process)
        cfg = ModelConfig(name="bench", **SHAPE, rope_theta=500000.0, max_seq_len=2048,
                          compute_dtype=settings.get("compute_dtype", "float32"))
        chunk = settings.get("loss_chunk")
        fn, _ = jax_step(cfg, BATCH, SEQ, loss_chunk=None if chunk is None else int(chunk))
    fn(), fn()
    wall, cpu = timed(fn, steps)
    return {"step_s": wall, "cpu_s_per_step": cpu, "tokens_per_s": BATCH * SEQ / wall}


def side_process(side: str, steps: int) -> dict:
    """run_side in a fresh Python process (its own threads, caches and allocator), its JSON result."""
    _, settings = parse_side(side)
    env = dict(os.environ)
    if settings.get("xla_flags"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + settings["xla_flags"]).strip()
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--run-side", side, "--steps", str(steps)],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"side {side} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def recent_range(side: str, root: str = os.path.join("runs", "benchmarks")) -> list[float]:
    """tokens/s of `side` in earlier runs of this script (newest 10), to show how far this run's figure is from
    its usual one."""
    seen = []
    for path in sorted(glob.glob(os.path.join(root, "train-cpu-*", "results.json")))[-10:]:
        with open(path) as f:
            sides = json.load(f).get("sides", {})
        if side in sides:
            seen.append(sides[side]["tokens_per_s"])
    return seen


def cpu_bench(sides: list[str], rounds: int, steps: int) -> dict:
    """The sides alternated round by round, each in its own process, the load average printed per round."""
    per_side: dict[str, list[dict]] = {s: [] for s in sides}
    loads = []
    for r in range(rounds):
        for side in sides:
            load = os.getloadavg()[0]
            res = side_process(side, steps)
            res["load_before"] = load
            per_side[side].append(res)
            loads.append(load)
            print(f"round {r}: load {load:5.2f}  {side:30s} {res['tokens_per_s']:8,.0f} tokens/s  wall "
                  f"{res['step_s']:.3f} s/step  cpu {res['cpu_s_per_step']:.3f} s/step", flush=True)
    out = {"sides": {}, "load_averages": loads, "quiet": max(loads) < QUIET_LOAD, "quiet_load_below": QUIET_LOAD}
    for side, runs in per_side.items():
        tps = [x["tokens_per_s"] for x in runs]
        out["sides"][side] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": tps,
                              "step_s": statistics.median(x["step_s"] for x in runs),
                              "cpu_s_per_step": statistics.median(x["cpu_s_per_step"] for x in runs),
                              "earlier_runs_tokens_per_s": recent_range(side)}
    a, b = sides[0], sides[-1]
    if a != b:
        per_round = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(per_side[a], per_side[b])]
        out["ratio"] = {"of": f"{a} / {b}", "tokens_per_s": out["sides"][a]["tokens_per_s"] / out["sides"][b]["tokens_per_s"],
                        "cpu_s_per_step": out["sides"][b]["cpu_s_per_step"] / out["sides"][a]["cpu_s_per_step"],
                        "per_round": per_round, "min_per_round": min(per_round)}
    return out


def report(out: dict) -> None:
    print(f"\nload average per round: {', '.join(f'{x:.2f}' for x in out['load_averages'])} "
          f"({'quiet' if out['quiet'] else 'UNDER LOAD: not a figure to claim'}; quiet = below {out['quiet_load_below']})")
    for side, s in out["sides"].items():
        earlier = s["earlier_runs_tokens_per_s"]
        rng = f"{min(earlier):,.0f}-{max(earlier):,.0f} in {len(earlier)} earlier runs" if earlier else "no earlier runs"
        print(f"{side:30s} {s['tokens_per_s']:8,.0f} tokens/s (rounds {', '.join(f'{x:,.0f}' for x in s['tokens_per_s_rounds'])}; "
              f"{rng}), {s['cpu_s_per_step']:.3f} CPU s/step")
    if "ratio" in out:
        r = out["ratio"]
        print(f"ratio {r['of']}: {r['tokens_per_s']:.2f}x tokens/s (per round {', '.join(f'{x:.2f}' for x in r['per_round'])}), "
              f"{r['cpu_s_per_step']:.2f}x CPU s/step")


# ------------------------------------------------------------------------------------- memory (compile only)
def memory_bench(batch: int, seq: int, chunks: list[int], remat: str) -> dict:
    """XLA's memory analysis of the compiled train step at the Llama 3.2 1B shape (bf16 compute, float32 params
    and AdamW state) on one CPU device, from abstract inputs: nothing is allocated, so any machine can do it."""
    import jax
    import jax.numpy as jnp

    from llama import loss, train
    from llama import model as llama_model
    from llama.config import LLAMA32_1B
    from sharding.rules import MeshConfig, batch_sharding, make_mesh

    model_cfg = LLAMA32_1B.replace(param_dtype="float32", compute_dtype="bfloat16", remat=remat,
                                   max_seq_len=max(seq, 8192))
    out = {"batch": batch, "seq": seq, "remat": remat, "logits_bytes": batch * seq * model_cfg.vocab_size * 4}
    for chunk in chunks:
        cfg = train.TrainConfig(model=model_cfg, batch_size=batch, seq_len=seq, loss_chunk=chunk, sample_tokens=0,
                                mesh=MeshConfig(data=1, fsdp=-1))
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        _, step = train.make_train_step(cfg, mesh)
        sh = batch_sharding(mesh, 2)
        shapes = {k: jax.ShapeDtypeStruct((batch, seq), np.float32 if k == "loss_mask" else np.int32, sharding=sh)
                  for k in train.BATCH_KEYS}
        t0 = time.perf_counter()
        ma = step.lower(train.abstract_state(cfg, mesh), shapes).compile().memory_analysis()
        # The output layer + loss alone (gradient with respect to the head and the hidden states): what the
        # chunking changes, whatever else (attention scores at long T) sets the whole step's peak.
        head = loss.head_params(llama_model.abstract_params(model_cfg), model_cfg)
        h = jax.ShapeDtypeStruct((batch, seq, model_cfg.dim), jnp.bfloat16)
        tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        grad = jax.jit(jax.grad(lambda hd, h, t, m: loss.next_token_loss(hd, h, t, m, cfg=model_cfg, chunk=chunk)[0],
                                argnums=(0, 1)))
        head_ma = grad.lower(head, h, tok, tok).compile().memory_analysis()
        out[f"loss_chunk={chunk}"] = {"temp_bytes": ma.temp_size_in_bytes, "argument_bytes": ma.argument_size_in_bytes,
                                      "head_and_loss_temp_bytes": head_ma.temp_size_in_bytes,
                                      "compile_s": time.perf_counter() - t0}
        print(f"loss_chunk={chunk}: train step temp {ma.temp_size_in_bytes / 1e9:.2f} GB, arguments "
              f"{ma.argument_size_in_bytes / 1e9:.2f} GB; output layer + loss alone: temp "
              f"{head_ma.temp_size_in_bytes / 1e9:.2f} GB (compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ------------------------------------------------------------------------------------- GPU
def gpu_bench(steps: int, batch: int, seq: int, micro_batches: int, remat: str, peak: float | None,
              loss_chunk: int | None) -> dict:
    """MFU of a Llama 3.2 1B-shape step: bf16 compute, f32 master weights and AdamW state, one GPU.
    Memory at the defaults (16 x 4096 tokens, no micro-batching, save_matmuls, the fused head): 1.24B params x
    16 B = 20 GB of state and 5 GB of float32 gradients, 49 GB of saved bf16 matmul outputs (23,552 per token
    per layer), a few GB for one chunk of logits: fits the 141 GB H200; an 80 GB H100 needs --remat full."""
    import jax

    from llama import metrics
    from llama.config import LLAMA32_1B

    dev = jax.devices()[0]
    for impl in ("cudnn", "flash"):  # the fused kernel first; the blockwise path if cuDNN refuses the shapes
        cfg = LLAMA32_1B.replace(param_dtype="float32", compute_dtype="bfloat16", remat=remat,
                                 attention_impl=impl, max_seq_len=max(seq, 8192))
        try:
            run, flops = jax_step(cfg, batch, seq, micro_batches, [dev], loss_chunk)
            t0 = time.perf_counter()
            run()
            compile_s = time.perf_counter() - t0
            break
        except Exception as e:  # noqa: BLE001  (report and fall back, so the script still gives a figure)
            if impl == "flash":
                raise
            print(f"attention_impl=cudnn failed ({type(e).__name__}: {str(e)[:200]}); retrying with flash", flush=True)
    run()
    wall, _ = timed(run, steps)
    peak = metrics.peak_flops(dev, peak)
    stats = dev.memory_stats() or {}
    return {"device": dev.device_kind, "attention_impl": cfg.attention_impl, "batch": batch, "seq": seq,
            "micro_batches": micro_batches, "remat": remat, "loss_chunk": loss_chunk,
            "compile_s": compile_s, "step_s": wall, "tokens_per_s": batch * seq / wall, "model_tflops_per_s": flops / wall / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops / wall / peak if peak else None,
            "memory_bytes": metrics.memory_in_use(dev), "peak_memory_bytes": stats.get("peak_bytes_in_use")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="MFU of a Llama 3.2 1B-shape bf16 step on one GPU")
    p.add_argument("--memory", action="store_true", help="compiled temp memory of the 1B-shape step, per loss_chunk")
    p.add_argument("--side", action="append", help="CPU: a side to time (repeatable; default: ours, then peer)")
    p.add_argument("--run-side", help=argparse.SUPPRESS)  # internal: one side, in this process
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (CPU) or in total (GPU)")
    p.add_argument("--batch", type=int, default=16, help="GPU / --memory: rows per step")
    p.add_argument("--seq", type=int, default=4096, help="GPU / --memory: tokens per row")
    p.add_argument("--micro-batches", type=int, default=1, help="GPU only")
    p.add_argument("--loss-chunk", type=int, nargs="+", default=None,
                   help="GPU: tokens per chunk of the fused head (default: TrainConfig's); --memory: those compared "
                        "(default 0 and TrainConfig's)")
    p.add_argument("--remat", default="save_matmuls", choices=("none", "full", "save_matmuls"), help="GPU / --memory")
    p.add_argument("--peak-flops", type=float, default=None, help="GPU only: override the peak table (FLOP/s)")
    a = p.parse_args(argv)
    if a.run_side:
        print(json.dumps(run_side(a.run_side, a.steps)))
        return
    if a.gpu:
        out, name = gpu_bench(a.steps, a.batch, a.seq, a.micro_batches, a.remat, a.peak_flops,
                              a.loss_chunk[0] if a.loss_chunk else None), "train-gpu"
    elif a.memory:
        from llama.train import TrainConfig

        chunks = a.loss_chunk or [0, TrainConfig.__dataclass_fields__["loss_chunk"].default]
        out, name = memory_bench(a.batch, a.seq, chunks, a.remat), "train-memory"
    else:
        out, name = cpu_bench(a.side or ["ours", "peer"], a.rounds, a.steps), "train-cpu"
        report(out)
    print(json.dumps(out, indent=2))
    from llama import manifest

    print("results + manifest:", manifest.write_benchmark(name, out, config=vars(a)))


if __name__ == "__main__":
    main()
