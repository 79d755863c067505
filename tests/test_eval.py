"""llama.eval against lm-evaluation-harness (PyPI `lm-eval`, HF backend) on the real stories260K, exported with
`orbax-to-hf`, on tasks built from TinyStories (experiments/bench_eval.py build_tasks); the trainer's held-out
eval against `llama.eval ppl`; bad input.

Tolerance: per-example log-likelihoods within 1e-4 in float32. Both sides sum float32 per-token log-probs of
the same logits (ours and transformers' agree to ~1e-6 per logit on stories260K, tests/test_convert.py); a
several-hundred-token document accumulates ~1e-5 of float32 rounding on lm-eval's side (measured max 6.9e-5
on 600-token documents, 2.4e-5 on choices).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import require_shared
from llama import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_eval", os.path.join(ROOT, "experiments", "bench_eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """(orbax checkpoint, HF export with an exact HF tokenizer, tasks dir, task paths, tokenizer)."""
    require_shared("assets", "llama2c_stories260K", "stories260K.bin")
    require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt")
    from llama.tokenizer import load_tokenizer

    b = bench_module()
    work = str(tmp_path_factory.mktemp("stories"))
    paths = b.build_tasks(os.path.join(work, "tasks"), n_choice=200, n_text=24)
    orbax, hf = b.export_stories(work)
    tok = load_tokenizer(os.path.join(b.MODEL, "tok512.model"))
    return orbax, hf, os.path.join(work, "tasks"), paths, tok


@pytest.fixture(scope="module")
def loaded(stories):
    """(cfg, params) of our checkpoint and transformers' float32 model of the HF export."""
    import torch
    import transformers

    from llama.checkpoint import load_model

    cfg, params = load_model(stories[0])
    return cfg, params, transformers.AutoModelForCausalLM.from_pretrained(stories[1], dtype=torch.float32)


def lm_eval_run(hf, tasks_dir, task, *, add_bos, limit=None, max_length=None):
    """lm-eval's own results and its per-document samples (sorted by doc_id), in this process."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"pretrained={hf},dtype=float32,add_bos_token={add_bos}" + (f",max_length={max_length}" if max_length else "")
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)  # indexing lm-eval's own tasks takes ~10 s
    r = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task], task_manager=manager,
                                batch_size=8, limit=limit, device="cpu", log_samples=True)
    return r["results"][task], sorted(r["samples"][task], key=lambda s: s["doc_id"])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(argv):
    assert ev.main(argv) == 0


# ------------------------------------------------------------------------------- parity with lm-eval
def check_choice_parity(stories, tmp_path, limit):
    orbax, hf, tasks_dir, paths, tok = stories
    examples = ev.read_task(paths["story_choice"], "choice")[:limit]
    # The HF tokenizer lm-eval uses tokenizes every request exactly as SentencePiece does.
    import transformers

    hft = transformers.AutoTokenizer.from_pretrained(hf)
    for e in examples:
        for text in [e.context, e.context + " " + e.choices[0]] + [" " + c for c in e.choices]:
            assert hft.encode(text) == tok.encode(text, bos=True), text
    out = str(tmp_path / "choice")
    run_cli(["choice", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--task", paths["story_choice"],
             "--limit", str(limit), "--batch-size", "4", "--out", out, "--no-progress"])
    ours = read_jsonl(os.path.join(out, "samples_story_choice.jsonl"))
    mine = json.load(open(os.path.join(out, "results.json")))["story_choice"]
    theirs, samples = lm_eval_run(hf, tasks_dir, "story_choice", add_bos=True, limit=limit)
    assert [s["doc_id"] for s in samples] == list(range(limit)) and mine["n"] == limit
    worst = 0.0
    for s, o, e in zip(samples, ours, examples):
        assert [tuple(a) for a in s["arguments"]] == [(e.context, " " + c) for c in e.choices]
        lls = np.array([float(r[0]) for r in s["filtered_resps"]])
        worst = max(worst, float(np.abs(lls - np.array(o["loglikelihoods"])).max()))
        assert [bool(r[1]) for r in s["filtered_resps"]] == o["is_greedy"]
        assert (s["acc"], s["acc_norm"]) == (o["acc"], o["acc_norm"])
    print(f"choice: {limit} examples, acc {mine['acc']}, acc_norm {mine['acc_norm']}, max |ll diff| {worst:.2e}")
    assert worst < TOL
    assert mine["acc"] == theirs["acc,none"] and mine["acc_norm"] == theirs["acc_norm,none"]


def check_ppl_parity(stories, tmp_path, limit, context):
    orbax, hf, tasks_dir, paths, tok = stories
    out = str(tmp_path / "ppl")
    run_cli(["ppl", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--data", paths["story_text"], "--format",
             "jsonl", "--context", str(context), "--limit", str(limit), "--out", out, "--no-progress",
             "--attention-impl", "xla"])
    # The scoring is compared on the reference attention path. flash equals it within 1e-5 per logit
    # (tests/test_attention.py), but a document's log-likelihood sums hundreds of float32 log-probs: with flash
    # the worst of 24 documents differed from transformers by 1.02e-4 nats (2026-12-03), at the 1e-4 bound.
    ours = read_jsonl(os.path.join(out, "samples_story_text.jsonl"))
    mine = json.load(open(os.path.join(out, "results.json")))["story_text"]
    assert max(s["tokens"] for s in ours) > 2 * context  # several windows per document
    # lm-eval's rolling windows prefix the text with BOS itself: its tokenizer must not add another.
    theirs, samples = lm_eval_run(hf, tasks_dir, "story_text", add_bos=False, limit=limit, max_length=context)
    worst = max(abs(float(s["filtered_resps"][0]) - o["loglikelihood"]) for s, o in zip(samples, ours))
    print(f"ppl: {limit} documents, {mine['tokens']} tokens, context {context}: max |ll diff| {worst:.2e}; "
          f"bits/byte {mine['bits_per_byte']:.6f} vs {theirs['bits_per_byte,none']:.6f}")
    assert len(samples) == limit and worst < TOL
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert mine[k] == pytest.approx(theirs[f"{k},none"], rel=1e-6)  # totals of ~1e4 nats: 1e-4 / 1e4


def test_choice_and_ppl_match_lm_eval_on_a_few_examples(stories, tmp_path):
    check_choice_parity(stories, tmp_path, limit=16)
    check_ppl_parity(stories, tmp_path, limit=4, context=128)


@pytest.mark.slow
def test_choice_and_ppl_match_lm_eval_in_full(stories, tmp_path):
    check_choice_parity(stories, tmp_path, limit=200)
    check_ppl_parity(stories, tmp_path, limit=24, context=128)


def test_ppl_reads_prepared_data_as_its_text(stories, tmp_path):
    """The same documents as JSONL text and as prepared token ids (BOS ... EOS stripped): the same loss."""
    from input_pipeline import Source, prepare_corpus

    orbax, _, _, paths, tok = stories
    prepare_corpus(Source((paths["story_text"],), format="jsonl"), tok, str(tmp_path / "prep"), progress=False)
    common = ["--checkpoint", orbax, "--tokenizer", str(tok.path), "--limit", "3", "--no-progress"]
    run_cli(["ppl", "--data", paths["story_text"], "--format", "jsonl", "--out", str(tmp_path / "a"), *common])
    run_cli(["ppl", "--data", str(tmp_path / "prep"), "--format", "prepared", "--out", str(tmp_path / "b"), *common])
    a = json.load(open(tmp_path / "a" / "results.json"))["story_text"]
    b = json.load(open(tmp_path / "b" / "results.json"))["prep"]
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_strided_ppl_is_a_sliding_window(stories, loaded):
    """stride 1: each token is predicted from exactly the `context` tokens before it (BOS first), which is
    what a stride buys; checked against transformers on each token's own window."""
    import torch

    *_, paths, tok = stories
    cfg, params, m = loaded
    text = read_jsonl(paths["story_text"])[0]["text"][:200]
    ids = tok.encode(text)
    C = 8
    metrics, samples = ev.ppl_scores(params, cfg, [ids], [text], bos=tok.bos_id, context=C, stride=1, batch_size=8)
    x = [tok.bos_id] + ids
    ref = 0.0
    with torch.no_grad():
        for j in range(1, len(x)):
            logits = m(torch.tensor([x[max(0, j - C):j]])).logits[0, -1].double()
            ref += float(torch.log_softmax(logits, -1)[x[j]])
    assert samples[0]["loglikelihood"] == pytest.approx(ref, abs=TOL)
    assert metrics["tokens"] == len(ids) and metrics["loss"] == pytest.approx(-ref / len(ids), rel=1e-6)


@pytest.mark.parametrize("trees", [False, True])
def test_packing_and_prefix_sharing_equal_one_sequence_at_a_time(stories, loaded, trees, monkeypatch):
    """Requests packed into shared rows, one-token choices and "prefix" choices answered from another
    request's row, and (trees) the choices of a context laid out as one tree, the context once and each
    continuation after it: the same log-probs as transformers on each sequence alone."""
    import torch

    *_, tok = stories
    cfg, params, m = loaded
    segs, groups = [], []
    for g, (ctx, conts) in enumerate([("Once upon a time, there was a little",
                                       [" girl", " dog", " dogs", " dog named Max", " boy who liked to play"]),
                                      ("Lily and Ben went to the", [" park.", " sea", " big shop"]),
                                      ("The sun", [" was"])]):
        segs += [ev.request_segment(*ev.encode_pair(tok, ctx, c), cfg.max_seq_len)[0] for c in conts]
        groups += [g] * len(conts)
    rolling = ev.rolling_segments(tok.encode("Lily and Ben went to the park."), tok.bos_id, 8, 8)
    segs += rolling
    groups += [10 + i for i in range(len(rolling))]
    tree_calls, tree_fn = [], ev._tree_query_jit
    monkeypatch.setattr(ev, "_tree_query_jit", lambda *a, **k: tree_calls.append(1) or tree_fn(*a, **k))
    got = ev.run_segments(params, segs, cfg=cfg, batch_size=2, row_len=64, groups=groups if trees else None)
    assert bool(tree_calls) == trees
    assert len({s.inputs for s in segs}) > 4  # distinct inputs, some a prefix of another
    for s, (logp, greedy) in zip(segs, got):
        with torch.no_grad():
            logits = m(torch.tensor([s.inputs])).logits[0]
        lsm = torch.log_softmax(logits, -1).numpy()
        np.testing.assert_allclose(logp, [lsm[p, t] for p, t in s.queries], atol=1e-5)  # ~1e-6 per logit
        assert list(greedy) == [int(logits[p].argmax()) == t for p, t in s.queries]


def test_pack_places_every_segment_without_overlap():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 64, 300)]
    place = ev.pack(lengths, 64)
    used = {}
    for n, (r, off) in zip(lengths, place):
        assert off + n <= 64
        for k in range(off, off + n):
            assert (r, k) not in used
            used[(r, k)] = 1
    assert len({r for r, _ in place}) <= sum(lengths) / 64 * 1.1 + 1  # best fit wastes little


def test_encode_pair_moves_trailing_spaces_like_lm_eval(stories):
    *_, tok = stories
    ctx, cont = ev.encode_pair(tok, "The cat sat ", "on the mat")
    assert ctx == tok.encode("The cat sat", bos=True)
    assert ctx + cont == tok.encode("The cat sat on the mat", bos=True)
    assert ev.encode_pair(tok, "", " hello") == ([tok.bos_id], tok.encode(" hello"))


# ---------------------------------------------------------------------------------------------- generate
def test_generate_task_scores_greedy_output(stories, loaded, tmp_path):
    """The reference answer is transformers' own greedy continuation; the stop string cuts it."""
    import torch

    orbax, _, _, _, tok = stories
    m = loaded[2]
    prompt = "Once upon a time, there was a little girl named Lily. She"
    out = m.generate(torch.tensor([tok.encode(prompt, bos=True)]), max_new_tokens=20, do_sample=False)
    ref = tok.decode(out[0].tolist()[len(tok.encode(prompt, bos=True)):])
    first = ref.split(".")[0]
    task = tmp_path / "gen.jsonl"
    task.write_text(json.dumps({"context": prompt, "answer": first}) + "\n" +
                    json.dumps({"context": prompt, "answers": ["a purple elephant", first.split()[-1]]}) + "\n")
    run_cli(["generate", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--task", str(task), "--max-new-tokens",
             "20", "--stop", ".", "--out", str(tmp_path / "g"), "--no-progress"])
    res = json.load(open(tmp_path / "g" / "results.json"))["gen"]
    samples = read_jsonl(tmp_path / "g" / "samples_gen.jsonl")
    assert samples[0]["output"] == first and "." not in samples[0]["output"]
    assert res == {"exact_match": 0.5, "contains": 1.0, "truncated": 0, "n": 2}


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("row,message", [
    ("{not json", "tasks.jsonl:2: not a JSON object"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', 'tasks.jsonl:2: "gold" 2 is out of range for 2 choices'),
    ('{"context": "a", "choices": "xy", "gold": 0}', 'tasks.jsonl:2: "choices" must be a non-empty list'),
    ('{"choices": ["x"], "gold": 0}', 'tasks.jsonl:2: expected an object with a string "context"'),
])
def test_malformed_task_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "gold": 0}\n' + row + "\n")
    with pytest.raises(ev.EvalError, match=message.replace("[", r"\[")):
        ev.read_task(str(path), "choice")


def test_cli_errors_are_one_line_exit_2(stories, tmp_path):
    orbax, _, _, paths, tok = stories
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "word " * 700, "choices": ["a", "b"], "gold": 0}) + "\n")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "precious.txt").write_text("keep me")
    base = ["choice", "--checkpoint", orbax, "--no-progress"]
    cases = [
        (["--tokenizer", str(tok.path), "--task", str(long), "--on-overflow", "error", "--out", str(tmp_path / "o")],
         "exceed the model's window of 512"),
        (["--tokenizer", str(tmp_path / "missing.model"), "--task", paths["story_choice"], "--out", str(tmp_path / "o")],
         "missing.model does not exist"),
        (["--task", paths["story_choice"], "--out", str(tmp_path / "o")], "has 128256 ids but the model's vocab_size is 512"),
        (["--tokenizer", str(tok.path), "--task", paths["story_choice"], "--limit", "2", "--out", str(tmp_path / "occupied")],
         "is not a llama.eval output"),
    ]
    for extra, message in cases:  # in this process: each is a ValueError naming the input ...
        with pytest.raises(ValueError, match=message):
            ev.main(base + extra)
    assert (tmp_path / "occupied" / "precious.txt").read_text() == "keep me" and not (tmp_path / "o").exists()
    # ... which the command line prints as one line and exit status 2
    p = subprocess.run([sys.executable, "-m", "llama.eval"] + base + cases[0][0], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and cases[0][1] in lines[0], p.stderr[-2000:]


def test_long_context_is_cut_on_the_left_and_counted(stories, tmp_path):
    orbax, _, _, _, tok = stories
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "word " * 700 + "The", "choices": ["cat", "dog"], "gold": 0}) + "\n")
    run_cli(["choice", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--task", str(long), "--out",
             str(tmp_path / "o"), "--no-progress"])
    s = read_jsonl(tmp_path / "o" / "samples_long.jsonl")[0]
    n = len(tok.encode("word " * 700 + "The cat", bos=True))
    assert s["truncated_tokens"][0] == n - 513  # lm-eval keeps (context + continuation)[-(max_length + 1):]
    # rerunning into a previous eval output replaces it
    run_cli(["choice", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--task", str(long), "--out",
             str(tmp_path / "o"), "--no-progress"])


# ------------------------------------------------------------------------------------------ trainer eval
def test_hash_split_is_stable_disjoint_and_keeps_copies_together():
    from input_pipeline.sources import Documents, hash_split

    class Docs(Documents):
        name, stats = "mem", {"documents": 0}

        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    texts = [f"document number {i}" for i in range(400)] + ["document number 7"] * 3
    held, rest = hash_split(Docs(texts), 0.2, heldout=True), hash_split(Docs(texts), 0.2, heldout=False)
    h, r = {held[i] for i in range(len(held))}, {rest[i] for i in range(len(rest))}
    assert len(held) + len(rest) == len(texts) and not h & r
    assert 0.12 < len(h) / 400 < 0.28  # a binomial(400, 0.2) share
    # the same documents in another order (another file layout, another process count) split the same way
    shuffled = hash_split(Docs(texts[::-1]), 0.2, heldout=True)
    assert {shuffled[i] for i in range(len(shuffled))} == h


@pytest.mark.slow
def test_trainer_eval_equals_ppl_and_is_the_same_after_resume(tmp_path):
    """Eval every 2 steps on a held-out share; 4 steps, then a resume to 6: the eval set (hashed into the
    manifest) is the same in both runs, the curve lands in metrics.jsonl and loss.png, and the last eval loss
    equals `llama.eval ppl --heldout` on the final checkpoint."""
    from llama.metrics import read_jsonl as read_metrics
    from llama.train import main
    from test_train import write_experiment

    exp = write_experiment(tmp_path, eval_batches=2, checkpoint_every=2)
    out = str(tmp_path / "run")
    overrides = ["--set", "data.eval_share=0.1", "eval_every=2"]
    assert main(["--config", exp, "--out", out, *overrides, "steps=4"]) == 0
    first = json.load(open(os.path.join(out, "manifest.json")))["extra"]["eval"]
    assert main(["--config", exp, "--out", out, *overrides, "steps=6"]) == 0
    m = json.load(open(os.path.join(out, "manifest.json")))["extra"]["eval"]
    assert m["sha256"] == first["sha256"] and m["documents"] > 0 and m["batches"] <= 2
    rows = {r["step"]: r["eval_loss"] for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "eval_loss" in r}
    assert sorted(rows) == [2, 4, 6] and rows[6] < rows[2]
    assert m["last"]["step"] == 6 and m["last"]["eval_loss"] == rows[6]
    assert os.path.exists(os.path.join(out, "loss.png"))
    run_cli(["ppl", "--checkpoint", out, "--heldout", "--out", str(tmp_path / "ppl"), "--no-progress"])
    res = json.load(open(tmp_path / "ppl" / "results.json"))["heldout"]
    assert res["n"] == m["documents"] and res["tokens"] == m["tokens"]
    # float32 logits of a sharded (trainer) and a single-device (ppl) forward: ~1e-6 relative
    assert res["loss"] == pytest.approx(rows[6], rel=1e-5)


def test_trainer_eval_loss_equals_ppl_on_the_same_documents():
    """The trainer's evaluate() on its fixed batches (8-device mesh) is ppl_scores' loss on the documents it
    kept (one device, other packing), and the batches are a pure function of their inputs."""
    import jax

    from llama import model
    from llama.config import TINY
    from sharding.rules import MeshConfig, make_mesh, param_shardings

    cfg = TINY.replace(vocab_size=512)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    docs = [[int(t) for t in rng.integers(3, 512, int(n))] for n in rng.integers(5, 150, 40)]
    kw = dict(bos=1, seq_len=64, batch_size=8, max_batches=3)
    es = ev.make_eval_set(docs, **kw)
    again = ev.make_eval_set(docs, **kw)
    assert es.sha256 == again.sha256 and 0 < es.documents < len(docs) and len(es.batches) == 3
    assert es.tokens > 3 * 8 * 64 * 0.75  # windows of up to 64 tokens, best fit: the batches are nearly full
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, param_shardings(model.param_specs(cfg), mesh))
    got = ev.evaluate(sharded, es, cfg=cfg, mesh=mesh)
    scored = es.documents_scored(docs)
    assert 0 < len(scored[-1]) <= len(docs[es.documents - 1])
    metrics, _ = ev.ppl_scores(params, cfg, scored, ["x"] * len(scored), bos=1, context=64, stride=64, batch_size=16)
    assert metrics["tokens"] == es.tokens
    assert got["eval_loss"] == pytest.approx(metrics["loss"], rel=1e-5)  # float32 forwards, other layouts


def test_choice_on_an_8_device_mesh_equals_one_device(stories, tmp_path):
    orbax, _, _, paths, tok = stories
    common = ["choice", "--checkpoint", orbax, "--tokenizer", str(tok.path), "--task", paths["story_choice"],
              "--limit", "8", "--batch-size", "8", "--no-progress"]
    run_cli(common + ["--out", str(tmp_path / "one")])
    run_cli(common + ["--mesh", "data=2,fsdp=2,tensor=2", "--out", str(tmp_path / "mesh")])
    a, b = (read_jsonl(tmp_path / d / "samples_story_choice.jsonl") for d in ("one", "mesh"))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["loglikelihoods"], y["loglikelihoods"], atol=1e-5)  # sharded float32 sums
        assert x["is_greedy"] == y["is_greedy"] and x["pred"] == y["pred"]


def test_held_out_documents_never_reach_training(tmp_path):
    """make_dataset with holdout: one epoch of the training stream holds every other document and none of the
    held-out ones (those `trainer_eval_documents` returns)."""
    from input_pipeline import DataConfig, Source, make_dataset
    from input_pipeline.sources import hash_split, open_documents
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    path = tmp_path / "docs.txt"
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}: the cat number {i} sat." for i in range(60)))
    src = Source((str(path),), separator="<|endoftext|>")
    cfg = DataConfig(sources=(src,), holdout=0.25, shuffle=False, num_epochs=1, prefetch=0)
    stream = []
    with make_dataset(cfg, tok, seq_len=32, global_batch_size=4, seed=0, process_index=0, process_count=1) as it:
        for b in it:
            stream += [int(t) for t, s in zip(b["tokens"].ravel(), b["segment_ids"].ravel()) if s]
    docs, cur = [], None
    for t in stream:
        if t == tok.bos_id:
            cur = []
            docs.append(cur)
        else:
            cur.append(t)
    trained = {tuple(d[:-1]) for d in docs}  # without EOS
    held = hash_split(open_documents(src), 0.25, heldout=True)
    held_ids = {tuple(tok.encode(held[i])) for i in range(len(held))}
    all_ids = {tuple(tok.encode(open_documents(src)[i])) for i in range(60)}
    assert 0 < len(held_ids) < 30 and trained == all_ids - held_ids


def test_fewshot_contexts_are_seeded_solved_examples_of_other_rows():
    examples = [ev.Example(i, f"Question {i}?", ("yes", "no"), i % 2) for i in range(6)]
    a = ev.fewshot_contexts(examples, 2, seed=1234)
    assert a == ev.fewshot_contexts(examples, 2, seed=1234) != ev.fewshot_contexts(examples, 2, seed=1)
    for i, ctx in enumerate(a):
        parts = ctx.split("\n\n")
        assert len(parts) == 3 and parts[-1] == f"Question {i}?"
        for shot in parts[:2]:
            j = int(shot.split()[1].rstrip("?"))
            assert j != i and shot == f"Question {j}? {('yes', 'no')[j % 2]}"
    with pytest.raises(ev.EvalError, match="--num-fewshot 6: the task has only 6 examples"):
        ev.fewshot_contexts(examples, 6, seed=0)


def test_chat_needs_the_llama3_tokenizer():
    from llama.tokenizer import load_tokenizer

    sp = load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    with pytest.raises(ev.EvalError, match="--chat: the Llama 3.1 chat format needs the Llama 3 tokenizer"):
        ev.chat_prompt(sp, "Hi")
