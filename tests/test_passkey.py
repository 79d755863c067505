"""Passkey and needle-in-a-haystack evaluation: prompts of exactly the grid's length with the key where the depth
says, the scoring's indexing against an oracle, the same scores on a context-parallel mesh as on one device,
and the CLI's results.json, heatmap.png and manifest.json."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import require_shared
from llama import model, passkey
from llama.config import TINY
from llama.tokenizer import load_tokenizer
from sharding.mesh import MeshConfig, make_mesh

CFG = TINY.replace(vocab_size=512, attention_block_q=16, attention_block_k=16)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))


@pytest.mark.parametrize("task", passkey.TASKS)
def test_prompts_have_the_length_and_the_key_at_the_depth(tok, task):
    hay = passkey._words(passkey.default_haystack()[:20000]) if task == "needle" else None
    for depth in (0.0, 0.5, 1.0):
        s = passkey.make_sample(task, tok, 256, depth, np.random.default_rng(0), hay)
        assert len(s.tokens) == 256 and s.tokens[0] == tok.bos_id
        # filled up to the last whole sentence / word that fits (the longest unit here is < 16 tokens), then EOS
        assert 256 - 16 < s.end <= 256 and s.tokens[s.end:] == [tok.eos_id] * (256 - s.end)
        text = tok.decode(s.tokens[1:s.end])
        # one text encoded at once, as the trainer encodes a document: no piece starts with a second dummy prefix
        assert s.tokens[1:s.end] == passkey._enc(tok, text)
        assert text.endswith(f"is {s.key}")
        # the key sentence's character position within the filler / haystack (after the intro, before the question)
        lo = text.index("information there.") + len("information there.") if task == "passkey" else 0
        hi = text.rindex("What is the")
        line = (passkey.PASSKEY if task == "passkey" else passkey.NEEDLE).format(key=s.key).strip()
        if task == "passkey":  # whole filler sentences on both sides of the key, in the cycle's order ...
            filler = text[lo:hi].replace(" " + line, "")
            n = filler.count(".")
            assert filler == "".join(passkey.FILLER_SENTENCES[i % 5] for i in range(n)) + " "
            assert text[lo:text.index(line)].count(".") == round(depth * n)  # ... the key after round(depth n)
        else:  # whole words: depth counts words, so the character position is off by their varying lengths
            where = (text.index(line) - lo) / (hi - lo - len(line))
            assert abs(where - depth) < 0.1, (task, depth, where)
    with pytest.raises(passkey.PasskeyError, match="--lengths 16: too short for the passkey prompt"):
        passkey.make_sample("passkey", tok, 16, 0.5, np.random.default_rng(0))
    with pytest.raises(passkey.PasskeyError, match="--corpus: 3 words, too few for a 256-token needle"):
        passkey.make_sample("needle", tok, 256, 0.5, np.random.default_rng(0), ["a", " b", " c"])


def test_answer_ids_are_those_of_the_training_documents(tok, tmp_path):
    """The bug this guards: prompt pieces encoded one by one gave " 71432" as "▁", "▁", "7", ... with
    SentencePiece's dummy prefix, ids never seen in training, where the key follows "is" inside one text."""
    s = passkey.make_sample("passkey", tok, 256, 0.5, np.random.default_rng(3))
    path = passkey.training_text(str(tmp_path / "docs.txt"), docs=20, max_words=200, seed=0)
    docs = open(path).read().split("\n<|endoftext|>\n")
    assert len(docs) == 20 and all(d.startswith(passkey.INTRO) and d.endswith(".") for d in docs)
    doc = docs[0]
    key = doc[:-1].rsplit(" ", 1)[1]
    ids = passkey._enc(tok, doc)
    question = passkey._enc(tok, passkey.PASSKEY_QUESTION.strip())[1:]  # without its leading word's dummy prefix
    answer_in_training = ids[-1 - s.n_answer:-1]
    assert tok.decode(answer_in_training).strip() == key
    assert [len(t) for t in (answer_in_training, s.tokens[s.end - s.n_answer:s.end])] == [s.n_answer] * 2
    # the answer's ids differ only by the key's digits: the same leading-space piece, one id per digit
    assert answer_in_training[0] == s.tokens[s.end - s.n_answer]
    assert ids[-1 - s.n_answer - len(question):-1 - s.n_answer] == s.tokens[s.end - s.n_answer - len(question):
                                                                            s.end - s.n_answer]


def test_scoring_against_an_oracle(tok, monkeypatch):
    samples = [passkey.make_sample("passkey", tok, 256, 0.5, np.random.default_rng(i)) for i in range(3)]

    def oracle(params, tokens, targets, *, cfg):  # predicts every next token right but row 1's last answer token
        nxt = np.roll(np.asarray(tokens), -1, axis=1)
        nxt[1, samples[1].end - 2] += 1
        nxt[:, -1] += 1  # wrong predictions in the EOS padding after the answer do not count
        return nxt, np.full(nxt.shape, -0.5, np.float32)

    monkeypatch.setattr(passkey, "_predict", oracle)
    acc, nll = passkey.score(None, CFG, samples)
    assert acc == pytest.approx(2 / 3) and nll == pytest.approx(0.5)


def test_scores_on_a_context_parallel_mesh_equal_one_device(tok):
    params = model.init_params(CFG, jax.random.key(0))
    samples = [passkey.make_sample("passkey", tok, 256, d, np.random.default_rng(1)) for d in (0.2, 0.8)]
    with jax.default_matmul_precision("highest"):
        one = passkey.score(params, CFG, samples)
        cp = passkey.score(params, CFG, samples, make_mesh(MeshConfig(fsdp=2, context=4)))
    assert cp[0] == one[0] and cp[1] == pytest.approx(one[1], rel=1e-5)  # float32 reduction order only


def test_cli_writes_results_heatmap_and_manifest(tmp_path, tok):
    from llama.checkpoint import save_model

    ckpt = str(tmp_path / "model")
    save_model(ckpt, CFG, model.init_params(CFG, jax.random.key(0)))
    shutil.copy(tok.path, os.path.join(ckpt, "tokenizer.model"))
    out = str(tmp_path / "needle")
    assert passkey.main(["needle", "--checkpoint", ckpt, "--lengths", "128,512", "--depths", "0,1", "--samples", "2",
                         "--out", out]) == 0
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["lengths"] == [128, 512] and r["skipped_lengths"] == [512]  # TINY's max_seq_len is 256
    assert [row[1] for row in r["accuracy"]] == [None, None] and all(0 <= row[0] <= 1 for row in r["accuracy"])
    assert "exact match" in r["scoring"]
    assert os.path.getsize(os.path.join(out, "heatmap.png")) > 1000
    assert json.load(open(os.path.join(out, "manifest.json")))["extra"]["task"] == "needle"
    assert passkey.main(["passkey", "--checkpoint", ckpt, "--depths", "2"]) == 2  # a depth outside [0, 1]
    from llama import eval as llama_eval  # the same grids under the evaluation command

    assert llama_eval.main(["needle", "--checkpoint", ckpt, "--depths", "2"]) == 2


@pytest.mark.parametrize("length", [256, 512])
def test_padded_training_documents_fill_one_row_each(tok, tmp_path, length):
    """The bug this guards: documents shorter or longer than a row were packed end to end and cut at row ends
    (input_pipeline/packing.py), so a key and its question mostly fell into different rows (the document mask
    keeps them apart) and the model could only guess. Padded, BOS + document + EOS is exactly one row, so the
    rows are the documents, each holding its key, question and answer, the answer's targets weighted x 20 and
    the padding's 0 (the segments format); the key sits at every distance from the question that fits."""
    import input_pipeline

    path = passkey.training_corpus(str(tmp_path / "docs.jsonl"), docs=40, tok=tok, length=length, seed=0)
    rows = [json.loads(line)["segments"] for line in open(path)]
    assert len(rows) == 40
    n_filler, distance = [], []
    for segs in rows:
        doc = "".join(x["text"] for x in segs)
        assert 2 + len(passkey._enc(tok, doc)) == length
        key = segs[1]["text"].strip()
        assert [x["weight"] for x in segs] == [1, passkey.ANSWER_WEIGHT, 1] + [0] * (len(segs) == 4)
        assert segs[1]["text"] == f" {key}" and segs[2]["text"] == "." and set(doc[len(doc.rstrip("#")):]) <= {"#"}
        text = doc.rstrip(passkey.PAD)
        assert text.startswith(passkey.INTRO) and text.endswith(passkey.PASSKEY_QUESTION + f" {key}.")
        assert passkey.PASSKEY.format(key=key) in text
        n_filler.append(text.count(".") - 7)  # the intro and the key sentence have 3 full stops each, the answer 1
        after_key = text[text.index(passkey.PASSKEY.format(key=key)) + len(passkey.PASSKEY.format(key=key)):]
        distance.append(after_key.count(".") - 1)  # filler sentences between the key sentence and the question
        # the prompt (everything before " KEY") is encoded as the evaluation encodes it
        assert passkey._enc(tok, doc)[:len(passkey._enc(tok, segs[0]["text"]))] == passkey._enc(tok, segs[0]["text"])
    # distance uniform in [0, top], n uniform in [distance, top]: short and nearly full documents both occur
    full = passkey._largest_fit(lambda n: 2 + len(passkey._enc(tok, passkey.passkey_text("99999", n, 0) + " 99999.")),
                                length, length, "passkey")
    assert min(n_filler) <= full // 2 and max(n_filler) >= 3 * full // 4 and max(n_filler) <= full
    # ... and every key-to-question distance up to the row is as common as any other: mean distance / top is 1/2
    # (1/4 with the earlier draw of n, then a uniform depth; the sd of the mean of 40 is ~0.05)
    assert all(0 <= d <= n for d, n in zip(distance, n_filler))
    assert np.mean(distance) / full > 0.38 and max(distance) >= 3 * full // 4
    # the trainer's rows (data.format=segments): one document each, the answer's five digits and its leading
    # space weighted x 20, nothing after the answer's full stop trained on
    data = input_pipeline.DataConfig.from_paths(path, format="segments", prefetch=0, shuffle=False, num_epochs=1)
    with input_pipeline.make_dataset(data, tok, seq_len=length, global_batch_size=4, seed=0, process_index=0,
                                     process_count=1) as it:
        b = next(it)
    assert (b["segment_ids"] == 1).all() and ((b["loss_mask"] == passkey.ANSWER_WEIGHT).sum(1) == 6).all()
    for r in range(4):
        answer = b["targets"][r][b["loss_mask"][r] == passkey.ANSWER_WEIGHT]
        assert tok.decode([int(i) for i in answer]).strip() == rows[r][1]["text"].strip()


def test_training_corpus_options(tok, tmp_path):
    """--max-distance bounds the key-to-question distance (a curriculum's first phase); --answer-weight sets the
    answer's weight; a missing --length is an error naming it."""
    path = passkey.training_corpus(str(tmp_path / "d.jsonl"), docs=30, tok=tok, length=256, max_distance=3,
                                   answer_weight=7, seed=1)
    rows = [json.loads(line)["segments"] for line in open(path)]
    key = [segs[1]["text"].strip() for segs in rows]
    after = [segs[0]["text"].split(passkey.PASSKEY.format(key=k))[1] for segs, k in zip(rows, key)]
    distance = [a.count(".") for a in after]  # filler sentences between the key sentence and the question ("?")
    assert max(distance) == 3 and min(distance) == 0 and {segs[1]["weight"] for segs in rows} == {7}
    with pytest.raises(passkey.PasskeyError, match="--length"):
        passkey.training_corpus(str(tmp_path / "x.jsonl"), docs=1, tok=tok, length=None)
    no_length = ["corpus", "--out", str(tmp_path / "y.jsonl"), "--tokenizer", str(tok.path), "--docs", "2"]
    assert passkey.main(no_length) == 2


def test_cpu_passkey_stages_hold_whole_documents():
    """The CPU experiment's STAGES table is the schedule the trainer runs (shapes and boundaries), each stage's
    rows a whole number of its documents (stage 0 packs two 128-token documents per 256-token row)."""
    from experiments import cpu_passkey as exp
    from llama.train import stage_schedule

    starts = [0] + [end for *_, end in exp.STAGES[:-1]]
    assert stage_schedule(exp.CONFIG) == [(s, T, B) for s, (T, B, _, _) in zip(starts, exp.STAGES)]
    assert exp.CONFIG.steps == exp.STAGES[-1][3]
    assert [T // doc for T, _, doc, _ in exp.STAGES] == [2, 1, 1, 1]
    assert all(T % doc == 0 for T, _, doc, _ in exp.STAGES)
