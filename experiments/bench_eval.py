"""`llama.eval choice` against lm-evaluation-harness's Hugging Face backend on the same task, model and CPU.

    python experiments/bench_eval.py tasks DIR             # only build the local TinyStories tasks (+ lm-eval YAML)
    python experiments/bench_eval.py bench [--n 400] [--rounds 2] [--batch-size 16] [--compile-cache]

`tasks` writes DIR/story_choice.jsonl (multiple choice: which two words continue a TinyStories paragraph),
DIR/story_text.jsonl (whole paragraphs, for perplexity) and, for lm-eval, DIR/story_choice.yaml and
DIR/story_text.yaml over those files (docs/evaluation.md explains the format). `bench` converts the real
stories260K (llama2c -> Orbax -> HF, with its SentencePiece tokenizer as an exact HF tokenizer), then times
each side in its own process, alternated A B A B, printing the load average before each run; examples/s
counts the whole command: startup, model load, tokenization and scoring; the process's CPU seconds (user +
system, all threads) are printed beside it, a figure that other jobs on a shared machine disturb less. llama.eval runs cold (no compilation
cache: the headline); --compile-cache adds a third side, llama.eval with JAX's persistent compilation cache
(JAX_COMPILATION_CACHE_DIR) filled by one earlier, unreported run, reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
STORIES = os.path.join(ASSETS, "text", "tinystories", "tinystories_v1_valid_head.txt")
MODEL = os.path.join(ASSETS, "llama2c_stories260K")

CHOICE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
TEXT_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def paragraphs(path: str = STORIES) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [p.strip() for p in f.read().split("\n\n") if p.strip()]


def build_tasks(out_dir: str, n_choice: int = 200, n_text: int = 24, seed: int = 0) -> dict[str, str]:
    """Deterministic tasks from TinyStories paragraphs. Choice: the context is a paragraph cut after a random
    word, the gold choice its next two words, the three others two-word spans of other paragraphs; every
    tenth context keeps a trailing space (lm-eval moves it into the continuation). Text: groups of three
    paragraphs (several hundred tokens, so long inputs span several windows)."""
    rng = random.Random(seed)
    paras = paragraphs()
    words = [p.split(" ") for p in paras]
    long = [i for i, w in enumerate(words) if len(w) >= 12]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    while len(rows) < n_choice:
        i = rng.choice(long)
        k = rng.randint(5, len(words[i]) - 3)
        gold = " ".join(words[i][k:k + 2])
        choices = [gold]
        while len(choices) < 4:
            j = rng.choice(long)
            m = rng.randint(1, len(words[j]) - 3)
            c = " ".join(words[j][m:m + 2])
            if c not in choices:
                choices.append(c)
        rng.shuffle(choices)
        ctx = " ".join(words[i][:k]) + (" " if len(rows) % 10 == 9 else "")
        rows.append({"id": len(rows), "context": ctx, "choices": choices, "gold": choices.index(gold)})
    texts = [{"id": t, "text": "\n\n".join(paras[3 * t:3 * t + 3])} for t in range(n_text)]
    paths = {}
    for name, data, yaml in (("story_choice", rows, CHOICE_YAML), ("story_text", texts, TEXT_YAML)):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            f.write(yaml.format(name=name, path=paths[name], cache=os.path.join(out_dir, "hf_datasets_cache")))
    return paths


def export_stories(out_dir: str) -> tuple[str, str]:
    """(Orbax checkpoint, HF export with an exact HF copy of tok512.model) of the real stories260K."""
    sys.path.insert(0, ROOT)
    from llama.convert import convert
    from llama.eval import export_hf_tokenizer

    orbax, hf = os.path.join(out_dir, "orbax"), os.path.join(out_dir, "hf")
    if not os.path.exists(orbax):
        convert("llama2c-to-orbax", os.path.join(MODEL, "stories260K.bin"), orbax, progress=False)
    if not os.path.exists(hf):
        convert("orbax-to-hf", orbax, hf, progress=False)
        export_hf_tokenizer(os.path.join(MODEL, "tok512.model"), hf)
    return orbax, hf


LM_EVAL = """
import sys, time, json
t0 = time.perf_counter()
import lm_eval
from lm_eval.tasks import TaskManager
r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={sys.argv[1]},dtype=float32,add_bos_token=True",
                            tasks=["story_choice"], task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False),
                            batch_size=int(sys.argv[3]), limit=int(sys.argv[4]), device="cpu")
print(json.dumps({"acc": r["results"]["story_choice"]["acc,none"], "total_s": time.perf_counter() - t0}))
"""


def bench(n: int, rounds: int, batch_size: int, compile_cache: bool = False) -> None:
    work = os.path.join(tempfile.gettempdir(), "llama_bench_eval")
    tasks = build_tasks(os.path.join(work, "tasks"), n_choice=n)
    orbax, hf = export_stories(work)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the headline side compiles from scratch
    ours = [sys.executable, "-m", "llama.eval", "choice", "--checkpoint", orbax, "--tokenizer",
            os.path.join(MODEL, "tok512.model"), "--task", tasks["story_choice"], "--batch-size", str(batch_size),
            "--out", os.path.join(work, "out"), "--no-progress"]
    theirs = [sys.executable, "-c", LM_EVAL, hf, os.path.join(work, "tasks"), str(batch_size), str(n)]
    sides = [("llama.eval", ours, env), ("lm-eval", theirs, env)]
    if compile_cache:  # a third side: ours with JAX's persistent compilation cache, filled by one unreported run
        cache = tempfile.mkdtemp(prefix="jax_cache_", dir=work)
        warm_env = dict(env, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        subprocess.run(ours, cwd=ROOT, env=warm_env, capture_output=True, check=True)
        sides.append(("llama.eval warm compile cache", ours, warm_env))
    for r in range(rounds):
        for name, cmd, side_env in sides:
            load = os.getloadavg()
            c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, env=side_env, capture_output=True, text=True)
            dt, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime  # all cores, user + system
            if p.returncode:
                raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
            acc = json.loads(p.stdout.strip().splitlines()[-1])["acc"] if name == "lm-eval" else \
                json.load(open(os.path.join(work, "out", "results.json")))["story_choice"]["acc"]
            print(f"round {r} {name:10s} load {load[0]:.2f} {load[1]:.2f}: {n} examples ({4 * n} requests) in "
                  f"{dt:.2f} s = {n / dt:.1f} examples/s (whole process; CPU {cpu:.1f} s), acc {acc:.4f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tasks")
    t.add_argument("dir")
    t.add_argument("--n", type=int, default=200)
    b = sub.add_parser("bench")
    b.add_argument("--n", type=int, default=400)
    b.add_argument("--rounds", type=int, default=2)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--compile-cache", action="store_true",
                   help="also time llama.eval with a warm JAX persistent compilation cache (reported apart)")
    a = ap.parse_args(argv)
    if a.cmd == "tasks":
        print(json.dumps(build_tasks(a.dir, n_choice=a.n), indent=1))
    else:
        bench(a.n, a.rounds, a.batch_size, a.compile_cache)


if __name__ == "__main__":
    main()
