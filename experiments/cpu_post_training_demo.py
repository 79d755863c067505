"""CPU demonstration: pre-train a small model, then SFT, then DPO, on a deterministic synthetic task; hyper-parameters
picked on a validation split, figures reported on a separate test split.

    python experiments/cpu_post_training_demo.py [--out runs/post_demo] [--pretrain-steps 400] [--sft-steps 300]
                                                 [--dpo-steps 100] [--dpo-lrs 2e-5,5e-5,2e-4] [--plot PNG]

Task (generated here, seed 0): "say W" -> "W", W = 4 letters from a..h (4,096 words). Splits by a fixed permutation:
256 test words, 256 validation words, 3,584 training words; no test or validation word appears in any training
text (pre-training, SFT or DPO).

Stages, each `python -m llama.train` with this file as the config (CONFIG below) and `--set`:
0. Pre-training (objective=pretrain) on plain text about the training words only, lines "echo W -> W" (8 per
   document, no chat format, no instruction wording). Why this corpus: it gives the model the skill the task needs
   (reading and copying 4-letter words in this tokenizer) the way a base model gains knowledge from text, while
   the chat layout, the instruction "say W" and stopping with the end-of-turn token are left for SFT to teach. So
   SFT has something to build on (a control run, SFT from the random init with the same steps, measures what
   the pre-training is worth) and still something to teach (exact match before SFT is low: the base model does not
   answer in the chat format). The main job's checkpoint (runs of experiments/cpu_small.py) is not used: its
   tokenizer is trained on other text, and a checkpoint is not in the repository, so the demo would not run alone.
1. SFT (objective=sft, init_from=the pre-training run) on the training words' chat rows.
2. DPO (objective=dpo, init_from=the SFT run; reference = the SFT model) on pairs preferring the correct answer to
   the word with one letter changed. The learning rate is picked from --dpo-lrs by validation exact match (ties:
   validation reward accuracy); only the picked run is scored on the test split. Other hyper-parameters are fixed
   beforehand (not tuned): they are listed in results.json.

Measured on a split (validation or test): exact match of greedy answers (8 new tokens at most, stop tokens removed),
the share of answers that stopped, preference accuracy (log p(correct) > log p(one-letter-wrong), summed over the
answer tokens, reference-free, so defined at every stage) and, after DPO, the DPO reward accuracy (the DPO policy
against its reference, the SFT model; before DPO policy = reference, every reward is 0 up to float rounding, so it
is not a figure).
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
N_TEST, N_VAL = 256, 256

CONFIG = TrainConfig(
    model=TINY.replace(name="post-demo", vocab_size=512, max_seq_len=512),
    optimizer=OptimizerConfig(peak_lr=3e-3, end_lr=3e-4, warmup_steps=20, decay_steps=280, weight_decay=0.0),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    data=DataConfig(paths="runs/post_demo/data/sft.jsonl", format="chat", tokenizer=TOKENIZER),
    objective="sft",
    steps=300, batch_size=8, seq_len=256, log_every=10, checkpoint_every=1000, sample_tokens=0,
)


def splits():
    import numpy as np

    rng = np.random.default_rng(0)
    all_words = ["".join(LETTERS[(i >> (3 * k)) & 7] for k in range(4)) for i in range(8 ** 4)]
    order = rng.permutation(len(all_words))
    words = [all_words[i] for i in order]
    return words[N_TEST + N_VAL:], words[N_TEST:N_TEST + N_VAL], words[:N_TEST], rng


def corrupt(w, rng):
    k = int(rng.integers(4))
    return w[:k] + LETTERS[(LETTERS.index(w[k]) + 1 + int(rng.integers(7))) % 8] + w[k + 1:]


def prompt(w):
    return [{"role": "user", "content": f"say {w}"}]


def write_data(d):
    """Writes pretrain.jsonl, sft.jsonl, pref.jsonl (training words only); returns {split: [(word, wrong)]}."""
    train, val, test, rng = splits()
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "pretrain.jsonl"), "w") as f:
        shuffled = [train[i] for i in rng.permutation(len(train))]
        for i in range(0, len(shuffled), 8):
            f.write(json.dumps({"text": "\n".join(f"echo {w} -> {w}" for w in shuffled[i:i + 8])}) + "\n")
    with open(os.path.join(d, "sft.jsonl"), "w") as f:
        for w in train:
            f.write(json.dumps({"messages": prompt(w) + [{"role": "assistant", "content": w}]}) + "\n")
    with open(os.path.join(d, "pref.jsonl"), "w") as f:
        for w in train:
            f.write(json.dumps({"prompt": prompt(w), "chosen": w, "rejected": corrupt(w, rng)}) + "\n")
    return {"val": [(w, corrupt(w, rng)) for w in val], "test": [(w, corrupt(w, rng)) for w in test]}


def exact_match(params, cfg, tok, pairs) -> dict:
    """Exact match of greedy answers and the share of answers that stopped (an end-of-turn within 8 tokens)."""
    from input_pipeline.chat import ChatFormat
    from llama.generate import generate

    words = [w for w, _ in pairs]
    fmt = ChatFormat(tok)
    prompts = [fmt.encode(prompt(w), generation_prompt=True)[0] for w in words]
    out = generate(params, prompts, cfg=cfg, max_new_tokens=8, stop_ids=tok.stop_ids)
    answers = [tok.decode([t for t in toks if t not in tok.stop_ids]).strip() for toks in out.tokens]
    return {"exact_match": sum(a == w for a, w in zip(answers, words)) / len(words),
            "stopped": sum(r == "stop" for r in out.stop_reason) / len(words)}


def _pair_batch(tok, pairs):
    import numpy as np

    from input_pipeline.chat import ChatFormat, encode_preference, pack_documents

    fmt = ChatFormat(tok)
    docs = [encode_preference(fmt, prompt(w), [{"role": "assistant", "content": w}],
                              [{"role": "assistant", "content": r}], mask_special=True) for w, r in pairs]
    T = max(d.shape[1] for d in docs)
    rows = [pack_documents([d], T) for d in docs]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, T


def preference_accuracy(params, cfg, tok, pairs) -> float:
    """Share of pairs with log p(correct answer) > log p(wrong answer), summed over the answer tokens (the DPO
    completion mask, mask_special=True), reference-free."""
    from llama import loss as llama_loss
    from llama import model as llama_model

    b, _ = _pair_batch(tok, pairs)
    h = llama_model.hidden_states(params, b["tokens"], b["positions"], b["segment_ids"], cfg=cfg)
    s = llama_loss.pair_sums(llama_loss.token_logps(params, h, b["targets"], cfg=cfg) * b["loss_mask"],
                             b["segment_ids"])[:, 0]
    return float((s[:, 0] > s[:, 1]).mean())


def reward_accuracy(params, ref, cfg, tok, pairs) -> float:
    """DPO reward accuracy of `params` against the reference `ref`, as the trainer logs it."""
    from llama.train import DpoConfig, compute_grads, objective_metrics

    batch, T = _pair_batch(tok, pairs)
    tcfg = CONFIG.replace(model=cfg, objective="dpo", dpo=DpoConfig(), batch_size=len(pairs), seq_len=T,
                          data=DataConfig(paths="x", format="preference", tokenizer=TOKENIZER))
    _, sums, norms = compute_grads(params, batch, cfg=tcfg, ref_params=ref)
    return float(objective_metrics(sums, norms, tcfg)["reward_accuracy"])


def scores(params, cfg, tok, pairs, ref=None) -> dict:
    out = exact_match(params, cfg, tok, pairs) | {"preference_accuracy": preference_accuracy(params, cfg, tok, pairs)}
    if ref is not None:
        out["reward_accuracy"] = reward_accuracy(params, ref, cfg, tok, pairs)
    return out


def _losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r]


def plot(path, out, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("pretrain", "pre-training (text NLL)"), ("sft", "SFT (answer NLL)"),
                        ("sft_from_random", "SFT from random init (control)"), (results["dpo_run"], "DPO (picked lr, loss)")):
        steps, losses = _losses(os.path.join(out, name))
        a.plot(steps, losses, label=label)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend(fontsize=8)
    stages = ["pre-trained", "SFT", "DPO"]
    t = results["test"]
    for key, label in (("exact_match", "exact match"), ("preference_accuracy", "log p(correct) > log p(wrong)")):
        b.plot(stages, [t[s][key] for s in ("pretrained", "sft", "dpo")], marker="o", label=label)
    b.plot(["DPO"], [t["dpo"]["reward_accuracy"]], marker="s", linestyle="", label="DPO reward accuracy")
    b.plot(["SFT"], [t["sft_from_random"]["exact_match"]], marker="x", linestyle="",
           label="exact match, SFT from random init")
    b.set_ylim(0, 1.02)
    b.set_ylabel(f"test split ({N_TEST} words)")
    b.legend(fontsize=8)
    fig.suptitle(f"cpu_post_training_demo: DPO lr {results['dpo_lr']} picked on validation")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer
    from llama.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/post_demo")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--dpo-lrs", default="2e-5,5e-5,2e-4", help="DPO peak learning rates tried; validation picks")
    p.add_argument("--plot", default=None, help="write a PNG of the losses and test figures here")
    args = p.parse_args(argv)
    data = os.path.join(args.out, "data")
    sp = write_data(data)
    tok = load_tokenizer(TOKENIZER)
    here = os.path.abspath(__file__)
    cfg = CONFIG.model

    def train(name, *sets):
        run = os.path.join(args.out, name)
        print(f"== {name}: {' '.join(sets)}", flush=True)
        assert train_main(["--config", here, "--out", run, "--set", *sets]) == 0
        return run, load_model(run, dtype="float32")[1]

    def schedule(steps, lr, warmup):
        return [f"steps={steps}", f"optimizer.peak_lr={lr}", f"optimizer.end_lr={lr / 10}",
                f"optimizer.warmup_steps={warmup}", f"optimizer.decay_steps={max(1, steps - warmup)}"]

    pre_run, p_pre = train("pretrain", "objective=pretrain", "data.format=jsonl", f"data.paths={data}/pretrain.jsonl",
                           *schedule(args.pretrain_steps, 3e-3, 20))
    sft_sets = ["objective=sft", "data.format=chat", f"data.paths={data}/sft.jsonl", *schedule(args.sft_steps, 1e-3, 10)]
    sft_run, p_sft = train("sft", *sft_sets, f"init_from={pre_run}")
    _, p_ctl = train("sft_from_random", *sft_sets)
    dpo = {}
    for lr in (float(x) for x in args.dpo_lrs.split(",")):
        run, params = train(f"dpo_lr{lr:g}", "objective=dpo", "data.format=preference", f"data.paths={data}/pref.jsonl",
                            f"init_from={sft_run}", *schedule(args.dpo_steps, lr, 5))
        dpo[lr] = (run, params, scores(params, cfg, tok, sp["val"], ref=p_sft))
        print(f"   validation {dpo[lr][2]}", flush=True)
    best = max(dpo, key=lambda lr: (dpo[lr][2]["exact_match"], dpo[lr][2]["reward_accuracy"]))
    dpo_run, p_dpo, _ = dpo[best]
    results = {"dpo_lr": best, "dpo_run": os.path.basename(dpo_run),
               "validation": {"sft": scores(p_sft, cfg, tok, sp["val"]),
                              "dpo_by_lr": {f"{lr:g}": v[2] for lr, v in dpo.items()}},
               "test": {"pretrained": scores(p_pre, cfg, tok, sp["test"]),
                        "sft": scores(p_sft, cfg, tok, sp["test"]),
                        "sft_from_random": scores(p_ctl, cfg, tok, sp["test"]),
                        "dpo": scores(p_dpo, cfg, tok, sp["test"], ref=p_sft)},
               "fixed": {"pretrain_steps": args.pretrain_steps, "pretrain_lr": 3e-3, "sft_steps": args.sft_steps,
                         "sft_lr": 1e-3, "dpo_steps": args.dpo_steps, "dpo": "beta 0.1, nll_coef 0.2, mask_special",
                         "batch": f"{CONFIG.batch_size} x {CONFIG.seq_len} tokens"},
               "splits": {"train": 4096 - N_TEST - N_VAL, "validation": N_VAL, "test": N_TEST}}
    print(json.dumps(results, indent=2))
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    if args.plot:
        plot(args.plot, args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
