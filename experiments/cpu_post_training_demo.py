"""CPU demonstration of SFT then DPO on a deterministic synthetic task, with held-out figures before and after.

    python experiments/cpu_post_training_demo.py [--out runs/post_demo] [--sft-steps 600] [--dpo-steps 100]
                                                 [--dpo-lr 5e-5] [--mask-special true]

Task (generated here, seed 0): "say W" -> "W", W = 4 letters from a..h (4,096 words; 256 held out, never trained
on). SFT rows are the correct answers; DPO pairs prefer the correct answer to the word with one letter changed.
Model: TINY's shape (2 layers, dim 64) with the 512-piece SentencePiece tokenizer of stories260K
(../shared/assets), from a random init: a model "pre-trained for the purpose" would be the issue's setting, this
is the shortest stand-in. Both stages are the one trainer, `python -m llama.train`, with this file as the config
(CONFIG below, SFT; the DPO stage sets objective=dpo, init_from=the SFT run, with --set).

Measured on held-out words: exact match of greedy answers (before SFT, after SFT, after DPO) and DPO reward
accuracy (the DPO policy against its reference, the SFT model; before DPO, policy = reference and every reward
is 0 up to float32 rounding between the two forward passes, so the strict comparison is noise, not a figure).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama.config import TINY  # noqa: E402
from llama.optim import OptimizerConfig  # noqa: E402
from llama.train import DataConfig, TrainConfig  # noqa: E402
from sharding.rules import MeshConfig  # noqa: E402

TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "assets", "llama2c_stories260K", "tok512.model")
LETTERS = "abcdefgh"

CONFIG = TrainConfig(
    model=TINY.replace(name="post-demo", vocab_size=512, max_seq_len=512),
    optimizer=OptimizerConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=20, decay_steps=580, weight_decay=0.0),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    data=DataConfig(paths="runs/post_demo/data/sft.jsonl", format="chat", tokenizer=TOKENIZER),
    objective="sft",
    steps=600, batch_size=8, seq_len=256, log_every=10, checkpoint_every=1000, sample_tokens=0,
)


def words():
    import numpy as np

    rng = np.random.default_rng(0)
    all_words = ["".join(LETTERS[(i >> (3 * k)) & 7] for k in range(4)) for i in range(8 ** 4)]
    order = rng.permutation(len(all_words))
    held = [all_words[i] for i in order[:256]]
    train = [all_words[i] for i in order[256:]]
    return train, held, rng


def corrupt(w, rng):
    k = int(rng.integers(4))
    return w[:k] + LETTERS[(LETTERS.index(w[k]) + 1 + int(rng.integers(7))) % 8] + w[k + 1:]


def prompt(w):
    return [{"role": "user", "content": f"say {w}"}]


def write_data(d):
    train, held, rng = words()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "sft.jsonl"), "w") as f:
        for w in train:
            f.write(json.dumps({"messages": prompt(w) + [{"role": "assistant", "content": w}]}) + "\n")
    with open(os.path.join(d, "pref.jsonl"), "w") as f:
        for w in train:
            f.write(json.dumps({"prompt": prompt(w), "chosen": w, "rejected": corrupt(w, rng)}) + "\n")
    return held, [(w, corrupt(w, rng)) for w in held]


def exact_match(params, cfg, tok, held) -> tuple[float, float]:
    """(exact match, share of answers that stopped: an end-of-turn token within 8 new tokens)."""
    from input_pipeline.chat import ChatFormat
    from llama.generate import generate

    fmt = ChatFormat(tok)
    prompts = [fmt.encode(prompt(w), generation_prompt=True)[0] for w in held]
    out = generate(params, prompts, cfg=cfg, max_new_tokens=8, stop_ids=tok.stop_ids)
    answers = [tok.decode([t for t in toks if t not in tok.stop_ids]).strip() for toks in out.tokens]
    stopped = sum(r == "stop" for r in out.stop_reason) / len(held)
    return sum(a == w for a, w in zip(answers, held)) / len(held), stopped


def reward_accuracy(params, ref, cfg, tok, pairs) -> float:
    import numpy as np

    from input_pipeline.chat import ChatFormat, encode_preference, pack_documents
    from llama.train import DpoConfig, compute_grads, objective_metrics

    fmt = ChatFormat(tok)
    docs = [encode_preference(fmt, prompt(w), [{"role": "assistant", "content": w}],
                              [{"role": "assistant", "content": r}], mask_special=True) for w, r in pairs]
    T = max(d.shape[1] for d in docs)
    rows = [pack_documents([d], T) for d in docs]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    tcfg = CONFIG.replace(model=cfg, objective="dpo", dpo=DpoConfig(), batch_size=len(rows), seq_len=T,
                          data=DataConfig(paths="x", format="preference", tokenizer=TOKENIZER))
    _, sums, norms = compute_grads(params, batch, cfg=tcfg, ref_params=ref)
    return float(objective_metrics(sums, norms, tcfg)["reward_accuracy"])


def main(argv=None):
    import jax

    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer
    from llama.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/post_demo")
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--mask-special", default="true", choices=("true", "false"),
                   help="dpo.mask_special: the paper's masking of header/termination tokens (true) or TRL's (false)")
    args = p.parse_args(argv)
    held, pairs = write_data(os.path.join(args.out, "data"))
    tok = load_tokenizer(TOKENIZER)
    here = os.path.abspath(__file__)
    sft, dpo = os.path.join(args.out, "sft"), os.path.join(args.out, "dpo")
    cfg = CONFIG.model
    init = jax.jit(lambda k: __import__("llama.model", fromlist=["init_params"]).init_params(cfg, k))(
        jax.random.split(jax.random.key(CONFIG.seed))[0])  # the trainer's step-0 params (train._init_state)
    results = dict(zip(("exact_match_before", "stopped_before"), exact_match(init, cfg, tok, held)))
    assert train_main(["--config", here, "--out", sft, "--set", f"steps={args.sft_steps}",
                       f"data.paths={args.out}/data/sft.jsonl"]) == 0
    _, p_sft = load_model(sft, dtype="float32")
    results.update(zip(("exact_match_sft", "stopped_sft"), exact_match(p_sft, cfg, tok, held)))
    results["reward_accuracy_sft"] = reward_accuracy(p_sft, p_sft, cfg, tok, pairs)
    assert train_main(["--config", here, "--out", dpo, "--set", "objective=dpo", "data.format=preference",
                       f"data.paths={args.out}/data/pref.jsonl", f"init_from={sft}", f"steps={args.dpo_steps}",
                       f"optimizer.peak_lr={args.dpo_lr}", f"optimizer.end_lr={args.dpo_lr / 10}",
                       f"dpo.mask_special={args.mask_special}", "optimizer.warmup_steps=5",
                       f"optimizer.decay_steps={max(1, args.dpo_steps - 5)}"]) == 0
    _, p_dpo = load_model(dpo, dtype="float32")
    results.update(zip(("exact_match_dpo", "stopped_dpo"), exact_match(p_dpo, cfg, tok, held)))
    results["reward_accuracy_dpo"] = reward_accuracy(p_dpo, p_sft, cfg, tok, pairs)
    print(json.dumps(results, indent=2))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results | {"held_out_words": len(held), "sft_steps": args.sft_steps,
                             "dpo_steps": args.dpo_steps, "dpo_lr": args.dpo_lr,
                             "mask_special": args.mask_special}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
