"""SFT and DPO: closed-form DPO values, packing, parity with transformers (SFT) and TRL (DPO) on a tiny float32
Llama exported by this project's orbax-to-hf converter, and the trainer (lr = 0 gives ln 2; SFT resume).

Tolerance 1e-5: float32 forward passes of a 2-layer model in two frameworks agree to ~1e-6 per logit
(tests/test_convert.py uses the same bound); summed log-probs over ~30 tokens stay within 1e-5 absolute.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline.chat import ChatFormat, encode_chat, encode_preference, pack_documents
from llama import loss as llama_loss
from llama import model
from llama.config import TINY
from llama.train import TrainConfig, DpoConfig, DataConfig, compute_grads, objective_metrics
from tests.conftest import require_shared

CFG = TINY.replace(vocab_size=512, max_seq_len=1024, param_dtype="float32", compute_dtype="float32")
TOL = 1e-5


@pytest.fixture(scope="module")
def sp():
    from llama.tokenizer import load_tokenizer

    return load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))


def random_params(cfg=CFG, seed=3):
    from test_convert import random_params as rp

    return jax.tree.map(jnp.asarray, rp(cfg, seed))


CHATS = [[{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "there was a cat."}],
         [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A dog"},
          {"role": "assistant", "content": "The dog ran."}, {"role": "user", "content": "Then?"},
          {"role": "assistant", "content": "It slept in the sun."}]]
PAIRS = [([{"role": "user", "content": "Who ran?"}], "The dog ran.", "A cat sat."),
         ([{"role": "user", "content": "Where did it sleep?"}], "In the sun.", "Under the big tree, maybe."),
         ([{"role": "user", "content": "Colour?"}], "Red", "Blue and green")]


def as_msgs(x):
    return [{"role": "assistant", "content": x}]


def batch_of(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------- DPO closed form
def test_dpo_loss_closed_form():
    # policy = reference: every log-ratio is 0, the loss is -log sigmoid(0) = ln 2 whatever beta
    lp = jnp.asarray([-3.0, -10.0])
    loss, rc, rr = llama_loss.dpo_loss(lp, lp - 2, lp, lp - 2, beta=0.1)
    np.testing.assert_allclose(loss, [math.log(2)] * 2, rtol=1e-7)
    assert not np.any(rc) and not np.any(rr)
    # by hand: beta 0.5, chosen -1 vs ref -2 (+1), rejected -3 vs ref -2 (-1): z = 0.5 * 2 = 1
    loss, rc, rr = llama_loss.dpo_loss(jnp.float32(-1), jnp.float32(-3), jnp.float32(-2), jnp.float32(-2), beta=0.5)
    np.testing.assert_allclose(loss, math.log1p(math.exp(-1)), rtol=1e-6)
    np.testing.assert_allclose((rc, rr), (0.5, -0.5), rtol=1e-7)
    # conservative DPO, eps 0.25: 0.75 log(1 + e^-1) + 0.25 log(1 + e^1)
    loss, _, _ = llama_loss.dpo_loss(jnp.float32(-1), jnp.float32(-3), jnp.float32(-2), jnp.float32(-2), beta=0.5,
                                     label_smoothing=0.25)
    np.testing.assert_allclose(loss, 0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e), rtol=1e-6)


def test_dpo_loss_torchtunes_published_case():
    """torchtune's DPO unit test, transcribed: pytorch/torchtune tests/torchtune/rlhf/loss/test_dpo_loss.py
    (commit 20fe62216f89923b453848db5d5c5cfc7244ca14), `TestDPOLosses.test_dpo_loss`: beta 0.1, no label
    smoothing; policy/reference log-ratio differences [0, 10, 20] -> scaled logits [0, 1, 2], losses
    -log(1 / (1 + exp(-[0, 1, 2]))), checked there at atol 1e-4, rtol 1e-5 (kept here)."""
    pc, pr = jnp.array([-0.5, -10.0, -1.0]), jnp.array([-0.1, -30.0, -21.0])
    rc, rr = jnp.array([-0.5, -10.1, -0.1]), jnp.array([-0.1, -20.1, -0.1])
    losses, _, _ = llama_loss.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    expected = -np.log(1 / (1 + np.exp([0.0, -1.0, -2.0])))
    np.testing.assert_allclose(losses, expected, atol=1e-4, rtol=1e-5)


def test_dpo_loss_tunix_published_case():
    """Tunix's DPO loss unit test, transcribed: google/tunix tests/sft/dpo/dpo_trainer_test.py (commit
    35bed91da7b9c2faa981c5f6e5c8c80a7441354d), `test_dpo_loss_fn`: np.random.seed(0); per-token policy log-probs
    N(0, 5) of shape [8, 4] (rows 0-3 chosen, 4-7 rejected, completion mask all ones), reference sequence
    log-probs N(0, 5) [8, 4] summed over tokens; beta 0.1: mean loss 0.753059 with label_smoothing 0 and
    0.925447 with 0.3 (conservative DPO), at atol 1e-5 as there."""
    np.random.seed(0)
    per_token = np.random.normal(0, 5, size=(8, 4))
    ref = np.random.normal(0, 5, size=(8, 4)).sum(axis=-1)
    pol = per_token.sum(axis=-1)
    for ls, want in ((0.0, 0.753059), (0.3, 0.925447)):
        losses, _, _ = llama_loss.dpo_loss(jnp.asarray(pol[:4], jnp.float32), jnp.asarray(pol[4:], jnp.float32),
                                           jnp.asarray(ref[:4], jnp.float32), jnp.asarray(ref[4:], jnp.float32),
                                           beta=0.1, label_smoothing=ls)
        np.testing.assert_allclose(float(jnp.mean(losses)), want, atol=1e-5)


def test_pair_sums_by_hand():
    x = jnp.arange(1.0, 9.0).reshape(1, 8)
    seg = jnp.asarray([[1, 1, 2, 3, 3, 4, 0, 0]])
    np.testing.assert_array_equal(llama_loss.pair_sums(x, seg)[0], [[3, 3], [9, 6], [0, 0], [0, 0]])


# ---------------------------------------------------------------------------------------------- SFT
def _nll_sum(params, row_batch, cfg=CFG):
    h = model.hidden_states(params, jnp.asarray(row_batch["tokens"]), jnp.asarray(row_batch["positions"]),
                            jnp.asarray(row_batch["segment_ids"]), cfg=cfg)
    return llama_loss.next_token_loss(params, h, jnp.asarray(row_batch["targets"]),
                                      jnp.asarray(row_batch["loss_mask"]), cfg=cfg)[1][0]


def test_sft_packed_row_loss_is_the_sum_of_its_documents(sp):
    params = random_params()
    docs = [encode_chat(ChatFormat(sp), m) for m in CHATS]
    T = sum(d.shape[1] for d in docs) + 3
    packed = _nll_sum(params, batch_of([pack_documents(docs, T)]))
    alone = sum(_nll_sum(params, batch_of([pack_documents([d], T)])) for d in docs)
    np.testing.assert_allclose(packed, alone, rtol=TOL)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """(params, HF model dir) of a random tiny float32 Llama exported with `llama.convert orbax-to-hf`."""
    from llama.checkpoint import save_model
    from llama.convert import convert

    d = tmp_path_factory.mktemp("export")
    params = random_params()
    save_model(str(d / "orbax"), CFG, params)
    convert("orbax-to-hf", str(d / "orbax"), str(d / "hf"), progress=False)
    return params, str(d / "hf")


def hf_token_logps(m, ids: np.ndarray) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for one unpadded sequence, from transformers' float32 logits."""
    import torch

    with torch.no_grad():
        logits = m(torch.tensor(ids[None].astype(np.int64))).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:, None].astype(np.int64)))[:, 0].numpy()


def test_sft_masked_loss_equals_transformers_by_hand(sp, hf_export):
    from test_convert import load_hf

    params, hf_dir = hf_export
    m = load_hf(hf_dir)
    docs = [encode_chat(ChatFormat(sp), c) for c in CHATS]
    T = sum(d.shape[1] for d in docs)
    batch = batch_of([pack_documents(docs, T)])
    # by hand: each conversation alone through transformers, NLL of the weighted (assistant) targets
    nll = sum(-(hf_token_logps(m, d[0]) * d[1][1:]).sum() for d in docs)
    count = sum(d[1][1:].sum() for d in docs)
    cfg = TrainConfig(model=CFG, batch_size=1, seq_len=T, loss_chunk=0)
    _, sums, norms = compute_grads(params, batch, cfg=cfg)
    assert norms["tokens"] == count
    np.testing.assert_allclose(objective_metrics(sums, norms, cfg)["loss"], nll / count, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- DPO
def pair_docs(sp, mask_special):
    return [encode_preference(ChatFormat(sp), p, as_msgs(c), as_msgs(r), mask_special=mask_special)
            for p, c, r in PAIRS]


def our_dpo(params, ref, docs, d: DpoConfig):
    """Our metrics, all pairs packed into one row (the trainer's layout)."""
    T = sum(x.shape[1] for x in docs)
    cfg = TrainConfig(model=CFG, batch_size=1, seq_len=T, objective="dpo", dpo=d, loss_chunk=0,
                      data=DataConfig(paths="x.jsonl", format="preference", tokenizer="x"))
    batch = batch_of([pack_documents(docs, T)])
    h = model.hidden_states(params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                            jnp.asarray(batch["segment_ids"]), cfg=CFG)
    lp = llama_loss.token_logps(params, h, jnp.asarray(batch["targets"]), cfg=CFG) * batch["loss_mask"]
    per_pair = np.asarray(llama_loss.pair_sums(lp, jnp.asarray(batch["segment_ids"])))[0, :len(docs)]
    _, sums, norms = compute_grads(params, batch, cfg=cfg, ref_params=ref)
    return per_pair, {k: float(v) for k, v in objective_metrics(sums, norms, cfg).items()}


def trl_inputs(docs):
    """TRL's concatenated batch: [chosen rows; rejected rows], right-padded (so positions are 0..n-1 as ours;
    HF's default position ids ignore a left padding), completion_mask = our weights with mask_special=False."""
    import torch

    seqs = [d[:, d[2] == part] for part in (1, 2) for d in docs]
    n = max(s.shape[1] for s in seqs)
    ids = np.zeros((len(seqs), n), np.int64)
    att, comp = np.zeros_like(ids), np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :s.shape[1]], att[i, :s.shape[1]], comp[i, :s.shape[1]] = s[0], 1, s[1]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att), "completion_mask": torch.tensor(comp)}


@pytest.mark.slow
def test_dpo_matches_trl_and_the_papers_masking_by_hand(sp, hf_export, tmp_path):
    """TRL's DPOTrainer (loss_type ["sigmoid", "sft"], weights [1, 0.2], beta 0.1) on the same token rows: its
    per-row log-probs (compute_ref_log_probs), loss and reward metrics equal ours with mask_special=False (TRL's
    completion mask keeps <|eot_id|>). mask_special=True (the paper's) is checked against transformers by hand."""
    import datasets
    import tokenizers
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer
    from test_convert import load_hf

    params, hf_dir = hf_export
    ref = jax.tree.map(lambda x: x * 1.05 + 0.01, params)  # another policy as the reference
    from llama.checkpoint import save_model
    from llama.convert import convert

    save_model(str(tmp_path / "ref"), CFG, ref)
    convert("orbax-to-hf", str(tmp_path / "ref"), str(tmp_path / "ref_hf"), progress=False)
    # TRL needs a tokenizer and a dataset to start; the rows it computes on are ours (trl_inputs).
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="<unk>")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
                     beta=0.1, report_to="none", use_cpu=True, bf16=False, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=load_hf(hf_dir), ref_model=load_hf(str(tmp_path / "ref_hf")), args=args,
                         processing_class=hf_tok,
                         train_dataset=datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["a"],
                                                                   "rejected": ["a a"]}))
    docs = pair_docs(sp, mask_special=False)
    inputs = trl_inputs(docs)
    with torch.no_grad():
        pc, pr = trainer.compute_ref_log_probs(trainer.model, inputs)  # TRL's per-row sums, policy
        rc, rr = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
        trl_loss = float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))
    mode = "train" if trainer.model.training else "eval"  # TRL's own choice of where to log
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    ours, m = our_dpo(params, ref, docs, DpoConfig(beta=0.1, nll_coef=0.2, mask_special=False))
    ours_ref, _ = our_dpo(ref, ref, docs, DpoConfig(mask_special=False))
    np.testing.assert_allclose(ours, np.stack([pc.numpy(), pr.numpy()], -1), atol=TOL, rtol=0)
    np.testing.assert_allclose(ours_ref, np.stack([rc.numpy(), rr.numpy()], -1), atol=TOL, rtol=0)
    np.testing.assert_allclose(m["loss"], trl_loss, atol=TOL, rtol=0)
    for ours_k, trl_k in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                          ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        np.testing.assert_allclose(m[ours_k], trl_metrics[trl_k], atol=TOL, rtol=0)
    assert abs(m["dpo_loss"] - math.log(2)) > 1e-3  # the reference differs: a non-trivial case

    # The paper's masking (mask_special=True): completion content only, by hand from transformers' logits.
    docs = pair_docs(sp, mask_special=True)
    pol_m, ref_m = load_hf(hf_dir), load_hf(str(tmp_path / "ref_hf"))

    def sums(m_, d):
        return [float((hf_token_logps(m_, d[0, d[2] == k]) * d[1, d[2] == k][1:]).sum()) for k in (1, 2)]

    pol, refs = np.asarray([sums(pol_m, d) for d in docs]), np.asarray([sums(ref_m, d) for d in docs])
    z = 0.1 * ((pol[:, 0] - refs[:, 0]) - (pol[:, 1] - refs[:, 1]))
    chosen_tokens = sum(int(d[1, d[2] == 1].sum()) for d in docs)
    want = np.mean(np.log1p(np.exp(-z))) + 0.2 * -pol[:, 0].sum() / chosen_tokens
    ours, m = our_dpo(params, ref, docs, DpoConfig(beta=0.1, nll_coef=0.2, mask_special=True))
    np.testing.assert_allclose(ours, pol, atol=TOL, rtol=0)
    np.testing.assert_allclose(m["loss"], want, atol=TOL, rtol=0)
    for a, b in zip(pair_docs(sp, False), docs):  # the paper's mask drops exactly each completion's end of turn
        dropped = a[0][(a[1] == 1) & (b[1] == 0)]
        assert list(dropped) == [sp.eos_id, sp.eos_id]


# ------------------------------------------------------------------------------------------ the trainer
def write_rows(tmp_path, kind, n=16):
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "tree", "ran", "sat", "big", "red"]
    rows = []
    for i in range(n):
        q, a, b = (" ".join(rng.choice(words, k)) for k in (3, 4, 5))
        if kind == "chat":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            rows.append({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": b})
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_experiment(tmp_path, objective, data_path, data_fields=None, **fields):
    tok = require_shared("assets", "llama2c_stories260K", "tok512.model")
    fmt = {"sft": "chat", "dpo": "preference"}[objective]
    path = tmp_path / f"exp_{objective}.py"
    path.write_text(f'''"""Test experiment."""
from llama.config import TINY
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig
CONFIG = TrainConfig(model=TINY.replace(vocab_size=512, max_seq_len=1024), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
    optimizer=OptimizerConfig(peak_lr=1e-3, warmup_steps=2, decay_steps=20), objective={objective!r},
    data=DataConfig(paths={data_path!r}, format={fmt!r}, tokenizer={str(tok)!r}, **{data_fields or {}!r}),
    **{dict(batch_size=4, seq_len=256, steps=4, log_every=1, checkpoint_every=2, sample_tokens=0) | fields!r})
''')
    return str(path)


def metrics_by_step(out):
    from llama.metrics import read_jsonl

    return {r["step"]: r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r}


@pytest.mark.slow
def test_dpo_step_one_logs_the_starting_loss_ln2_and_a_reference_changes_it(tmp_path):
    """Step 1's logged loss is the starting parameters' (the first update has lr 0 under the warmup): with the
    default reference (= the starting policy) every DPO term is ln 2; the logged loss adds 0.2 x the chosen NLL.
    A `dpo.reference` of other weights moves it off ln 2. init_from a model checkpoint starts from its weights."""
    from llama.checkpoint import save_model
    from llama.train import main

    exp = write_experiment(tmp_path, "dpo", write_rows(tmp_path, "preference"), steps=2)
    out = str(tmp_path / "run")
    assert main(["--config", exp, "--out", out]) == 0
    m = metrics_by_step(out)
    for step in (1, 2):  # the update after step 1 has lr 0 (linear warmup from 0)
        assert m[step]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m[step]["loss"] == pytest.approx(math.log(2) + 0.2 * m[step]["nll"], abs=1e-6)
        assert m[step]["reward_margin"] == pytest.approx(0, abs=1e-6) and m[step]["pairs"] >= 4
    assert m[1]["lr"] == 0
    # init_from a model checkpoint, reference = other weights
    cfg = TINY.replace(vocab_size=512, max_seq_len=1024)
    save_model(str(tmp_path / "start"), cfg, random_params(cfg, 1))
    save_model(str(tmp_path / "other"), cfg, random_params(cfg, 2))
    out2 = str(tmp_path / "run2")
    assert main(["--config", exp, "--out", out2, "--set", f"init_from={tmp_path / 'start'}", "steps=1"]) == 0
    assert metrics_by_step(out2)[1]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    out3 = str(tmp_path / "run3")
    assert main(["--config", exp, "--out", out3, "--set", f"init_from={tmp_path / 'start'}",
                 f"dpo.reference={tmp_path / 'other'}", "steps=1"]) == 0
    assert abs(metrics_by_step(out3)[1]["dpo_loss"] - math.log(2)) > 1e-3


@pytest.mark.slow
def test_sft_exact_resume(tmp_path):
    """4 SFT steps straight == 2 steps, a restart, 2 more: the same losses, bit for bit."""
    from llama.train import main

    exp = write_experiment(tmp_path, "sft", write_rows(tmp_path, "chat", 40))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--config", exp, "--out", a]) == 0
    assert main(["--config", exp, "--out", b, "--set", "steps=2"]) == 0
    assert main(["--config", exp, "--out", b]) == 0
    la = {s: r["loss"] for s, r in metrics_by_step(a).items()}
    lb = {s: r["loss"] for s, r in metrics_by_step(b).items()}
    assert sorted(la) == [1, 2, 3, 4] and la == lb and la[4] < la[1]


# ------------------------------------------------------------------------------ held-out eval: sft and dpo
ONE_PIECE = "the he she was and saw mom day big".split()  # one tok512 piece each: every row has the same length


def write_even_rows(path, kind, n, seed=0):
    """n rows of one token length (74 tokens for chat, 148 for a preference pair, checked by the test), so a
    batch holds a fixed number of them whatever the shuffle: 4 rows x 3 conversations (sft) or x 1 pair (dpo)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        q, a, b = (" ".join(rng.choice(ONE_PIECE, k)) for k in (3, 4, 4))
        while b == a:
            b = " ".join(rng.choice(ONE_PIECE, 4))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                    if kind == "chat" else {"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def src_docs(sp, path):
    return [encode_chat(ChatFormat(sp), json.loads(line)["messages"]) for line in open(path)]


def run_metrics(out):
    from llama.metrics import read_jsonl

    return read_jsonl(os.path.join(out, "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_eval_at_lr0_equals_the_training_loss_on_the_same_rows(objective, sp, tmp_path):
    """The held-out eval is the training objective: eval data = the training file, one epoch = exactly one batch
    (rows of one length), 1 step whose update has lr 0 (warmup from 0), so the eval at step 1 sees the starting
    params and the same rows as step 1's logged training metrics. SFT: eval_loss = the masked NLL; DPO with the
    default reference: eval_dpo_loss = ln 2 and reward accuracy 0 (chosen reward > rejected reward, strictly, as
    TRL counts it: every reward is 0). Tolerance: float32, the same rows summed in another packing order (1e-5)."""
    from llama.train import main

    fmt, per_batch = {"sft": ("chat", 12), "dpo": ("preference", 4)}[objective]
    data = write_even_rows(tmp_path / f"{objective}.jsonl", fmt, per_batch)
    docs = [encode_chat(ChatFormat(sp), r["messages"]) if fmt == "chat" else
            encode_preference(ChatFormat(sp), r["prompt"], as_msgs(r["chosen"]), as_msgs(r["rejected"]),
                              mask_special=True) for r in map(json.loads, open(data))]
    assert {d.shape[1] for d in docs} == {74 if fmt == "chat" else 148}
    exp = write_experiment(tmp_path, objective, data, {"eval_paths": data}, steps=1, eval_every=1)
    out = str(tmp_path / "run")
    assert main(["--config", exp, "--out", out]) == 0
    rows = run_metrics(out)
    train = next(r for r in rows if "loss" in r)
    ev = next(r for r in rows if "eval_loss" in r)
    assert train["step"] == ev["step"] == 1 and train["lr"] == 0
    assert ev["eval_loss"] == pytest.approx(train["loss"], rel=1e-5)
    if objective == "sft":
        assert ev["eval_ppl"] == pytest.approx(math.exp(train["loss"]), rel=1e-5)
    else:
        assert ev["eval_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert ev["eval_reward_accuracy"] == 0.0 and ev["eval_pairs"] == per_batch
        assert ev["eval_reward_margin"] == pytest.approx(0, abs=1e-6)
        for k in ("nll", "rewards_chosen", "rewards_rejected"):
            assert ev[f"eval_{k}"] == pytest.approx(train[k], rel=1e-5, abs=1e-7)
    from llama.manifest import read_manifest

    assert read_manifest(out)["extra"]["eval"]["documents"] == per_batch


def test_dpo_eval_reward_accuracy_against_a_hand_computation(sp):
    """evaluate_objective on a policy != reference: reward accuracy is the share of pairs whose chosen reward
    (beta x the summed log-ratio) is above the rejected one, computed here by hand from the model's log-probs;
    the loss is the mean -log sigmoid of the reward difference plus 0.2 x the chosen NLL per token (1e-5)."""
    from input_pipeline.chat import eval_rows
    from input_pipeline.packing import empty_rows
    from llama.eval import EvalSet
    from llama.train import TrainState, eval_sums, evaluate_objective
    from sharding.rules import MeshConfig, make_mesh

    tcfg = TrainConfig(model=CFG, objective="dpo", data=DataConfig(paths="x", format="preference"), batch_size=4,
                       seq_len=256, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    fmt = ChatFormat(sp)
    docs = [encode_preference(fmt, p, as_msgs(c), as_msgs(r), mask_special=True) for p, c, r in PAIRS * 3]
    rows, n = eval_rows(docs, 256, 16)
    pad = empty_rows(-len(rows["tokens"]) % 4, 256)
    rows = {k: np.concatenate([v, pad[k]]) for k, v in rows.items()}
    batches = tuple({k: v[i:i + 4] for k, v in rows.items()} for i in range(0, len(rows["tokens"]), 4))
    assert n == len(docs) and len(batches) >= 2  # the sums of several batches
    es = EvalSet(batches, n, 0, 0, "")
    pol, ref = random_params(seed=3), random_params(seed=4)
    state = TrainState(jnp.int32(0), pol, None, None, ref)
    mesh = make_mesh(tcfg.mesh)
    got = evaluate_objective(state, es, cfg=tcfg, mesh=mesh, sums_fn=jax.jit(functools.partial(eval_sums, cfg=tcfg)))

    def sums(params):
        b = {k: jnp.asarray(v) for k, v in rows.items()}
        h = model.hidden_states(params, b["tokens"], b["positions"], b["segment_ids"], cfg=CFG)
        lp = llama_loss.token_logps(params, h, b["targets"], cfg=CFG) * b["loss_mask"]
        return np.asarray(llama_loss.pair_sums(lp, b["segment_ids"]))  # [rows, P, 2]

    valid = np.arange(sums(pol).shape[1])[None, :] < rows["segment_ids"].max(axis=1)[:, None] // 2
    p, r = sums(pol)[valid], sums(ref)[valid]  # [pairs, 2]
    rc, rr = 0.1 * (p[:, 0] - r[:, 0]), 0.1 * (p[:, 1] - r[:, 1])
    chosen_tokens = sum(int(d[1, d[2] == 1].sum()) for d in docs)
    assert 0 < (rc > rr).mean() < 1  # a case where the count matters
    assert got["eval_pairs"] == len(docs)  # 3 / 9 correct; the metric is a float32 quotient
    assert got["eval_reward_accuracy"] == pytest.approx((rc > rr).mean(), abs=1e-7)
    np.testing.assert_allclose(got["eval_dpo_loss"], np.mean(np.log1p(np.exp(-(rc - rr)))), rtol=TOL)
    np.testing.assert_allclose(got["eval_loss"], got["eval_dpo_loss"] - 0.2 * p[:, 0].sum() / chosen_tokens,
                               rtol=TOL)
    np.testing.assert_allclose([got["eval_rewards_chosen"], got["eval_rewards_rejected"], got["eval_reward_margin"]],
                               [rc.mean(), rr.mean(), (rc - rr).mean()], atol=TOL)


def test_eval_share_holds_out_rows_never_trained_and_a_bad_eval_file_names_its_line(sp, tmp_path):
    """data.eval_share: the eval rows are exactly the documents the training stream leaves out (hash_split), in
    file order, packed whole; a bad row in data.eval_paths stops the run before training with a DataError naming
    file:line; a missing eval file is named as data.eval_paths."""
    import input_pipeline
    from input_pipeline.sources import DataError
    from llama.train import data_source, main, objective_eval_set

    data = write_even_rows(tmp_path / "chat.jsonl", "chat", 40)
    cfg = TrainConfig(model=CFG, objective="sft", data=DataConfig(paths=data, format="chat", eval_share=0.25),
                      batch_size=4, seq_len=256, eval_every=1, eval_batches=8)
    src = data_source(cfg, str(tmp_path))
    es = objective_eval_set(cfg, src, sp)
    it = input_pipeline.make_dataset(input_pipeline.DataConfig(sources=(src,), holdout=0.25, num_epochs=1), sp,
                                     seq_len=256, global_batch_size=4, seed=0)

    def conversations(batches):  # the token ids of each segment of each row
        return [tuple(b["tokens"][i][b["segment_ids"][i] == s]) for b in batches for i in range(len(b["tokens"]))
                for s in range(1, b["segment_ids"][i].max() + 1)]

    held, seen = conversations(es.batches), conversations(it)
    assert 0 < es.documents == len(held) < 40 and len(held) + len(seen) == 40 and not set(held) & set(seen)
    assert held == sorted(held, key=[tuple(d[0]) for d in src_docs(sp, data)].index)  # file order
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data).readlines()[0] + open(data).readlines()[1] + '{"messages": [{"role": "robot", '
                   '"content": "hi"}]}\n')
    exp = write_experiment(tmp_path, "sft", data, {"eval_paths": str(bad)}, steps=1, eval_every=1)
    with pytest.raises(DataError, match=f"{bad}:3: .*unknown role 'robot'"):
        main(["--config", exp, "--out", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")
    with pytest.raises(DataError, match="data.eval_paths: .*nothere.jsonl"):
        main(["--config", exp, "--out", str(tmp_path / "run2"), "--set", f"data.eval_paths={tmp_path}/nothere.jsonl"])


def test_objective_config_errors():
    from llama.config import ConfigError
    from llama.train import apply_overrides

    # the example: fields that must change together, set in one --set
    c = apply_overrides(TrainConfig(model=CFG), ["objective=dpo", "dpo.beta=0.1", "data.format=preference",
                                                 "data.paths=x.jsonl"])
    assert (c.objective, c.dpo.beta, c.data.format) == ("dpo", 0.1, "preference")
    base = TrainConfig(model=CFG, data=DataConfig(paths="x.jsonl", format="preference"), objective="dpo")
    cfg = apply_overrides(base, ["dpo.beta=0.5", "dpo.mask_special=false", "init_from=/some/dir"])
    assert (cfg.dpo.beta, cfg.dpo.mask_special, cfg.init_from) == (0.5, False, "/some/dir")
    with pytest.raises(ConfigError, match="objective=sft needs data.format=chat"):
        apply_overrides(base, ["objective=sft"])
    with pytest.raises(ConfigError, match="objective='grpo'"):
        apply_overrides(base, ["objective=grpo"])
    with pytest.raises(ConfigError, match="beta=0"):
        apply_overrides(base, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="data.format=chat is for objective=sft"):
        TrainConfig(model=CFG, data=DataConfig(paths="x.jsonl", format="chat"))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------------------------ LoRA in the trainer
def test_lora_state_trains_and_stores_only_adapters():
    """With TrainConfig.lora the trained tree and every AdamW moment are adapter-sized; the base is frozen."""
    from jax.sharding import AbstractMesh

    from llama import lora, optim
    from llama.train import abstract_state, train_step

    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    cfg = TrainConfig(model=CFG, lora=lcfg, batch_size=2, seq_len=16)
    mesh = AbstractMesh((1, 1, 1, 1), ("data", "fsdp", "tensor", "context"))
    state = abstract_state(cfg, mesh)
    adapter_shapes = {s.shape for s in jax.tree.leaves(lora.adapter_specs(CFG, lcfg), is_leaf=model.is_spec)}
    assert {x.shape for x in jax.tree.leaves(state.params)} == adapter_shapes
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and set(moments) == adapter_shapes and len(moments) == 2 * len(jax.tree.leaves(state.params))
    assert jax.tree.map(lambda x: x.shape, state.base) == jax.tree.map(lambda x: x.shape,
                                                                        model.abstract_params(CFG))
    # a real step: the base comes back unchanged, the adapters move, the loss is the base's (B = 0)
    from llama.train import _init_state

    tx = optim.make_optimizer(cfg.optimizer.replace(warmup_steps=0))
    s0 = _init_state(cfg, tx, 0)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, CFG.vocab_size, (2, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)), "loss_mask": np.ones((2, 16), np.float32)}
    s1, m = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, tx=tx))(s0, batch)
    full = TrainConfig(model=CFG, batch_size=2, seq_len=16)
    _, sums, norms = compute_grads(s0.base, batch, cfg=full)
    np.testing.assert_allclose(m["loss"], objective_metrics(sums, norms, full)["loss"], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, s1.base, s0.base)
    assert np.abs(np.asarray(s1.params["wq"]["b"])).max() > 0


def test_lora_bf16_run_holds_a_bf16_base_with_the_same_step():
    """compute_dtype bfloat16: the frozen base is held in bfloat16 (2 bytes per weight, as sharding.plan's LoRA
    case counts it), and the step equals one over the float32 base, which every use casts to bfloat16 anyway
    (the same bf16 operands; 1e-6 covers a different float32 accumulation order, observed equal)."""
    from llama import lora, optim
    from llama.train import _init_state, train_step

    bf = CFG.replace(compute_dtype="bfloat16")
    cfg = TrainConfig(model=bf, lora=lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv")), batch_size=2,
                      seq_len=16)
    tx = optim.make_optimizer(cfg.optimizer.replace(warmup_steps=0))
    s0 = _init_state(cfg, tx, 0, random_params())
    assert {str(x.dtype) for x in jax.tree.leaves(s0.base)} == {"bfloat16"}
    s32 = s0.__class__(s0.step, s0.params, s0.opt_state, s0.rng, s0.ref_params,
                       jax.tree.map(lambda x: x.astype(jnp.float32), random_params()))
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)), "loss_mask": np.ones((2, 16), np.float32)}
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, tx=tx))
    (a, ma), (b, mb) = step(s0, batch), step(s32, batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a.params, b.params)


def _lora_step_inputs(lcfg, seed=0):
    """A LoRA TrainConfig, its step-0 state with nonzero B (so the adapter path matters), and a batch."""
    from llama import lora, optim
    from llama.train import _init_state

    cfg = TrainConfig(model=CFG, lora=lcfg, batch_size=2, seq_len=16, micro_batches=2)
    tx = optim.make_optimizer(cfg.optimizer.replace(warmup_steps=0))
    s0 = _init_state(cfg, tx, seed, random_params())
    ad = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), s0.params)
    s0 = s0.__class__(s0.step, ad, tx.init(ad), s0.rng, s0.ref_params, s0.base)
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 17)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)), "loss_mask": np.ones((2, 16), np.float32)}
    return cfg, tx, s0, batch


@pytest.mark.slow
def test_lora_dropout_trains_with_the_steps_key_and_evaluates_without():
    """lora.dropout: 0 leaves the step bit for bit as without a key; > 0 changes the step's loss and gradients,
    deterministically (same state -> same step), and differs between steps (the key folds the step in); the
    eval/generation params (`model_params` without a key) carry no dropout."""
    from llama import lora
    from llama.train import model_params, train_step

    lc0 = lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    cfg0, tx, s0, batch = _lora_step_inputs(lc0)
    step0 = jax.jit(lambda s, b: train_step(s, b, cfg=cfg0, tx=tx))
    g_nokey = compute_grads(s0.params, batch, cfg=cfg0, base=s0.base)[0]
    g_key = compute_grads(s0.params, batch, cfg=cfg0, base=s0.base, key=jax.random.key(1))[0]
    jax.tree.map(np.testing.assert_array_equal, g_key, g_nokey)  # rate 0: the key changes nothing
    _, m0 = step0(s0, batch)

    lc = lc0.__class__(**{**lc0.to_dict(), "targets": lc0.targets, "dropout": 0.5})
    cfg = cfg0.replace(lora=lc)
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, tx=tx))
    (s1, m1), (s1b, m1b) = step(s0, batch), step(s0, batch)
    assert abs(float(m1["loss"]) - float(m0["loss"])) > 1e-4  # the adapter path saw dropped inputs
    np.testing.assert_array_equal(m1["loss"], m1b["loss"])  # deterministic given the seed
    jax.tree.map(np.testing.assert_array_equal, s1.params, s1b.params)
    s_next = s0.__class__(s0.step + 1, s0.params, s0.opt_state, s0.rng, None, s0.base)
    assert float(step(s_next, batch)[1]["loss"]) != float(m1["loss"])  # another step, other masks
    # evaluation: no key -> no dropout, equal to rate 0 bit for bit
    for t, w in model_params(s0.params, s0.base, cfg)["layers"].items():
        assert not isinstance(w, model.LoraWeight) or w.key is None
    h = lambda p: model.forward(p, jnp.asarray(batch["tokens"]), cfg=CFG)
    np.testing.assert_array_equal(h(model_params(s0.params, s0.base, cfg)), h(model_params(s0.params, s0.base, cfg0)))


def test_lora_dropout_is_pefts_formula_by_hand():
    """One projection, by hand: y = x W + (dropout(x) A B) * alpha / r with inverted dropout (kept inputs
    scaled by 1/(1-p)), PEFT's `lora.Linear.forward` (result + lora_B(lora_A(dropout(x))) * scaling). PEFT's
    own layer is run with its dropout module replaced by ours (torch's RNG cannot draw JAX's mask), which checks
    where the dropout sits: on the adapter input only, not on the base path or the output."""
    import torch
    from peft import LoraConfig as PeftConfig, get_peft_model

    p, r, alpha = 0.3, 2, 6.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((8, 6), (8, r), (r, 6)))
    key = jax.random.key_data(jax.random.key(3))
    ours = model.linear("BTD,DF->BTF", jnp.asarray(x), model.LoraWeight(jnp.asarray(w), jnp.asarray(a),
                                                                         jnp.asarray(b), alpha / r, key=key, dropout=p))
    keep = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(key), 1 - p, x.shape))
    assert 0 < keep.mean() < 1
    xd = np.where(keep, x / (1 - p), 0)
    np.testing.assert_allclose(ours, x @ w + (xd @ a @ b) * alpha / r, rtol=1e-5, atol=1e-5)

    class Masked(torch.nn.Module):  # PEFT's lora_dropout slot, with our mask
        def forward(self, t):
            return t * torch.from_numpy(keep.astype(np.float32)) / (1 - p)

    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(8, 6, bias=False))
    base.proj.weight.data = torch.from_numpy(w.T.copy())
    pm = get_peft_model(base, PeftConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    layer.lora_A["default"].weight.data = torch.from_numpy(a.T.copy())
    layer.lora_B["default"].weight.data = torch.from_numpy(b.T.copy())
    layer.lora_dropout["default"] = Masked()
    pm.train()
    with torch.no_grad():
        np.testing.assert_allclose(ours, pm(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_int8_base_trains_adapters_only_against_the_int8_base():
    """lora.base_int8: the state's base is int8 (QuantizedWeight) and stays so after a step, bit for bit;
    parameters, gradients and AdamW moments are adapter-sized; the step's loss and gradients equal those of the
    same LoRA on the dequantized base (q * s) within 1e-5: (x q) s and x (q s) differ by float32 summation order
    only. Against the original float base the loss moves by the int8 rounding, at most ~ max|w|/254 per weight."""
    from jax.sharding import AbstractMesh

    from llama import lora, quant
    from llama.train import abstract_state, train_step

    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"), base_int8=True)
    cfg, tx, s0, batch = _lora_step_inputs(lcfg)
    mesh = AbstractMesh((1, 1, 1, 1), ("data", "fsdp", "tensor", "context"))
    abstract = abstract_state(cfg, mesh)
    assert isinstance(abstract.base["layers"]["wq"], model.QuantizedWeight)
    assert abstract.base["layers"]["wq"].q.dtype == jnp.int8 and s0.base["layers"]["w_up"].q.dtype == jnp.int8
    adapter_shapes = {s.shape for s in jax.tree.leaves(lora.adapter_specs(CFG, lcfg), is_leaf=model.is_spec)}
    assert {x.shape for x in jax.tree.leaves(abstract.params)} == adapter_shapes
    assert {x.shape for x in jax.tree.leaves(abstract.opt_state) if x.ndim} == adapter_shapes

    s1, m = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, tx=tx))(s0, batch)
    jax.tree.map(np.testing.assert_array_equal, s1.base, s0.base)
    assert s1.base["layers"]["wq"].q.dtype == jnp.int8
    g8, sums8, norms = compute_grads(s0.params, batch, cfg=cfg, base=s0.base)
    assert {x.shape for x in jax.tree.leaves(g8)} == adapter_shapes

    deq = jax.tree.map(lambda w: quant.dequantize(w) if isinstance(w, model.QuantizedWeight) else w, s0.base,
                       is_leaf=lambda w: isinstance(w, model.QuantizedWeight))
    fcfg = cfg.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down")))
    gd, sumsd, _ = compute_grads(s0.params, batch, cfg=fcfg, base=deq)
    loss8, lossd = objective_metrics(sums8, norms, cfg)["loss"], objective_metrics(sumsd, norms, fcfg)["loss"]
    np.testing.assert_allclose(loss8, lossd, rtol=TOL)
    np.testing.assert_allclose(m["loss"], lossd, rtol=TOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=TOL * np.abs(y).max(), rtol=0), g8, gd)
    _, sumsf, _ = compute_grads(s0.params, batch, cfg=fcfg, base=random_params())
    lossf = objective_metrics(sumsf, norms, fcfg)["loss"]
    assert 0 < abs(float(loss8) - float(lossf)) < 0.05 * float(lossf)  # int8 rounding moves it, a little


@pytest.mark.slow
def test_lora_sft_resume_and_dpo_starts_at_ln2(tmp_path):
    """LoRA SFT through `python -m llama.train`: 4 steps straight == 2 + resume + 2 (the base is rebuilt from the
    seed on resume), the adapters are written as an adapter checkpoint; LoRA DPO's step 1 gives ln 2 (B = 0:
    the policy is its frozen base, the reference)."""
    from llama import lora
    from llama.train import main

    lo = "lora={'rank': 4, 'alpha': 8.0, 'targets': ('wq', 'wv')}"
    exp = write_experiment(tmp_path, "sft", write_rows(tmp_path, "chat", 40))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--config", exp, "--out", a, "--set", lo, "peak_flops=1e12"]) == 0
    assert main(["--config", exp, "--out", b, "--set", lo, "steps=2"]) == 0
    assert main(["--config", exp, "--out", b, "--set", lo]) == 0
    la = {s: r["loss"] for s, r in metrics_by_step(a).items()}
    assert la == {s: r["loss"] for s, r in metrics_by_step(b).items()} and la[4] < la[1]
    # MFU counts LoRA's FLOPs (no weight gradients for the frozen base: 4P + 6P_adapters + attention), not 6P
    from llama import metrics as llama_metrics
    from llama.train import load_experiment
    from sharding.rules import make_mesh

    cfg = load_experiment(exp).replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv")))
    want = llama_metrics.lora_train_flops_per_token(cfg.model, cfg.seq_len, cfg.lora) * cfg.batch_size * cfg.seq_len
    assert want < llama_metrics.train_flops_per_token(cfg.model, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    for r in metrics_by_step(a).values():
        assert r["mfu"] * 1e12 * r["step_time_s"] * make_mesh(cfg.mesh).size == pytest.approx(want, rel=1e-6)
    _, lcfg, ad, _ = lora.load_adapters(os.path.join(a, "adapters"))
    assert lcfg.rank == 4 and set(ad) == {"wq", "wv"}
    # int8 base from init_from (re-read and re-quantized on resume) with adapter dropout: resume is exact too
    from llama.checkpoint import save_model

    init = save_model(str(tmp_path / "init"), TINY.replace(vocab_size=512, max_seq_len=1024),
                      model.init_params(TINY.replace(vocab_size=512, max_seq_len=1024), jax.random.key(4)))
    lo8 = ["--set", "lora={'rank': 4, 'alpha': 8.0, 'targets': ('wq', 'wv'), 'dropout': 0.1, 'base_int8': True}",
           f"init_from={init}"]
    d, e = str(tmp_path / "d"), str(tmp_path / "e")
    assert main(["--config", exp, "--out", d, *lo8]) == 0
    assert main(["--config", exp, "--out", e, *lo8, "steps=2"]) == 0
    assert main(["--config", exp, "--out", e, *lo8]) == 0
    ld = {s: r["loss"] for s, r in metrics_by_step(d).items()}
    assert ld == {s: r["loss"] for s, r in metrics_by_step(e).items()} and ld[4] < ld[1]
    exp = write_experiment(tmp_path, "dpo", write_rows(tmp_path, "preference"), steps=1)
    c = str(tmp_path / "c")
    assert main(["--config", exp, "--out", c, "--set", lo]) == 0
    assert metrics_by_step(c)[1]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_init_from_hf_directory_and_model_checkpoint(hf_export, tmp_path):
    """init_from reads a Hugging Face directory (converted on the fly) and a model checkpoint to the same params,
    placed with the trainer's shardings; another architecture is a ConfigError naming the differing field."""
    from llama.checkpoint import save_model
    from llama.config import ConfigError
    from llama.train import load_init_params
    from sharding.rules import MeshConfig, make_mesh

    params, hf_dir = hf_export
    cfg = TrainConfig(model=CFG, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh = make_mesh(cfg.mesh)
    save_model(str(tmp_path / "ckpt"), CFG, params)
    for src in (hf_dir, str(tmp_path / "ckpt")):
        got = load_init_params(src, cfg, mesh)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, params)
        assert got["layers"]["wq"].sharding.mesh.shape == mesh.shape
    with pytest.raises(ConfigError, match="n_layers"):
        load_init_params(hf_dir, cfg.replace(model=CFG.replace(n_layers=3)), mesh)
