"""Long-context retrieval: synthetic passkeys and needle in a haystack, on a grid of lengths x depths.

    python -m llama.passkey passkey --checkpoint RUN_OR_MODEL_DIR [--lengths 256,1024,4096]
        [--depths 0,0.25,0.5,0.75,1] [--samples 8] [--mesh context=2] [--out DIR]
    python -m llama.passkey needle  --checkpoint DIR [--corpus haystack.txt] ...
    python -m llama.passkey corpus  --out passkeys.txt --docs 2000 [--max-words 200]  (text for a tokenizer)
    python -m llama.passkey corpus  --out passkeys.jsonl --docs 2000 --tokenizer T --length 256
        [--answer-weight 20] [--max-distance N]       (training rows: data.format=segments, the answer weighted)

passkey (Mohtashami & Jaggi 2023, "Landmark Attention", section 4.2): a random 5-digit key in a sentence
("The pass key is 71432. Remember it. 71432 is the pass key.") hidden at a given depth inside repeated filler
("The grass is green. The sky is blue. ..."), asked for at the end ("What is the pass key? The pass key is").
needle (G. Kamradt's "needle in a haystack", 2023): the sentence "The special magic number is 71432." at a given
depth inside a window of real text (default: the CPython documentation topics shipped with Python, the
trainer's embedded corpus), asked for at the end.

Every prompt is as many whole filler sentences (haystack words) as fit `length` tokens with the answer, encoded
as one text as the trainer encodes a document, then padded with EOS after the answer to exactly `length` tokens,
so a grid cell is one batch of fixed T (and context parallelism's 2 x CP chunks divide it whenever they divide
the length). Scoring, stated in the
results: a sample is correct when greedy decoding reproduces every token of the answer (" 71432"), computed in
one forward pass with the answer teacher-forced (the same thing: greedy decoding continues with the answer's
tokens exactly when each is the argmax given the ones before). Reported per cell: exact-match accuracy and the
answer's mean negative log-likelihood per token. Outputs in --out: results.json, heatmap.png, manifest.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llama import manifest

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
         "quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NEEDLE = " The special magic number is {key}."
NEEDLE_QUESTION = " What is the special magic number? The special magic number is"
SCORING = ("exact match: greedy decoding reproduces every token of the answer ' KEY' (one forward pass, answer "
           "teacher-forced; a sample counts 1 when each answer token is the argmax given the tokens before it)")
TASKS = ("passkey", "needle")


class PasskeyError(ValueError):
    """A grid or corpus that cannot be built (names the flag and what was expected)."""


@dataclass(frozen=True)
class Sample:
    tokens: list[int]  # BOS, the prompt and the answer (the first `end` tokens), then EOS up to exactly `length`
    n_answer: int  # the answer's tokens are tokens[end - n_answer:end]
    key: str
    length: int
    depth: float
    end: int


# The filler as whole sentences: a prompt holds a whole number of them on either side of the key, as the training
# documents do, so no sentence is ever cut.
FILLER_SENTENCES = tuple(re.findall(r" [^.]+\.", FILLER))


def _enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, bos=False, eos=False))


def passkey_text(key: str, n: int, n_before: int) -> str:
    """A passkey document without its answer: the intro, n filler sentences (cycling) with the key sentence after
    the first n_before, and the question. Training documents (`training_corpus`) are this plus " KEY."; prompts
    are this plus " KEY", encoded as one text in both, so the answer's ids are the same in training and eval."""
    fill = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(n)]
    return INTRO + "".join(fill[:n_before]) + PASSKEY.format(key=key) + "".join(fill[n_before:]) + PASSKEY_QUESTION


def _words(text: str) -> list[str]:
    """The haystack cut into words, each with the whitespace before it ("".join gives the text back)."""
    return re.findall(r"\s*\S+", text)


def _largest_fit(n_tokens, limit: int, length: int, what: str) -> int:
    """The largest n in [0, limit] with n_tokens(n) <= length (a binary search: n_tokens grows with n, each
    sentence or word adding tokens)."""
    if n_tokens(0) > length:
        raise PasskeyError(f"--lengths {length}: too short for the {what} prompt (at least {n_tokens(0)} tokens "
                           "with this tokenizer)")
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if n_tokens(mid) <= length else (lo, mid - 1)
    return lo


def make_sample(task: str, tok, length: int, depth: float, rng: np.random.Generator,
                haystack: list[str] | None = None) -> Sample:
    """One prompt of at most `length` tokens, padded with EOS after the answer to exactly `length` (the model is
    causal: tokens after the answer change no prediction of it). passkey: the intro, whole filler sentences with
    the key sentence after round(depth x n) of them (0 = first, 1 = last), the question, the answer; needle: a
    random window of whole words of the haystack (`_words`) with the needle sentence at that depth.

    The prompt text is encoded as one string, as the trainer encodes a document: encoding the pieces one by one
    would start each with SentencePiece's dummy-prefix space ("▁") and give ids the model never saw in training
    (" 71432" alone encodes as "▁", "▁", "7", ...; inside a text as "▁", "7", ...). The number of sentences or
    words is the largest that fits (a binary search over whole-text encodings)."""
    key = str(rng.integers(10000, 100000))
    if task == "passkey":
        limit = length
        text = lambda n: passkey_text(key, n, int(round(depth * n)))  # noqa: E731
    else:
        if len(haystack) <= length:
            raise PasskeyError(f"--corpus: {len(haystack)} words, too few for a {length}-token needle prompt (each "
                               "word is at least one token); give a longer text")
        first = int(rng.integers(0, len(haystack) - length + 1))
        window, limit = haystack[first:first + length], length
        text = lambda n: ("".join(window[:int(round(depth * n))]) + NEEDLE.format(key=key)  # noqa: E731
                          + "".join(window[int(round(depth * n)):n]) + NEEDLE_QUESTION)

    lo = _largest_fit(lambda n: 1 + len(_enc(tok, text(n) + " " + key)), limit, length, task)  # BOS, prompt, answer
    prompt, full = _enc(tok, text(lo)), _enc(tok, text(lo) + " " + key)
    if full[:len(prompt)] != prompt:  # the answer would re-tokenize the prompt's end: scoring would be ill-defined
        raise PasskeyError(f"the tokenizer merges the answer ' {key}' into the question's last token")
    tokens = [tok.bos_id] + full
    end = len(tokens)
    return Sample(tokens + [tok.eos_id] * (length - end), len(full) - len(prompt), key, length, depth, end)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _predict(params, tokens, targets, *, cfg):
    """Greedy next tokens and the log-probability of the targets (the next tokens): [B, T] each. Only [B, T]
    leaves the device, never the [B, T, V] logits."""
    from llama import model

    logits = model.forward(params, tokens, cfg=cfg)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return jnp.argmax(logits, -1).astype(jnp.int32), logp


def score(params, cfg, samples: list[Sample], mesh=None) -> tuple[float, float]:
    """(exact-match accuracy, mean answer NLL per token) of same-length samples, as one batch. On a mesh the
    rows are split over its batch axes and, with context > 1, put in the load-balanced order first."""
    from input_pipeline.context import from_load_balanced, mesh_context, to_load_balanced

    rows = np.asarray([s.tokens for s in samples], np.int32)
    n = len(rows)
    if mesh is not None:  # pad the batch to a multiple of the data axes (the extra rows are ignored)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = np.concatenate([rows, np.repeat(rows[:1], -n % dp, 0)])
    batch = {"tokens": rows, "targets": np.roll(rows, -1, axis=1)}  # the last target is unused
    if mesh is not None:
        from sharding.rules import batch_sharding

        cp = mesh_context(mesh)
        with jax.set_mesh(mesh):
            placed = {k: jax.device_put(v, batch_sharding(mesh, 2)) for k, v in to_load_balanced(batch, cp).items()}
            out = _predict(params, placed["tokens"], placed["targets"], cfg=cfg)
            pred, logp = (from_load_balanced(np.asarray(x), cp) for x in out)
    else:
        pred, logp = (np.asarray(x) for x in _predict(params, batch["tokens"], batch["targets"], cfg=cfg))
    correct, nll = [], []
    for i, s in enumerate(samples):
        a, e = s.n_answer, s.end
        # the answer's tokens rows[i, e-a:e] are predicted at positions e-a-1 .. e-2
        correct.append(bool((pred[i, e - a - 1:e - 1] == rows[i, e - a:e]).all()))
        nll.append(float(-logp[i, e - a - 1:e - 1].mean()))
    return float(np.mean(correct)), float(np.mean(nll))


def default_haystack() -> str:
    """The embedded corpus: the CPython documentation topics (pydoc_data.topics), as the trainer uses."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def evaluate(task: str, params, cfg, tok, *, lengths, depths, samples: int = 8, seed: int = 0, mesh=None,
             haystack_text: str | None = None) -> dict:
    """The grid: accuracy[d][l] and nll[d][l] for depths x lengths (None where a length exceeds the model's
    max_seq_len). The same seed gives the same keys and windows."""
    if task not in TASKS:
        raise PasskeyError(f"task {task!r}: expected one of {TASKS}")
    if not lengths or not depths or samples < 1 or any(not 0 <= d <= 1 for d in depths):
        raise PasskeyError(f"--lengths {lengths}, --depths {depths}, --samples {samples}: expected lengths, depths "
                           "in [0, 1] and at least one sample")
    haystack = _words(haystack_text or default_haystack()) if task == "needle" else None
    acc = [[None] * len(lengths) for _ in depths]
    nll = [[None] * len(lengths) for _ in depths]
    for j, L in enumerate(lengths):
        if L > cfg.max_seq_len:
            continue
        for i, d in enumerate(depths):
            rng = np.random.default_rng([seed, L, int(d * 1000)])
            batch = [make_sample(task, tok, L, d, rng, haystack) for _ in range(samples)]
            acc[i][j], nll[i][j] = score(params, cfg, batch, mesh)
    return {"task": task, "scoring": SCORING, "lengths": list(lengths), "depths": list(depths),
            "samples_per_cell": samples, "seed": seed, "accuracy": acc, "answer_nll": nll,
            "skipped_lengths": [L for L in lengths if L > cfg.max_seq_len], "model": cfg.name,
            "max_seq_len": cfg.max_seq_len}


def heatmap(results: dict, path: str, title: str | None = None) -> str:
    """Accuracy over depth (rows) x length (columns), written to a temp file and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array([[np.nan if a is None else a for a in row] for row in results["accuracy"]], float)
    fig, ax = plt.subplots(figsize=(1.2 * len(results["lengths"]) + 2, 0.6 * len(results["depths"]) + 1.5), dpi=110)
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]])
    ax.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for (i, j), a in np.ndenumerate(acc):
        ax.text(j, i, "-" if np.isnan(a) else f"{a:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    ax.set_title(title or f"{results['task']}: {results['model']}")
    return manifest.save_figure(fig, path)


def write_results(results: dict, out: str, *, mesh=None, extra: dict | None = None) -> dict[str, str]:
    """results.json, heatmap.png and manifest.json in `out` (each written to a temp file and renamed)."""
    os.makedirs(out, exist_ok=True)
    paths = {"results": manifest.atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n"),
             "heatmap": heatmap(results, os.path.join(out, "heatmap.png"))}
    paths["manifest"] = manifest.write_manifest(out, mesh=mesh, seeds={"samples": results["seed"]},
                                                extra={"task": results["task"], **(extra or {})})
    return paths


# ------------------------------------------------------------------------------------------ training text
# Training documents are padded after the answer to exactly one row with this character (a weight-0 segment: no
# loss on it). Rows of the segments format hold whole documents (input_pipeline/chat.py), several per row when
# they fit; the probes (docs/long_context.md) formed a content-based copy with one retrieval example per row, so
# each document fills its row. "#" is absent from the tokenizer's training text (`training_text`), so each is
# one byte-fallback token that merges with nothing.
PAD = "#"
# The segments format's weight of the answer's target tokens (the key after the question; every other token 1,
# padding 0): the probes' x 20, the one change that made the model learn to copy the key within minutes on CPU.
ANSWER_WEIGHT = 20


def training_corpus(path: str, *, docs: int, tok, length: int, answer_weight: int = ANSWER_WEIGHT,
                    max_distance: int | None = None, seed: int = 0) -> str:
    """Passkey documents for pre-training (the CPU experiment) as JSONL rows of the segments format (input_pipeline
    /chat.py, data.format=segments): `passkey_text` with n filler sentences, the key sentence d of them before the
    question (weight 1), the answer " KEY" (weight `answer_weight`), "." (1), then PAD up to exactly `length`
    tokens with BOS and EOS (weight 0). top = the most sentences that fit `length`; d is uniform in [0,
    min(max_distance, top)] (None: top) and n uniform in [d, top], so every distance the evaluation grid asks for
    at this length (depth 0 of a full prompt is d = n = top) is as common as any other. max_distance: a
    curriculum's first phase, short key-to-question distances only, where a copy forms sooner (docs/long_context.md).

    The earlier draw (n uniform, then a uniform depth) gave distance >= 3/4 top to ~7% of the documents and depth 0
    of a full 256-token prompt (d within 2 sentences of top) to 0.3%; a model that had learned to retrieve then did
    so only at the short distances it had seen."""
    if not length or length < 1:
        raise PasskeyError("training_corpus: --length (the row length in tokens) is required")
    if answer_weight < 0 or (max_distance is not None and max_distance < 0):
        raise PasskeyError(f"training_corpus: --answer-weight {answer_weight} and --max-distance {max_distance} must "
                           "be >= 0")
    rng = np.random.default_rng(seed)
    enc = functools.lru_cache(maxsize=None)(lambda text: len(_enc(tok, text)))
    # the most sentences that fit with BOS and EOS, for a key of the longest tokenization (all 5-digit keys tokenize
    # alike with split digits; min over depths guards the rest)
    top = min(_largest_fit(lambda n: 2 + enc(passkey_text("99999", n, int(d * n)) + " 99999."), 2 * length,
                           length, "passkey") for d in (0, 0.5, 1))
    rows = []
    for _ in range(docs):
        key = str(rng.integers(10000, 100000))
        d = int(rng.integers(0, (top if max_distance is None else min(max_distance, top)) + 1))
        n = int(rng.integers(d, top + 1))
        prompt = passkey_text(key, n, n - d)
        pad = length - 2 - len(_enc(tok, prompt + f" {key}."))
        if pad < 0 or len(_enc(tok, prompt + f" {key}." + PAD * pad)) != length - 2:
            raise PasskeyError(f"training_corpus: a {n}-sentence document does not pad to exactly {length} tokens "
                               f"with {PAD!r} (is {PAD!r} in the tokenizer's vocabulary?)")
        segs = [{"text": prompt, "weight": 1}, {"text": f" {key}", "weight": answer_weight}, {"text": ".", "weight": 1}]
        rows.append(json.dumps({"segments": segs + ([{"text": PAD * pad, "weight": 0}] if pad else [])}))
    return manifest.atomic_write(path, "\n".join(rows) + "\n")


def training_text(path: str, *, docs: int, max_words: int = 200, seed: int = 0) -> str:
    """Unpadded passkey documents (n uniform in [0, max_words / 4] filler sentences, d uniform in [0, n]; filler
    sentences have 4-5 words), separated by <|endoftext|>: the text to train the experiment's tokenizer on."""
    from llama.train import CORPUS_SEPARATOR

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        key, n = str(rng.integers(10000, 100000)), int(rng.integers(0, max(1, max_words // 4) + 1))
        out.append(passkey_text(key, n, int(rng.integers(0, n + 1))) + f" {key}.")
    return manifest.atomic_write(path, f"\n{CORPUS_SEPARATOR}\n".join(out))


# -------------------------------------------------------------------------------------------------- CLI
def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PasskeyError(f"{flag} {text!r}: expected comma-separated integers") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PasskeyError(f"{flag} {text!r}: expected comma-separated numbers in [0, 1]") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama.passkey", description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=TASKS + ("corpus",))
    ap.add_argument("--checkpoint", help="a model checkpoint or training run directory")
    ap.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's tokenizer.model, else Llama 3's)")
    ap.add_argument("--lengths", default="256,1024,4096", help="context lengths in tokens, comma-separated")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1], comma-separated")
    ap.add_argument("--samples", type=int, default=8, help="prompts per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", help="needle: the haystack text file (default: the CPython docs topics)")
    ap.add_argument("--mesh", help="e.g. context=4 or fsdp=2,context=4 (default: one device)")
    ap.add_argument("--out", help="output directory (default runs/<task>)")
    ap.add_argument("--docs", type=int, default=2000, help="corpus: number of documents")
    ap.add_argument("--max-words", type=int, default=200, help="corpus: the longest filler, in words (unpadded)")
    ap.add_argument("--length", type=int, help="corpus: with --tokenizer, documents of exactly this many tokens")
    ap.add_argument("--answer-weight", type=int, default=ANSWER_WEIGHT,
                    help="corpus: the loss weight of the answer's tokens (segments format; the rest 1, padding 0)")
    ap.add_argument("--max-distance", type=int, help="corpus: the longest key-to-question distance in filler "
                    "sentences (default: all that fit --length)")
    args = ap.parse_args(argv)
    try:
        if args.task == "corpus":
            from llama.tokenizer import load_tokenizer

            if not args.tokenizer:  # the text to train a tokenizer on
                print(training_text(args.out or "passkeys.txt", docs=args.docs, max_words=args.max_words,
                                    seed=args.seed))
                return 0
            print(training_corpus(args.out or "passkeys.jsonl", docs=args.docs, tok=load_tokenizer(args.tokenizer),
                                  length=args.length, answer_weight=args.answer_weight,
                                  max_distance=args.max_distance, seed=args.seed))
            return 0
        if not args.checkpoint:
            raise PasskeyError("--checkpoint is required for passkey and needle")
        from llama.generate import load_for_inference, load_tokenizer_for

        cfg, params, mesh = load_for_inference(args.checkpoint, mesh_text=args.mesh)
        tok = load_tokenizer_for(args.checkpoint, args.tokenizer)
        text = None
        if args.corpus:
            if not os.path.isfile(args.corpus):
                raise PasskeyError(f"--corpus {args.corpus}: file not found")
            text = open(args.corpus, encoding="utf-8", errors="replace").read()
        results = evaluate(args.task, params, cfg, tok, lengths=_ints(args.lengths, "--lengths"),
                           depths=_floats(args.depths, "--depths"), samples=args.samples, seed=args.seed, mesh=mesh,
                           haystack_text=text)
        out = args.out or os.path.join("runs", args.task)
        paths = write_results(results, out, mesh=mesh, extra={"checkpoint": os.path.abspath(args.checkpoint),
                                                              "corpus": args.corpus or "pydoc_data.topics"})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d, row in zip(results["depths"], results["accuracy"]):
        print(f"depth {d:5.0%}: " + "  ".join("  -  " if a is None else f"{a:.2f}" for a in row))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    from llama import host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work
    sys.exit(main())
