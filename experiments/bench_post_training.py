"""SFT and DPO train-step throughput on this CPU: this project vs TRL + transformers, same shapes, separate processes.

    python -m experiments.bench_post_training            # all five runs, one process each, then the table
    python -m experiments.bench_post_training --one ours sft   # one run (what the driver starts): ours|trl|hf
    python -m experiments.bench_post_training --repeats 2 --set loss_chunk=0   # A B (C) A B (C), --set for ours

Fair measure: every side processes the same 1,024 real tokens per step, none of them padding (TRL's rows all
have the same length, so its batches carry no pad), and tokens/s = 1,024 / median step time (process CPU seconds
per step are printed too: under load they move less than wall time). The work is not the same: our rows are 256
tokens packed with 2 (SFT) or 4 (DPO) documents under the document mask; TRL's are the separate 128- or 64-token
sequences. Our output layer runs only on the chunks holding loss positions (llama/loss.py `_Chunks`: about half
the rows' positions here); TRL's fused head scores every position on CPU (trl/trainer/utils.py
`add_fused_lm_head`: it compacts to the loss positions on Triton devices only). Neither peer clips gradients;
ours clips at global norm 1.0. `--set` tries our side with other TrainConfig settings (e.g. `--set
model.attention_block_q=128 model.attention_block_k=128`). Our side runs as `python -m llama.train` does, its
process re-executed once with glibc's malloc on transparent huge pages (llama/host.py; LLAMA_HUGE_PAGES=0 turns
it off); the peers' with glibc's defaults, or the same setting with `--peer-huge-pages`. Each row reports which
(`malloc`).

Sides. Ours: the trainer's jitted step (`make_train_step`: the objective's loss, clipping, AdamW; loss_chunk
default). `trl`: TRL's own step, `trainer.compute_loss` (what transformers' Trainer.training_step calls) +
backward + torch AdamW, with DPOTrainer (loss_type ["sigmoid", "sft"], weights [1, 0.2], beta 0.1, a deep-copied
reference model) or SFTTrainer (its fused head with the per-token entropy and top-1 it logs every step, on
completion-only labels). `hf` (SFT only): transformers' masked causal-LM loss on full logits + backward + AdamW,
the same loss value as SFTTrainer's (the summary prints both first-step losses) for less work: a floor under any
trainer built on transformers, reported beside TRL's. Gradient checkpointing is off on every side (TRL's
configs default it on; ours: remat "none").

Shapes: cpu_small's model (dim 256, 4 layers, GQA 8:2, vocab 4096, float32), 4 rows x 256 tokens per step; DPO: 2
pairs of (chosen, rejected) per row for us (4 segments of 64), i.e. 16 sequences of 64 tokens for TRL (8 chosen, 8
rejected), the same tokens. Tokens/s = 1024 / median step time of 20 steps after 2 warm-up steps (also the
fastest step, the median CPU seconds and minor page faults per step, and the first step's loss); peak memory =
the process's max RSS.
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
    times, losses = [], []
    for _ in range(STEPS):
        t = _now()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(_now() - t)
        losses.append(float(m["loss"]))
    return times, losses


def _tiny_tokenizer():
    """The trainers want a tokenizer to build on; the timed steps take token ids directly."""
    import tokenizers
    import transformers

    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="<unk>")


def run_peer(impl, objective, tmp):
    """impl "trl": TRL's own loss (DPOTrainer / SFTTrainer .compute_loss, what Trainer.training_step calls);
    "hf" (SFT only): transformers' masked causal-LM loss, the same value with less work (no fused head, no
    entropy or top-1 metrics). Both with torch AdamW, gradient checkpointing off (as ours: remat "none")."""
    import datasets
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
        import copy

        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=tmp, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1,
                         report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                             processing_class=_tiny_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["a"],
                                                                       "rejected": ["a a"]}))
        order = torch.cat([torch.arange(0, B * n, 2), torch.arange(1, B * n, 2)])  # [chosen; rejected]
        inputs = {"input_ids": ids[order], "attention_mask": torch.ones_like(ids), "completion_mask": comp[order]}
    else:
        labels = ids.masked_fill(comp == 0, -100)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if impl == "trl":  # SFTTrainer patches the model with its fused head (log-probs, entropy, top-1 per token)
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False)
            trainer = SFTTrainer(model=model, args=args, processing_class=_tiny_tokenizer(),
                                 train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["a"]}))
    if impl == "trl":
        model = trainer.model
        on = (model.is_activation_checkpointing if hasattr(type(model), "is_activation_checkpointing")
              else model.is_gradient_checkpointing)  # transformers < 5's name
        assert not on, "TRL's peer must run without activation checkpointing, as ours (remat none)"

        def loss_fn():
            return trainer.compute_loss(model, dict(inputs))
    else:
        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    times, losses = [], []
    for _ in range(STEPS):
        t = _now()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        times.append(_now() - t)
        losses.append(float(loss))
    return times, losses


def one(impl, objective, settings=(), peer_huge_pages=False):
    import tempfile

    from llama import host

    # ours runs as llama.train does (glibc's malloc on huge pages: llama/host.py re-executes this process once);
    # the peers with glibc's default unless --peer-huge-pages, the check that the setting is not what makes the ratio
    malloc = host.use_huge_pages() if impl == "ours" or peer_huge_pages else "default"
    times, losses = (run_ours(objective, settings) if impl == "ours"
                     else run_peer(impl, objective, tempfile.mkdtemp()))
    timed = np.array(times[WARMUP:])
    med, cpu, faults = (float(x) for x in np.median(timed, axis=0))
    return {"impl": impl, "objective": objective, "settings": list(settings) if impl == "ours" else [],
            "malloc": malloc, "step_s": med, "tokens_per_s": B * T / med, "fastest_step_s": float(timed[:, 0].min()),
            "cpu_s_per_step": cpu, "minor_faults_per_step": faults, "first_loss": losses[0],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


PEERS = {"sft": ("trl", "hf"), "dpo": ("trl",)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", nargs=2, metavar=("IMPL", "OBJECTIVE"), help="IMPL: ours, trl or hf (SFT only)")
    p.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides for our side (KEY=VALUE)")
    p.add_argument("--repeats", type=int, default=1, help="alternate ours and the peers this many times per objective")
    p.add_argument("--peer-huge-pages", action="store_true",
                   help="run the peers' processes with the malloc setting ours uses too (llama/host.py use_huge_pages)")
    args = p.parse_args(argv)
    if args.one:
        impl, objective = args.one
        if objective not in PEERS or impl not in ("ours", *PEERS[objective]):
            p.error(f"--one {impl} {objective}: expected ours|trl|hf sft or ours|trl dpo")
        print(json.dumps(one(impl, objective, settings=args.set, peer_huge_pages=args.peer_huge_pages)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for objective in ("sft", "dpo"):
        for _ in range(args.repeats):
            for impl in ("ours", *PEERS[objective]):
                load = os.getloadavg()
                cmd = [sys.executable, "-m", "experiments.bench_post_training", "--one", impl, objective]
                cmd += ["--peer-huge-pages"] if args.peer_huge_pages and impl != "ours" else []
                out = subprocess.run(cmd + (["--set", *args.set] if impl == "ours" and args.set else []),
                                     cwd=root, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]) | {"load_before": [round(x, 2) for x in load]})
                print(rows[-1], flush=True)
    names = {"trl": "TRL", "hf": "transformers' loss"}
    for objective in ("sft", "dpo"):
        rounds = zip(*([r for r in rows if r["impl"] == i and r["objective"] == objective]
                       for i in ("ours", *PEERS[objective])))
        for o, *peers in rounds:
            line = (f"{objective}: ours {o['tokens_per_s']:,.0f} tok/s ({o['cpu_s_per_step']:.3f} CPU s/step, "
                    f"{o['peak_rss_gb']:.2f} GB, fastest step {1e3 * o['fastest_step_s']:.0f} ms, load "
                    f"{o['load_before'][0]})")
            for t in peers:
                line += (f"; {names[t['impl']]} {t['tokens_per_s']:,.0f} tok/s ({t['cpu_s_per_step']:.3f} CPU s/step, "
                         f"{t['peak_rss_gb']:.2f} GB, fastest {1e3 * t['fastest_step_s']:.0f} ms, load "
                         f"{t['load_before'][0]}): {o['tokens_per_s'] / t['tokens_per_s']:.2f}x, fastest steps "
                         f"{t['fastest_step_s'] / o['fastest_step_s']:.2f}x")
            if len(peers) == 2:  # the same model, seed and tokens: TRL's loss must equal transformers'
                line += f"; first-step loss TRL {peers[0]['first_loss']:.6f}, transformers {peers[1]['first_loss']:.6f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
