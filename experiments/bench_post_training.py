"""SFT and DPO train-step throughput on this CPU: this project vs TRL + transformers, same shapes, separate processes.

    python -m experiments.bench_post_training            # all four runs, one process each, then the table
    python -m experiments.bench_post_training --one ours sft   # one run (what the driver starts)
    python -m experiments.bench_post_training --repeats 2 --set loss_chunk=0   # A B A B, our side with --set

Fair measure: both sides process the same 1,024 real tokens per step, none of them padding (TRL's rows all have
the same length, so its batches carry no pad), and tokens/s = 1,024 / median step time on both sides (process
CPU seconds per step are printed too: under load they move less than wall time). The work is not the same:
our rows are 256 tokens packed with 2 (SFT) or 4 (DPO) documents, and on CPU the flash tile is 256 x 256
(llama/attention.py DEFAULT_BLOCKS), so each row computes the whole masked score tile, 2x (SFT) or 4x (DPO) the
score work of TRL's separate 128- or 64-token sequences. Our output layer runs only on the chunks holding loss
positions (llama/loss.py `_Chunks`: about half the rows' positions here); TRL's fused head scores every position
on CPU (trl/trainer/utils.py `add_fused_lm_head`: it compacts to the loss positions on Triton devices only).
TRL's SFT side is transformers' masked causal-LM loss on full logits, not SFTTrainer.compute_loss's fused head
(which adds entropy and top-1 outputs); neither TRL side clips gradients, ours clips at global norm 1.0. `--set`
tries our side with other TrainConfig settings (e.g. `--set model.attention_block_q=128
model.attention_block_k=128`). Our side runs as `python -m llama.train` does, its process re-executed once with
glibc's malloc on transparent huge pages (llama/host.py; LLAMA_HUGE_PAGES=0 turns it off); TRL's with glibc's
defaults, or the same setting with `--peer-huge-pages`. Each row reports which (`malloc`).

Shapes: cpu_small's model (dim 256, 4 layers, GQA 8:2, vocab 4096, float32), 4 rows x 256 tokens per step; DPO: 2
pairs of (chosen, rejected) per row for us (4 segments of 64), i.e. 16 sequences of 64 tokens for TRL (8 chosen, 8
rejected), the same tokens. Ours: the trainer's jitted step (`make_train_step`, AdamW, loss_chunk default). TRL:
DPOTrainer's `_compute_loss` (loss_type ["sigmoid", "sft"]) + backward + torch AdamW; SFT: transformers' masked
causal-LM loss (what TRL's SFTTrainer computes with completion_only_loss) + backward + AdamW. Tokens/s = 1024 /
median step time of 20 steps after 2 warm-up steps (also the fastest step, and the median CPU seconds and minor
page faults per step); peak memory = the process's max RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# 2 warm-up steps, then 20 timed: a process's first seconds of steps can run ~1.5x slow on this shared host
# (seen on both sides; 8 steps at 258-302 ms, then 180-185, in one of 12 runs of ours), which a 6-step median did
# not outlast
B, T, WARMUP, STEPS = 4, 256, 2, 22


def model_cfg():
    from llama.config import TINY

    return TINY.replace(name="bench", vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768,
                        max_seq_len=1024, param_dtype="float32", compute_dtype="float32")


def batch(objective):
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 4096, (B, T + 1)).astype(np.int32)
    n = 4 if objective == "dpo" else 2  # DPO: 4 segments of 64 per row = 2 pairs; SFT: 2 documents of 128
    seg = (np.arange(T) // (T // n) + 1).astype(np.int32)
    pos = (np.arange(T) % (T // n)).astype(np.int32)
    mask = ((pos >= (T // n) // 2) & (pos < T // n - 1)).astype(np.float32)  # second half of each segment
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.tile(seg, (B, 1)),
            "positions": np.tile(pos, (B, 1)), "loss_mask": np.tile(mask, (B, 1))}


def _now() -> np.ndarray:
    """Wall seconds, process CPU seconds, minor page faults so far: a step's figures are the difference."""
    return np.array([time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt])


def run_ours(objective, settings=()):
    import jax

    from llama.train import DataConfig, TrainConfig, apply_overrides, make_train_step
    from sharding.rules import MeshConfig, make_mesh

    data = DataConfig(paths="x.jsonl", format={"sft": "chat", "dpo": "preference"}[objective], tokenizer="x")
    cfg = TrainConfig(model=model_cfg(), batch_size=B, seq_len=T, objective=objective, data=data,
                      mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    if settings:
        cfg = apply_overrides(cfg, list(settings))
    init, step = make_train_step(cfg, make_mesh(cfg.mesh))
    state, b = init(0), batch(objective)
    times = []
    for _ in range(STEPS):
        t = _now()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(_now() - t)
    return times


def run_trl(objective, tmp):
    import torch
    import transformers


    torch.manual_seed(0)
    c = model_cfg()
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
                                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                                      intermediate_size=c.ffn_dim, max_position_embeddings=c.max_seq_len,
                                      rope_theta=c.rope_theta, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b = batch(objective)
    n = 4 if objective == "dpo" else 2
    L = T // n
    # the same tokens as rows of separate sequences (no packing in TRL): [B * n, L]
    ids = torch.tensor(b["tokens"].reshape(B * n, L).astype(np.int64))
    comp = torch.tensor(np.roll(b["loss_mask"], 1, axis=1).reshape(B * n, L).astype(np.int64))
    if objective == "dpo":
        import datasets
        import tokenizers
        from trl import DPOConfig, DPOTrainer

        wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
        wl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="<unk>")
        args = DPOConfig(output_dir=tmp, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1,
                         report_to="none", use_cpu=True, bf16=False)
        import copy

        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["a"],
                                                                       "rejected": ["a a"]}))
        model = trainer.model
        order = torch.cat([torch.arange(0, B * n, 2), torch.arange(1, B * n, 2)])  # [chosen; rejected]
        inputs = {"input_ids": ids[order], "attention_mask": torch.ones_like(ids), "completion_mask": comp[order]}

        def loss_fn():
            return trainer._compute_loss(model, inputs, return_outputs=False)
    else:
        labels = ids.masked_fill(comp == 0, -100)

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    times = []
    for _ in range(STEPS):
        t = _now()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        times.append(_now() - t)
    return times


def one(impl, objective, settings=(), peer_huge_pages=False):
    import tempfile

    from llama import host

    # ours runs as llama.train does (glibc's malloc on huge pages: llama/host.py re-executes this process once);
    # the peer with glibc's default unless --peer-huge-pages, the check that the setting is not what makes the ratio
    malloc = host.use_huge_pages() if impl == "ours" or peer_huge_pages else "default"
    times = run_ours(objective, settings) if impl == "ours" else run_trl(objective, tempfile.mkdtemp())
    timed = np.array(times[WARMUP:])
    med, cpu, faults = (float(x) for x in np.median(timed, axis=0))
    return {"impl": impl, "objective": objective, "settings": list(settings) if impl == "ours" else [],
            "malloc": malloc, "step_s": med, "tokens_per_s": B * T / med, "fastest_step_s": float(timed[:, 0].min()),
            "cpu_s_per_step": cpu, "minor_faults_per_step": faults,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", nargs=2, metavar=("IMPL", "OBJECTIVE"))
    p.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides for our side (KEY=VALUE)")
    p.add_argument("--repeats", type=int, default=1, help="alternate ours, TRL this many times per objective")
    p.add_argument("--peer-huge-pages", action="store_true",
                   help="run TRL's process with the malloc setting ours uses too (llama/host.py use_huge_pages)")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, settings=args.set, peer_huge_pages=args.peer_huge_pages)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for objective in ("sft", "dpo"):
        for _ in range(args.repeats):
            for impl in ("ours", "trl"):
                load = os.getloadavg()
                cmd = [sys.executable, "-m", "experiments.bench_post_training", "--one", impl, objective]
                cmd += ["--peer-huge-pages"] if args.peer_huge_pages and impl == "trl" else []
                out = subprocess.run(cmd + (["--set", *args.set] if impl == "ours" and args.set else []),
                                     cwd=root, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]) | {"load_before": [round(x, 2) for x in load]})
                print(rows[-1], flush=True)
    for objective in ("sft", "dpo"):
        pairs = zip(*([r for r in rows if r["impl"] == i and r["objective"] == objective] for i in ("ours", "trl")))
        for o, t in pairs:
            print(f"{objective}: ours {o['tokens_per_s']:,.0f} tok/s ({o['cpu_s_per_step']:.3f} CPU s/step, "
                  f"{o['peak_rss_gb']:.2f} GB), TRL {t['tokens_per_s']:,.0f} tok/s ({t['cpu_s_per_step']:.3f} CPU "
                  f"s/step, {t['peak_rss_gb']:.2f} GB): {o['tokens_per_s'] / t['tokens_per_s']:.2f}x; fastest steps "
                  f"{1e3 * o['fastest_step_s']:.0f} / {1e3 * t['fastest_step_s']:.0f} ms: "
                  f"{t['fastest_step_s'] / o['fastest_step_s']:.2f}x  "
                  f"(load {o['load_before'][0]}, {t['load_before'][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
