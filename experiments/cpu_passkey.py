"""The staged long-context recipe on this machine's CPU: pre-train a small model at 256 tokens on text with
embedded passkeys, extend it through stages at 1,024 and 4,096 tokens, and measure passkey retrieval at each
length before and after the extension.

    python -m experiments.cpu_passkey [--out runs/cpu_passkey] [--lengths 256,1024,4096]
    (the training alone: python -m llama.train --config experiments/cpu_passkey.py --out runs/cpu_passkey/train
     after `python -m llama.passkey corpus --out runs/cpu_passkey/passkeys.txt`)

Data: 4,000 documents of Mohtashami & Jaggi's passkey format (llama.passkey.training_corpus: a log-uniform number
of whole filler sentences, up to ~3,000 words, the key after a uniform number of them, the question and the
answer), tokenized by a 512-piece SentencePiece BPE trained on them; the evaluation's prompts are encoded the same
way (one text, whole sentences), so the answer's ids are those seen in training. Model: Llama 3.1's
architecture at 2 layers x 128 dims. RoPE: theta 500,000, no scaling, unchanged across the stages (as Llama 3
does for its long-context stages, paper section 3.4.2); positions restart per document and documents are masked apart (section 3.2), so at 256 tokens
the model only ever sees keys within 256 tokens of their question. Stages: 3,000 steps of 16 x 256 tokens, then
150 steps of 4 x 1,024, then 100 steps of 1 x 4,096 (the same tokens per step, 4,096). 16K tokens works the same
way (add a Stage) but takes longer than minutes on 2 cores. Measured (docs/long_context.md, 2026-12-04): the
stages run and bring the answer's NLL at 1K and 4K down to its 256-token level, but this model learns no
long-range retrieval at this budget (exact match 0 at every length and stage).

The driver trains to the end of each stage (one run directory, OUT/train, resumed at each boundary; llama.train
writes nothing but its own files there), evaluates passkey retrieval (llama.passkey, 5 depths x 8 samples per
length) into OUT/passkey_stage<k>/ and writes OUT/passkey_by_stage.json and .png.
"""

import argparse
import json
import os
import subprocess
import sys

from llama.config import ModelConfig
from llama.optim import OptimizerConfig
from llama.train import DataConfig, Stage, TrainConfig, stage_schedule
from sharding.rules import MeshConfig

OUT = "runs/cpu_passkey"
MODEL = ModelConfig(name="llama3.1-cpu-passkey", vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4,
                    ffn_dim=384, rope_theta=500000.0, rope_scaling=None, max_seq_len=4096, bos_id=1, eos_ids=(2,),
                    attention_block_q=256, attention_block_k=256)

CONFIG = TrainConfig(
    model=MODEL,
    optimizer=OptimizerConfig(peak_lr=1e-2, end_lr=1e-3, warmup_steps=30, decay_steps=1000, weight_decay=0.1),
    mesh=MeshConfig(data=1, fsdp=1, tensor=1),
    data=DataConfig(paths=os.path.join(OUT, "passkeys_256.txt"), separator="<|endoftext|>",
                    tokenizer=os.path.join(OUT, "tokenizer.model")),
    steps=1000, batch_size=16, seq_len=256,
    stages=(Stage(seq_len=1024, batch_size=4, start_step=800), Stage(seq_len=4096, batch_size=1, start_step=900)),
    log_every=50, checkpoint_every=50, keep_checkpoints=2, sample_tokens=0,
)


def _run(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--stages", type=int, default=None, help="run only the first N stages (a quick check)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, "tokenizer.model")
    if not os.path.exists(tok_path):  # trained once on unpadded documents, so PAD stays a byte-fallback token
        text = os.path.join(args.out, "tokenizer_text.txt")
        _run("-m", "llama.passkey", "corpus", "--out", text, "--docs", "500", "--max-words", "200", "--seed", "1")
        from llama.tokenizer import train_sentencepiece

        train_sentencepiece(open(text).read().split("<|endoftext|>"), MODEL.vocab_size, tok_path)
    me, run = os.path.abspath(__file__), os.path.join(args.out, "train")
    schedule = stage_schedule(CONFIG)
    ends = [start for start, _, _ in schedule[1:]] + [CONFIG.steps]
    results = {}
    for stage, end in enumerate(ends[:args.stages]):
        start, T, B = schedule[stage]
        corpus = os.path.join(args.out, f"passkeys_{T}.txt")
        if not os.path.exists(corpus):  # one document per row, every one a key with its question (PAD)
            _run("-m", "llama.passkey", "corpus", "--out", corpus, "--docs", str((end - start) * B),
                 "--tokenizer", tok_path, "--length", str(T), "--seed", str(10 + stage))
        _run("-m", "llama.train", "--config", me, "--out", run, "--set", f"steps={end}",
             f"data.paths={corpus}", f"data.tokenizer={tok_path}")
        ev = os.path.join(args.out, f"passkey_stage{stage}")
        _run("-m", "llama.passkey", "passkey", "--checkpoint", run, "--tokenizer", tok_path, "--lengths",
             args.lengths, "--samples", str(args.samples), "--out", ev)
        r = json.load(open(os.path.join(ev, "results.json")))
        results[f"after stage {stage} (step {end}, T={T})"] = {
            "lengths": r["lengths"], "accuracy": [sum(c) / len(c) for c in zip(*r["accuracy"])],
            "answer_nll": [sum(c) / len(c) for c in zip(*r["answer_nll"])]}
    from llama import manifest

    manifest.atomic_write(os.path.join(args.out, "passkey_by_stage.json"), json.dumps(results, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, r in results.items():
        ax.plot(r["lengths"], r["accuracy"], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (mean over depths)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "passkey_by_stage.png"))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
