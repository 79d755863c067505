"""CPU demonstration: pre-train a small model, then SFT, then DPO, on a deterministic synthetic task; learning rates
picked on a validation split, figures reported on a separate test split.

    python experiments/cpu_post_training_demo.py [--out runs/post_demo] [--pretrain-steps 400] [--sft-steps 400]
                                                 [--sft-lrs 1e-3,3e-3,6e-3] [--dpo-steps 300] [--dpo-lrs 3e-5,1e-4,3e-4]
                                                 [--dpo-rejected onpolicy|corrupt] [--plot PNG]

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
1. SFT (objective=sft, init_from=the pre-training run) on the training words' chat rows, one run per --sft-lrs,
   each with the trainer's held-out eval (eval_every) on the validation words' chat rows; the learning rate is
   picked by validation exact match (ties: the trainer's last held-out SFT loss).
2. DPO (objective=dpo, init_from=the picked SFT run; reference = the SFT model) on pairs preferring the correct
   answer. The rejected answer (--dpo-rejected onpolicy, the default) is the SFT model's own wrong answer to that
   training word, sampled (`write_onpolicy_pairs`; Llama 3 builds its preference pairs from model samples, paper
   section 4.2.1), else the word with one letter changed (--dpo-rejected corrupt: always). Validation pairs (the
   held-out eval) and test pairs use the one-letter change. One run per --dpo-lrs, each with the trainer's
   held-out eval on the validation pairs (eval_reward_accuracy etc.); the learning rate is picked by validation
   exact match (ties: the trainer's last held-out reward accuracy).
   Only the picked runs are scored on the test split. Other hyper-parameters are fixed beforehand (not tuned):
   they are listed in results.json. The SFT budget (400 steps) is short of the step count at which SFT alone
   answers every word (800 steps: docs/post_training.md), so DPO has errors left to fix.

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

from llama import manifest  # noqa: E402
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
    out = {"val": [(w, corrupt(w, rng)) for w in val], "test": [(w, corrupt(w, rng)) for w in test]}
    # The validation split as the trainer's held-out eval files (data.eval_paths).
    with open(os.path.join(d, "val_chat.jsonl"), "w") as f:
        for w, _ in out["val"]:
            f.write(json.dumps({"messages": prompt(w) + [{"role": "assistant", "content": w}]}) + "\n")
    with open(os.path.join(d, "val_pref.jsonl"), "w") as f:
        for w, r in out["val"]:
            f.write(json.dumps({"prompt": prompt(w), "chosen": w, "rejected": r}) + "\n")
    return out


def answers(params, cfg, tok, words, temperature=0.0, seed=0):
    """The model's answers to "say W" (8 new tokens at most, stop tokens removed; greedy at temperature 0) and
    whether each stopped."""
    from input_pipeline.chat import ChatFormat
    from llama.generate import generate
    from llama.sampling import SamplingConfig

    fmt = ChatFormat(tok)
    prompts = [fmt.encode(prompt(w), generation_prompt=True)[0] for w in words]
    out = generate(params, prompts, cfg=cfg, max_new_tokens=8, stop_ids=tok.stop_ids, seed=seed,
                   sampling=SamplingConfig(temperature=temperature, top_p=1.0))
    return ([tok.decode([t for t in toks if t not in tok.stop_ids]).strip() for toks in out.tokens],
            [r == "stop" for r in out.stop_reason])


def exact_match(params, cfg, tok, pairs) -> dict:
    """Exact match of greedy answers and the share of answers that stopped (an end-of-turn within 8 tokens)."""
    words = [w for w, _ in pairs]
    got, stopped = answers(params, cfg, tok, words)
    return {"exact_match": sum(a == w for a, w in zip(got, words)) / len(words), "stopped": sum(stopped) / len(words)}


def write_onpolicy_pairs(path, params, cfg, tok, samples: int) -> dict:
    """DPO pairs whose rejected answers are the SFT model's own wrong answers on the training words (the Llama 3
    recipe builds its preference pairs from model samples, paper section 4.2.1): for each training word, the
    first wrong answer among `samples` samples at temperature 1 (different seeds); where every sample is right,
    the one-letter corruption of pref.jsonl. Returns counts."""
    train, _, _, rng = splits()
    wrong = {}
    for k in range(samples):
        got, _ = answers(params, cfg, tok, train, temperature=1.0, seed=k)
        for w, a in zip(train, got):
            if a != w and a.strip() and w not in wrong:
                wrong[w] = a
    with open(path, "w") as f:
        for w in train:
            f.write(json.dumps({"prompt": prompt(w), "chosen": w, "rejected": wrong.get(w) or corrupt(w, rng)}) + "\n")
    return {"onpolicy_pairs": len(wrong), "corrupt_pairs": len(train) - len(wrong)}


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


def _metrics(run, key):
    """(steps, values) of `key` in a run's metrics.jsonl (training rows: loss ...; held-out rows: eval_...)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


def plot(path, out, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((a, b), (v, w)) = plt.subplots(2, 2, figsize=(12, 8))
    for name, label in (("pretrain", "pre-training (text NLL)"), (results["sft_run"], "SFT (answer NLL), picked lr"),
                        ("sft_from_random", "SFT from random init (control)"),
                        (results["dpo_run"], "DPO (loss), picked lr")):
        a.plot(*_metrics(os.path.join(out, name), "loss"), label=label)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend(fontsize=8)
    for lr in results["sft_lrs"]:
        v.plot(*_metrics(os.path.join(out, f"sft_lr{lr:g}"), "eval_loss"), marker=".", label=f"lr {lr:g}")
    v.set_xlabel("SFT step")
    v.set_ylabel("held-out SFT loss")
    v.set_yscale("log")
    v.set_title("trainer's held-out eval, SFT: validation chat rows", fontsize=9)
    v.legend(fontsize=8)
    for lr in results["dpo_lrs"]:
        w.plot(*_metrics(os.path.join(out, f"dpo_lr{lr:g}"), "eval_reward_accuracy"), marker=".", label=f"lr {lr:g}")
    w.set_xlabel("DPO step")
    w.set_ylabel("held-out DPO reward accuracy")
    w.set_ylim(0, 1.02)
    w.set_title("trainer's held-out eval, DPO: validation pairs (reference = the SFT model)", fontsize=9)
    w.legend(fontsize=8)
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
    fig.suptitle(f"cpu_post_training_demo: SFT lr {results['sft_lr']:g}, DPO lr {results['dpo_lr']:g}, "
                 "both picked on validation")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    manifest.save_figure(fig, path, dpi=100)


def main(argv=None):
    import time

    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer
    from llama.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/post_demo")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-lrs", default="1e-3,3e-3,6e-3", help="SFT peak learning rates tried; validation picks")
    p.add_argument("--dpo-steps", type=int, default=300)
    p.add_argument("--dpo-lrs", default="3e-5,1e-4,3e-4", help="DPO peak learning rates tried; validation picks")
    p.add_argument("--dpo-rejected", choices=("corrupt", "onpolicy"), default="onpolicy",
                   help="rejected answers: one-letter corruptions, or the SFT model's own wrong sampled answers "
                        "(write_onpolicy_pairs)")
    p.add_argument("--eval-every", type=int, default=100, help="SFT's held-out eval (validation split); DPO's: "
                   "every dpo-steps/4")
    p.add_argument("--plot", default=None, help="write a PNG of the losses and test figures here")
    args = p.parse_args(argv)
    t0 = time.time()
    data = os.path.join(args.out, "data")
    sp = write_data(data)
    tok = load_tokenizer(TOKENIZER)
    here = os.path.abspath(__file__)
    cfg = CONFIG.model
    # The whole validation split in the held-out eval: 256 chat rows fit 11 batches of 8 x 256 tokens, 256 pairs
    # (~150 tokens each, one per row) 32 batches; eval_batches is a cap.

    def train(name, *sets):
        run = os.path.join(args.out, name)
        print(f"== {name}: {' '.join(sets)}  [{time.time() - t0:.0f} s]", flush=True)
        assert train_main(["--config", here, "--out", run, "--set", *sets]) == 0
        return run, load_model(run, dtype="float32")[1]

    def last(run, key):
        return _metrics(run, key)[1][-1]

    def schedule(steps, lr, warmup):
        return [f"steps={steps}", f"optimizer.peak_lr={lr}", f"optimizer.end_lr={lr / 10}",
                f"optimizer.warmup_steps={warmup}", f"optimizer.decay_steps={max(1, steps - warmup)}"]

    pre_run, p_pre = train("pretrain", "objective=pretrain", "data.format=jsonl", f"data.paths={data}/pretrain.jsonl",
                           *schedule(args.pretrain_steps, 3e-3, 20))
    sft_data = ["objective=sft", "data.format=chat", f"data.paths={data}/sft.jsonl"]
    sft = {}
    for lr in (float(x) for x in args.sft_lrs.split(",")):
        run, params = train(f"sft_lr{lr:g}", *sft_data, *schedule(args.sft_steps, lr, 20), f"init_from={pre_run}",
                            f"data.eval_paths={data}/val_chat.jsonl", f"eval_every={args.eval_every}",
                            "eval_batches=16")
        sft[lr] = (run, params, scores(params, cfg, tok, sp["val"]) | {"held_out_sft_loss": last(run, "eval_loss")})
        print(f"   validation {sft[lr][2]}", flush=True)
    sft_lr = max(sft, key=lambda lr: (sft[lr][2]["exact_match"], -sft[lr][2]["held_out_sft_loss"]))
    sft_run, p_sft, _ = sft[sft_lr]
    _, p_ctl = train("sft_from_random", *sft_data, *schedule(args.sft_steps, sft_lr, 20))
    pairs_file, pair_counts = f"{data}/pref.jsonl", {}
    if args.dpo_rejected == "onpolicy":
        pairs_file = f"{data}/pref_onpolicy.jsonl"
        pair_counts = write_onpolicy_pairs(pairs_file, p_sft, cfg, tok, samples=4)
        print(f"   on-policy pairs: {pair_counts}", flush=True)
    dpo = {}
    for lr in (float(x) for x in args.dpo_lrs.split(",")):
        run, params = train(f"dpo_lr{lr:g}", "objective=dpo", "data.format=preference", f"data.paths={pairs_file}",
                            f"init_from={sft_run}", *schedule(args.dpo_steps, lr, 5),
                            f"data.eval_paths={data}/val_pref.jsonl", "eval_batches=32",
                            f"eval_every={max(1, args.dpo_steps // 4)}")
        dpo[lr] = (run, params, scores(params, cfg, tok, sp["val"]) | {
            "held_out_reward_accuracy": last(run, "eval_reward_accuracy"),
            "held_out_reward_margin": last(run, "eval_reward_margin"), "held_out_dpo_loss": last(run, "eval_dpo_loss")})
        print(f"   validation {dpo[lr][2]}", flush=True)
    dpo_lr = max(dpo, key=lambda lr: (dpo[lr][2]["exact_match"], dpo[lr][2]["held_out_reward_accuracy"]))
    dpo_run, p_dpo, _ = dpo[dpo_lr]
    results = {"sft_lr": sft_lr, "sft_run": os.path.basename(sft_run), "sft_lrs": list(sft),
               "dpo_lr": dpo_lr, "dpo_run": os.path.basename(dpo_run), "dpo_lrs": list(dpo),
               "validation": {"sft_by_lr": {f"{lr:g}": v[2] for lr, v in sft.items()},
                              "dpo_by_lr": {f"{lr:g}": v[2] for lr, v in dpo.items()}},
               "test": {"pretrained": scores(p_pre, cfg, tok, sp["test"]),
                        "sft": scores(p_sft, cfg, tok, sp["test"]),
                        "sft_from_random": scores(p_ctl, cfg, tok, sp["test"]),
                        "dpo": scores(p_dpo, cfg, tok, sp["test"], ref=p_sft)},
               "fixed": {"pretrain_steps": args.pretrain_steps, "pretrain_lr": 3e-3, "sft_steps": args.sft_steps,
                         "dpo_steps": args.dpo_steps, "dpo": "beta 0.1, nll_coef 0.2, mask_special",
                         "dpo_rejected": args.dpo_rejected, **pair_counts,
                         "schedule": "linear warmup (20 steps; DPO 5), cosine to lr/10",
                         "batch": f"{CONFIG.batch_size} x {CONFIG.seq_len} tokens"},
               "splits": {"train": 4096 - N_TEST - N_VAL, "validation": N_VAL, "test": N_TEST},
               "wall_s": round(time.time() - t0, 1)}
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
