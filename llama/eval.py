"""Evaluation: perplexity, multiple-choice log-likelihood and greedy generation, scored as lm-evaluation-harness
(`lm-eval` 0.4) scores them; and the trainer's held-out loss, which is `ppl` on the held-out documents.

    python -m llama.eval ppl      --checkpoint CKPT --data 'texts/*.txt' [--context 512 --stride 256] --out OUT
    python -m llama.eval ppl      --checkpoint RUN --heldout --out OUT            # the trainer's eval set exactly
    python -m llama.eval choice   --checkpoint CKPT --task task.jsonl [--num-fewshot 5] --out OUT
    python -m llama.eval generate --checkpoint CKPT --task qa.jsonl --stop '\\n' --max-new-tokens 32 --out OUT
    python -m llama.eval passkey|needle --checkpoint CKPT --lengths 1024,4096 [--mesh context=4]   (llama/passkey.py)

Scoring rules, each as lm-eval does it (lm_eval/api/model.py TemplateLM, api/task.py process_results,
models/huggingface.py, utils.get_rolling_token_windows):
- A request is (context, continuation). Trailing spaces of the context move to the continuation; the
  context is encoded with BOS, the continuation is the rest of the encoding of context + continuation
  (`_encode_pair`); an empty context is just BOS. The input is the last `context` tokens of context +
  continuation without its final token: longer requests lose tokens on the left (counted), or fail with
  --on-overflow error. The log-likelihood is the sum over the continuation; is_greedy: every continuation
  token is the argmax.
- choice: continuation = " " + choice (target_delimiter). acc: argmax of the log-likelihoods is gold; acc_norm:
  argmax of log-likelihood / len(choice) in characters (`completion_len`, the choice without the delimiter).
- ppl: the text's tokens (no BOS) are predicted with BOS as the first input, in windows of `context` tokens;
  the first window predicts up to `context` tokens, each later one the next `stride` tokens given the
  `context` tokens before them. stride == context is lm-eval's `loglikelihood_rolling` (context_len=1).
  word_perplexity = exp(-ll / words) (words: re.split(r"\\s+")), byte_perplexity = exp(-ll / UTF-8 bytes),
  bits_per_byte = -ll / bytes / ln 2, summed over all documents before dividing (weighted_perplexity).
Speed: every scored sequence is a segment; segments are packed into rows (best fit, longest first) with
segment ids and restarting positions, so a row holds several short requests and padding is small. A
request whose input is a prefix of another's (every one-token choice of a question; "dog" vs "dogs") is
read from that one's logits: one forward serves both. The choices of one example share their context: it is
laid out once, each continuation after it under a tree mask (`tree_query_logprobs`).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama import model
from llama.config import ATTENTION_IMPLS, ModelConfig

ROW_BUCKET = 64  # row lengths (and query counts) round up to this: nearby sizes share one compiled program
TREE_MAX_ROW = 512  # tree rows use a dense [B, T, T] mask; longer rows take the flash path
MARKER = "llama.eval"  # manifest.extra["tool"] of an eval output; only such a directory is ever replaced


class EvalError(ValueError):
    """Bad task input or flags; the message names the file, line, field or flag."""


# ------------------------------------------------------------------------------------ scoring on device
def _read_queries(params, h, q_pos, q_tok, cfg: ModelConfig):
    """log p(q_tok) and whether q_tok is the argmax, from hidden states h [B, T, D] at q_pos [B, Q] (None: Q = T).
    Gathering the query rows before the output layer computes [B, Q, V] logits only, never [B, T, V]."""
    if q_pos is not None:
        h = jnp.take_along_axis(h, q_pos[..., None], axis=1)  # [B, Q, D]
    logits = model.unembed(params, h, cfg)  # [B, Q, V] float32
    logp = jnp.take_along_axis(logits, q_tok[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits, axis=-1) == q_tok


def query_logprobs(params, tokens, positions, segment_ids, q_pos, q_tok, *, cfg: ModelConfig):
    """log p(q_tok | row up to q_pos) and whether q_tok is the argmax there, for packed rows.

    tokens, positions, segment_ids: [B, T]; q_pos, q_tok: [B, Q] (q_pos None: Q = T, query i reads position
    i, the layout of a training batch with q_tok = targets). Returns float32 logp [B, Q], bool greedy [B, Q].
    Task scoring (ppl, choice) reads it; the trainer's held-out loss is the trainer's own loss (`_nll_sums`).
    """
    h = model.hidden_states(params, tokens, positions, segment_ids, cfg=cfg)  # [B, T, D]
    return _read_queries(params, h, q_pos, q_tok, cfg)


# XLA's CPU backend compiles at LLVM -O3 by default; at 1 these programs compile in ~25% less CPU time (0.45-0.55
# s against 0.69-0.71 s for the benchmark's tree program) and run as fast (0.092-0.094 s against 0.095-0.097 s
# per batch; docs/benchmarks.md). Other backends keep their defaults.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _jit(fn):
    """jax.jit(fn, static cfg), with CPU_COMPILER_OPTIONS when the default backend is the CPU."""
    jits: dict[bool, Any] = {}

    def call(*args, cfg: ModelConfig):
        cpu = jax.default_backend() == "cpu"
        if cpu not in jits:
            jits[cpu] = jax.jit(fn, static_argnames=("cfg",), compiler_options=CPU_COMPILER_OPTIONS if cpu else None)
        return jits[cpu](*args, cfg=cfg)

    return call


_query_jit = _jit(query_logprobs)


def tree_query_logprobs(params, tokens, positions, segment_ids, parents, q_pos, q_tok, *, cfg: ModelConfig):
    """`query_logprobs` for rows of request trees: a shared context (the trunk) followed by its continuations
    (branches), each branch seeing the trunk and itself only, its positions continuing the trunk's. A token at
    slot s attends to slot s' <= s of its own segment or of its `parents` segment (a trunk's parent is itself):
    the model with the dense reference attention (`attention.attention`'s parent_ids); tests/test_eval.py checks
    it against `query_logprobs`. The mask is [B, T, T]: rows are short (TREE_MAX_ROW)."""
    h = model.hidden_states(params, tokens, positions, segment_ids, cfg=cfg.replace(attention_impl="xla"),
                            parent_ids=parents)
    return _read_queries(params, h, q_pos, q_tok, cfg)


_tree_query_jit = _jit(tree_query_logprobs)


def _nll_sums(params, batch, *, cfg: ModelConfig):
    """(summed next-token loss, token count) of a training-layout batch: the trainer's own loss (llama/loss.py, the
    output layer fused with the cross-entropy over chunks, so no [B, T, V] logits exist)."""
    from llama import loss as llama_loss

    h = model.hidden_states(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=cfg)
    _, (nll_sum, _) = llama_loss.next_token_loss(params, h, batch["targets"], batch["loss_mask"], cfg=cfg,
                                                 chunk=llama_loss.LOSS_CHUNK)
    return nll_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))


_nll_sums_jit = jax.jit(_nll_sums, static_argnames=("cfg",))


@dataclass(frozen=True)
class Segment:
    """One forward sequence: `inputs` (positions 0..n-1) and the queries read from it: (position, token)."""

    inputs: tuple[int, ...]
    queries: tuple[tuple[int, int], ...]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pack(lengths: Sequence[int], row_len: int) -> list[tuple[int, int]]:
    """(row, offset) for each length: best fit, longest first, into rows of `row_len` tokens."""
    place: list[Any] = [None] * len(lengths)
    free: list[tuple[int, int]] = []  # sorted (free tokens, row)
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            fill.append(0)
            r, left = len(fill) - 1, row_len
        else:
            left, r = free.pop(k)
        place[i] = (r, fill[r])
        fill[r] += n
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    return place


def _common_prefix(seqs: Sequence[tuple[int, ...]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def run_segments(params, segments: Sequence[Segment], *, cfg: ModelConfig, batch_size: int, mesh=None,
                 row_len: int | None = None, groups: Sequence[Any] | None = None,
                 progress: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logp [n_queries], greedy [n_queries]) per segment. Segments whose inputs are a prefix of another's
    are answered from that one's row (causal attention: a prefix's logits do not depend on what follows).
    `groups` (a key per segment, e.g. its example): the distinct inputs of a group are laid out as one tree, their
    common prefix once and each remainder after it (`tree_query_logprobs`), when the rows fit TREE_MAX_ROW."""
    from tqdm import tqdm

    # Prefix sharing: in sorted order the extensions of a sequence follow it immediately.
    uniq = sorted(set(s.inputs for s in segments))
    owner: dict[tuple, tuple] = {}
    for k in range(len(uniq) - 1, -1, -1):
        s = uniq[k]
        nxt = owner.get(uniq[k + 1]) if k + 1 < len(uniq) else None
        owner[s] = nxt if nxt is not None and nxt[:len(s)] == s else s
    # Trees: (trunk, branches); an owner sequence is trunk + one branch (or the trunk itself when alone).
    members: dict[Any, list[tuple]] = {}
    for i, s in enumerate(segments):
        o = owner[s.inputs]
        key = groups[i] if groups is not None else o
        if o not in members.setdefault(key, []):
            members[key].append(o)
    placed_in: dict[tuple, Any] = {}
    trees: list[tuple[tuple, list[tuple]]] = []
    for seqs in members.values():
        seqs = [o for o in seqs if o not in placed_in]  # an owner shared by two groups lives in the first
        if not seqs:
            continue
        n = _common_prefix(seqs) if len(seqs) > 1 else len(seqs[0])
        for o in seqs:
            placed_in[o] = len(trees)
        trees.append((seqs[0][:n], [o[n:] for o in seqs] if len(seqs) > 1 else []))
    sizes = [len(t) + sum(map(len, br)) for t, br in trees]
    use_tree = (any(br for _, br in trees) and _round_up(max(sizes), ROW_BUCKET) <= TREE_MAX_ROW
                and max(sizes) <= (row_len or TREE_MAX_ROW))
    if not use_tree:  # one sequence per owner, causal packed rows (flash attention, any length)
        trees = [(o, []) for o in sorted(set(owner.values()))]
        placed_in = {o: i for i, (o, _) in enumerate(trees)}
        sizes = [len(t) for t, _ in trees]
    longest = max(sizes, default=1)
    row_len = row_len or _round_up(longest, ROW_BUCKET)
    if longest > row_len:
        raise EvalError(f"a sequence of {longest} tokens does not fit rows of {row_len}")
    place = pack(sizes, row_len)
    n_rows = max((r for r, _ in place), default=0) + 1
    # Slot of each owner sequence's position p: (row, trunk offset, trunk length, branch offset).
    where: dict[tuple, tuple[int, int, int, int]] = {}
    rows_of: list[list[tuple[int, tuple, list[tuple]]]] = [[] for _ in range(n_rows)]
    for (trunk, branches), (r, off) in zip(trees, place):
        rows_of[r].append((off, trunk, branches))
        boff = off + len(trunk)
        for br in branches:
            where[trunk + br] = (r, off, len(trunk), boff)
            boff += len(br)
        if not branches:
            where[trunk] = (r, off, len(trunk), off + len(trunk))
    per_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n_rows)]  # (segment, query, slot, tok)
    for si, seg in enumerate(segments):
        r, off, n, boff = where[owner[seg.inputs]]
        per_row[r].extend((si, qi, off + p if p < n else boff + p - n, t) for qi, (p, t) in enumerate(seg.queries))
    out = [(np.zeros(len(s.queries), np.float32), np.zeros(len(s.queries), bool)) for s in segments]
    n_batches = -(-n_rows // batch_size)
    Q = _round_up(max(max(map(len, per_row), default=1), 1), ROW_BUCKET)  # one query count: one compile
    pending = []

    def read(rows, res):
        logp, greedy = jax.device_get(res)
        for i, r in enumerate(rows):
            for k, (si, qi, _, _) in enumerate(per_row[r]):
                out[si][0][qi], out[si][1][qi] = logp[i, k], greedy[i, k]

    for b in tqdm(range(n_batches), desc=progress or "eval", unit="batch", disable=progress is None):
        rows = range(b * batch_size, min((b + 1) * batch_size, n_rows))
        arr = {k: np.zeros((batch_size, row_len), np.int32) for k in ("tokens", "positions", "segment_ids", "parents")}
        q_pos, q_tok = np.zeros((batch_size, Q), np.int32), np.zeros((batch_size, Q), np.int32)
        for i, r in enumerate(rows):
            seg_id = 0
            for off, trunk, branches in rows_of[r]:
                seg_id += 1
                n, trunk_id = len(trunk), seg_id
                arr["tokens"][i, off:off + n] = trunk
                arr["positions"][i, off:off + n] = np.arange(n)
                arr["segment_ids"][i, off:off + n] = arr["parents"][i, off:off + n] = trunk_id
                off += n
                for br in branches:
                    seg_id += 1
                    arr["tokens"][i, off:off + len(br)] = br
                    arr["positions"][i, off:off + len(br)] = np.arange(n, n + len(br))
                    arr["segment_ids"][i, off:off + len(br)] = seg_id
                    arr["parents"][i, off:off + len(br)] = trunk_id
                    off += len(br)
            for k, (_, _, p, t) in enumerate(per_row[r]):
                q_pos[i, k], q_tok[i, k] = p, t
        fn, names = ((_tree_query_jit, ("tokens", "positions", "segment_ids", "parents")) if use_tree
                     else (_query_jit, ("tokens", "positions", "segment_ids")))
        args = [arr[k] for k in names] + [q_pos, q_tok]
        if mesh is not None:
            from sharding.rules import fitted_sharding

            args = [jax.device_put(x, fitted_sharding(mesh, ("batch", None), x.shape)) for x in args]
            with jax.set_mesh(mesh):
                pending.append((rows, fn(params, *args, cfg=cfg)))
        else:
            pending.append((rows, fn(params, *args, cfg=cfg)))
        # Dispatch is asynchronous: the next batch is built on the host while this one runs, and results are read
        # one batch behind, so at most two batches' outputs are held.
        if len(pending) == 2:
            read(*pending.pop(0))
    for p in pending:
        read(*p)
    return out


# -------------------------------------------------------------------------------------- requests (lm-eval)
def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM.loglikelihood + _encode_pair for a causal model whose tokenizer adds BOS."""
    if context == "":
        cont = tok.encode(continuation)
        return ([tok.bos_id], cont) if not cont or cont[0] != tok.bos_id else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation, bos=True), tok.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def request_segment(ctx: list[int], cont: list[int], window: int) -> tuple[Segment, int]:
    """(segment, tokens cut on the left): lm-eval's (context + continuation)[-(window + 1):][:-1]."""
    if not cont:
        raise EvalError("a continuation encodes to zero tokens")
    if len(cont) > window:
        raise EvalError(f"a continuation of {len(cont)} tokens is longer than the window of {window}")
    full = ctx + cont
    keep = full[-(window + 1):]
    n = len(keep) - 1
    return Segment(tuple(keep[:-1]), tuple((n - len(cont) + i, t) for i, t in enumerate(cont))), len(full) - len(keep)


def rolling_segments(ids: Sequence[int], prefix: int, context: int, stride: int) -> list[Segment]:
    """Windows that predict every token of `ids` once, `prefix` (BOS) first (see the module docstring)."""
    x, n = [prefix, *ids], len(ids)
    ends = [min(context, n)] if n else []
    while ends and ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    out, prev = [], 0
    for b in ends:
        a = max(0, b - context)
        out.append(Segment(tuple(x[a:b]), tuple((j - a - 1, x[j]) for j in range(prev + 1, b + 1))))
        prev = b
    return out


# ------------------------------------------------------------------------------------------------ ppl
def ppl_scores(params, cfg: ModelConfig, docs: Sequence[Sequence[int]], texts: Sequence[bytes | str], *, bos: int,
               context: int, stride: int, batch_size: int, mesh=None, progress=None) -> tuple[dict, list[dict]]:
    """Metrics over documents (token ids without BOS/EOS, and their text for bytes and words) and one
    sample per document."""
    if not 1 <= stride <= context <= cfg.max_seq_len:
        raise EvalError(f"--context {context} / --stride {stride}: need 1 <= stride <= context <= the model's "
                        f"window {cfg.max_seq_len}")
    segs, owner = [], []
    for d, ids in enumerate(docs):
        for s in rolling_segments(list(ids), bos, context, stride):
            segs.append(s)
            owner.append(d)
    res = run_segments(params, segs, cfg=cfg, batch_size=batch_size, mesh=mesh, progress=progress)
    ll = np.zeros(len(docs), np.float64)
    for d, (logp, _) in zip(owner, res):
        ll[d] += logp.astype(np.float64).sum()
    samples = []
    for d, t in enumerate(texts):
        t = t if isinstance(t, str) else t.decode("utf-8", errors="replace")
        samples.append({"doc": d, "loglikelihood": float(ll[d]), "tokens": len(docs[d]),
                        "bytes": len(t.encode("utf-8")), "words": len(re.split(r"\s+", t))})
    tot = {k: sum(s[k] for s in samples) for k in ("tokens", "bytes", "words")}
    nll = -float(ll.sum())
    metrics = {"loss": nll / max(tot["tokens"], 1), "perplexity": math.exp(nll / max(tot["tokens"], 1)),
               "bits_per_byte": nll / max(tot["bytes"], 1) / math.log(2),
               "byte_perplexity": math.exp(nll / max(tot["bytes"], 1)),
               "word_perplexity": math.exp(nll / max(tot["words"], 1)), "tokens": tot["tokens"], "n": len(docs)}
    return metrics, samples


# --------------------------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class Example:
    id: Any
    context: str
    choices: tuple[str, ...]
    gold: int | None = None
    answers: tuple[str, ...] = ()


def read_task(path: str, kind: str) -> list[Example]:
    """JSONL rows: choice {"context", "choices", "gold", "id"?}; generate {"context", "answer" or "answers",
    "id"?}. Errors name file:line and the field."""
    if not os.path.isfile(path):
        raise EvalError(f"--task {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("context"), str):
                raise EvalError(f"{where}: expected an object with a string \"context\"")
            if kind == "choice":
                ch, gold = row.get("choices"), row.get("gold")
                if not isinstance(ch, list) or not ch or not all(isinstance(c, str) for c in ch):
                    raise EvalError(f"{where}: \"choices\" must be a non-empty list of strings")
                if isinstance(gold, bool) or not isinstance(gold, int):
                    raise EvalError(f"{where}: \"gold\" must be an integer index into \"choices\", got {gold!r}")
                if not 0 <= gold < len(ch):
                    raise EvalError(f"{where}: \"gold\" {gold} is out of range for {len(ch)} choices")
                out.append(Example(row.get("id", len(out)), row["context"], tuple(ch), gold))
            else:
                ans = row.get("answers", [row["answer"]] if "answer" in row else None)
                if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
                    raise EvalError(f"{where}: expected \"answer\" (a string) or \"answers\" (a list of strings)")
                out.append(Example(row.get("id", len(out)), row["context"], (), None, tuple(ans)))
    if not out:
        raise EvalError(f"--task {path}: no examples")
    return out


def fewshot_contexts(examples: Sequence[Example], k: int, seed: int) -> list[str]:
    """Each context behind k solved examples of the same file ("context choice", blank-line separated: lm-eval's
    fewshot_delimiter and target_delimiter), drawn as lm-eval's sampler does: k + 1 from a Random(seed) shared by
    all examples in order, the example itself removed."""
    if k == 0:
        return [e.context for e in examples]
    if k >= len(examples):
        raise EvalError(f"--num-fewshot {k}: the task has only {len(examples)} examples")
    rnd, out = random.Random(seed), []
    for i, e in enumerate(examples):
        shots = [j for j in rnd.sample(range(len(examples)), k + 1) if j != i][:k]
        solved = [f"{examples[j].context} {examples[j].choices[examples[j].gold]}" if examples[j].choices
                  else f"{examples[j].context} {examples[j].answers[0]}" for j in shots]
        out.append("\n\n".join(solved + [e.context]))
    return out


def chat_prompt(tok, text: str) -> list[int]:
    from llama.tokenizer import Llama3Tokenizer, encode_dialog

    if not isinstance(tok, Llama3Tokenizer):
        raise EvalError(f"--chat: the Llama 3.1 chat format needs the Llama 3 tokenizer, not {tok!r}")
    return encode_dialog(tok, [{"role": "user", "content": text}])


def choice_scores(params, cfg: ModelConfig, tok, examples: Sequence[Example], contexts: Sequence[str], *,
                  batch_size: int, chat: bool = False, overflow: str = "truncate", mesh=None,
                  progress=None) -> tuple[dict, list[dict]]:
    """acc and acc_norm as lm-eval's multiple_choice process_results, and one sample per example."""
    segs, truncated = [], []
    for e, ctx in zip(examples, contexts):
        for c in e.choices:
            if chat:  # lm-eval drops the target delimiter under a chat template
                pair = (chat_prompt(tok, ctx), tok.encode(c))
            else:
                pair = encode_pair(tok, ctx, " " + c)
            try:
                seg, cut = request_segment(*pair, cfg.max_seq_len)
            except EvalError as err:
                raise EvalError(f"example {e.id!r}, choice {c!r}: {err}") from None
            if cut and overflow == "error":
                raise EvalError(f"example {e.id!r}: {len(pair[0]) + len(pair[1])} tokens exceed the model's window "
                                f"of {cfg.max_seq_len} + 1; pass --on-overflow truncate to cut the context on the left")
            segs.append(seg)
            truncated.append(cut)
    groups = [i for i, e in enumerate(examples) for _ in e.choices]  # an example's choices share its context
    res = iter(run_segments(params, segs, cfg=cfg, batch_size=batch_size, mesh=mesh, groups=groups,
                            progress=progress))
    cut = iter(truncated)
    samples, acc, acc_norm, n_cut = [], 0.0, 0.0, 0
    for e in examples:
        scored = [next(res) for _ in e.choices]
        lls = np.array([float(lp.astype(np.float64).sum()) for lp, _ in scored])
        greedy = [bool(g.all()) for _, g in scored]
        cuts = [next(cut) for _ in e.choices]
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in e.choices])))
        acc += pred == e.gold
        acc_norm += pred_norm == e.gold
        n_cut += any(cuts)
        samples.append({"id": e.id, "gold": e.gold, "pred": pred, "pred_norm": pred_norm, "acc": float(pred == e.gold),
                        "acc_norm": float(pred_norm == e.gold), "loglikelihoods": lls.tolist(), "is_greedy": greedy,
                        "truncated_tokens": cuts})
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "truncated": n_cut, "n": n}, samples


# ------------------------------------------------------------------------------------------- generate
def generate_scores(params, cfg: ModelConfig, tok, examples: Sequence[Example], contexts: Sequence[str], *,
                    batch_size: int, max_new_tokens: int, stop: Sequence[str] = (), chat: bool = False,
                    overflow: str = "truncate", mesh=None, progress=None) -> tuple[dict, list[dict]]:
    """Greedy continuations (llama.generate), cut at the first stop string; exact_match (after strip) and
    contains (an answer appears in the output)."""
    from tqdm import tqdm

    from llama.generate import generate

    room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise EvalError(f"--max-new-tokens {max_new_tokens} leaves no room in the window of {cfg.max_seq_len}")
    prompts, cuts = [], []
    for e, ctx in zip(examples, contexts):
        p = chat_prompt(tok, ctx) if chat else tok.encode(ctx, bos=True)
        if len(p) > room and overflow == "error":
            raise EvalError(f"example {e.id!r}: {len(p)} prompt tokens + {max_new_tokens} new exceed the window of "
                            f"{cfg.max_seq_len}; pass --on-overflow truncate to cut the prompt on the left")
        cuts.append(max(0, len(p) - room))
        prompts.append(p[-room:])
    stops = tuple(sorted(set(cfg.eos_ids) | set(tok.stop_ids)))
    samples, em, co = [], 0.0, 0.0
    for b in tqdm(range(0, len(prompts), batch_size), desc=progress or "generate", unit="batch",
                  disable=progress is None):
        res = generate(params, prompts[b:b + batch_size], cfg=cfg, max_new_tokens=max_new_tokens, stop_ids=stops,
                       mesh=mesh)
        for i, ids in enumerate(res.tokens):
            e = examples[b + i]
            text = tok.decode([t for t in ids if t not in stops])
            for s in stop:
                text = text.split(s, 1)[0]
            hit = float(any(text.strip() == a.strip() for a in e.answers))
            has = float(any(a in text for a in e.answers))
            em, co = em + hit, co + has
            samples.append({"id": e.id, "output": text, "answers": list(e.answers), "exact_match": hit,
                            "contains": has, "new_tokens": len(ids), "truncated_tokens": cuts[b + i]})
    n = len(examples)
    return {"exact_match": em / n, "contains": co / n, "truncated": sum(c > 0 for c in cuts), "n": n}, samples


# ------------------------------------------------------------------------------------- trainer eval set
ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")  # a batch's arrays, the trainer's layout


@dataclass(frozen=True)
class EvalSet:
    """Fixed eval batches: numpy dicts [B, T] in the training layout (tokens, targets, segment_ids, positions,
    loss_mask) holding the rolling windows (context = stride = T) of the first `documents` eval documents, the
    last one's first `last_document_tokens` tokens (`documents_scored` cuts the documents the same way)."""

    batches: tuple[dict, ...]
    documents: int
    last_document_tokens: int
    tokens: int
    sha256: str

    def describe(self) -> dict:
        return {"documents": self.documents, "last_document_tokens": self.last_document_tokens,
                "tokens": self.tokens, "batches": len(self.batches), "sha256": self.sha256}

    @classmethod
    def from_rows(cls, rows: dict[str, np.ndarray], batch_size: int, documents: int,
                  last_document_tokens: int) -> "EvalSet":
        """Rows [n * batch_size, T] (ROW_KEYS) cut into batches, with their scored-token count and a digest."""
        h = hashlib.sha256()
        for k in ROW_KEYS:
            h.update(rows[k].tobytes())
        n = len(rows["tokens"])
        batches = tuple({k: rows[k][i:i + batch_size] for k in ROW_KEYS} for i in range(0, n, batch_size))
        return cls(batches, documents, last_document_tokens, int(rows["loss_mask"].sum()), h.hexdigest())

    def global_batches(self, mesh):
        """Each batch as global arrays on `mesh`: each process feeds its share of the rows, placed as training
        places its batches (input_pipeline.to_global_batch)."""
        import input_pipeline

        p, n = jax.process_index(), jax.process_count()
        for batch in self.batches:
            rows = batch["tokens"].shape[0] // n
            yield input_pipeline.to_global_batch({k: v[p * rows:(p + 1) * rows] for k, v in batch.items()}, mesh)

    def documents_scored(self, docs: Sequence[Sequence[int]]) -> list[list[int]]:
        """The token ids this set scores: `ppl` with context = stride = T on them is this set's loss."""
        out = [list(d) for d in docs[:self.documents]]
        out[-1] = out[-1][:self.last_document_tokens]
        return out


def make_eval_set(docs: Sequence[Sequence[int]], *, bos: int, seq_len: int, batch_size: int,
                  max_batches: int) -> EvalSet:
    """The windows of `docs` (token ids, no BOS/EOS; in order, each document's in order) up to the most that pack
    into max_batches batches of batch_size rows of seq_len tokens; a pure function of its arguments, so it is
    the same after a resume. A document cut there is scored on a prefix: its windows end at multiples of T."""
    windows = [(d, s) for d, ids in enumerate(docs) for s in rolling_segments(list(ids), bos, seq_len, seq_len)]

    def rows(k):
        place = pack([len(s.inputs) for _, s in windows[:k]], seq_len)
        return [s for _, s in windows[:k]], place, (max((r for r, _ in place), default=-1) + 1)

    lo, hi = 0, len(windows)  # rows(k) grows with k: binary search for the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rows(mid)[2] <= max_batches * batch_size:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise EvalError(f"no eval document fits {max_batches} batches of {batch_size} x {seq_len} tokens")
    segs, place, n_rows = rows(lo)
    last = windows[lo - 1][0]
    last_tokens = sum(len(s.queries) for d, s in windows[:lo] if d == last)
    n_batches = -(-n_rows // batch_size)
    arr = {k: np.zeros((n_batches * batch_size, seq_len), np.float32 if k == "loss_mask" else np.int32)
           for k in ROW_KEYS}
    seg_no: dict[int, int] = {}
    for s, (r, off) in zip(segs, place):
        n = len(s.inputs)
        seg_no[r] = seg_no.get(r, 0) + 1
        arr["tokens"][r, off:off + n] = s.inputs
        arr["segment_ids"][r, off:off + n] = seg_no[r]
        arr["positions"][r, off:off + n] = np.arange(n)
        for p, t in s.queries:
            arr["targets"][r, off + p] = t
            arr["loss_mask"][r, off + p] = 1.0
    return EvalSet.from_rows(arr, batch_size, last + 1, last_tokens)


def evaluate(params, eval_set: EvalSet, *, cfg: ModelConfig, mesh) -> dict:
    """{"eval_loss", "eval_ppl"}: the token-weighted mean next-token loss over the eval set. Each process feeds
    its share of every batch's rows (`EvalSet.global_batches`); the sums are global."""
    nll = count = 0.0
    with jax.set_mesh(mesh):
        for batch in eval_set.global_batches(mesh):
            s, c = jax.device_get(_nll_sums_jit(params, batch, cfg=cfg))
            nll, count = nll + float(s), count + float(c)
    loss = nll / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


def trainer_eval_documents(tcfg, source, tok, out_dir: str) -> list[list[int]]:
    """The trainer's eval documents as token ids: data.eval_paths (same format as the training data) or the
    held-out share (data.eval_share) of the training documents (input_pipeline.sources.hash_split). Only as
    many as can fill the eval batches are tokenized (they hold at most eval_batches * batch_size * seq_len)."""
    from input_pipeline.prepared import open_prepared
    from input_pipeline.sources import Source, hash_split, open_documents

    d = tcfg.data
    if d.eval_paths:
        source = Source((d.eval_paths,), format=d.format, separator=d.separator)
    docs = open_prepared(source.paths) if source.format == "prepared" else open_documents(source)
    if not d.eval_paths:
        docs = hash_split(docs, d.eval_share, heldout=True)
    out, budget = [], tcfg.eval_batches * tcfg.batch_size * tcfg.seq_len
    for i in range(len(docs)):
        x = docs[i]
        if isinstance(x, str):
            out.append(tok.encode(x))
        else:  # prepared: [BOS, ..., EOS]
            x = [int(t) for t in x]
            out.append(x[1:-1] if x and x[-1] == tok.eos_id else x[1:])
        budget -= len(out[-1])
        if budget < 0:
            break
    return out


def trainer_eval_set(tcfg, source, tok, out_dir: str) -> EvalSet:
    return make_eval_set(trainer_eval_documents(tcfg, source, tok, out_dir), bos=tok.bos_id, seq_len=tcfg.seq_len,
                         batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches)


def record_in_manifest(out_dir: str, step: int, result: dict) -> None:
    """The last eval result into OUT/manifest.json (extra.eval.last)."""
    from llama import manifest

    path = os.path.join(out_dir, "manifest.json")
    m = manifest.read_manifest(path)
    m.setdefault("extra", {}).setdefault("eval", {})["last"] = {"step": int(step), **result}
    manifest.atomic_write(path, json.dumps(m, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ lm-eval's HF tokenizer
def export_hf_tokenizer(sp_model: str, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json in `out_dir` that tokenize exactly as the SentencePiece model
    (BPE with byte fallback, as llama2.c's tok512 and `train_sentencepiece`'s), for lm-eval's HF backend.
    transformers' own conversion misses the model's remove_extra_whitespaces (leading, trailing and repeated
    spaces are dropped) and loads LlamaTokenizer without any normalizer, so the normalizer is written here
    and the files load as a plain PreTrainedTokenizerFast."""
    import transformers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp_model, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != 2 or proto.normalizer_spec.name != "identity":  # 2 = BPE
        raise EvalError(f"{sp_model}: only BPE SentencePiece models with the identity normalizer are exported")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, f)
        t = transformers.AutoTokenizer.from_pretrained(tmp)
    steps = [normalizers.Replace("\u2581", " ")]  # SentencePiece reads a literal "▁" as a space
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    t.backend_tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    t.backend_tokenizer.pre_tokenizer = None
    t.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(conf, f, indent=1)


# ------------------------------------------------------------------------------------------------ output
def is_eval_output(path: str) -> bool:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f).get("extra", {}).get("tool") == MARKER
    except (OSError, ValueError):
        return False


def write_outputs(out: str, task: str, metrics: dict, samples: list[dict], *, config: dict, data_files) -> None:
    """OUT/results.json, OUT/samples_<task>.jsonl, OUT/results.md and OUT/manifest.json, staged in a temporary
    directory and renamed into place. An existing OUT is replaced only if it is a previous eval output."""
    from llama import manifest
    from llama.checkpoint import commit_dir

    out = os.path.abspath(out)
    if os.path.exists(out) and not is_eval_output(out):
        raise EvalError(f"--out {out} exists and is not a llama.eval output (no manifest.json from llama.eval); "
                        "choose a new directory")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        results = {task: metrics}
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(tmp, f"samples_{task}.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        lines = ["| task | metric | value | n |", "|---|---|---|---|"]
        lines += [f"| {task} | {k} | {v:.6g} | {metrics['n']} |" for k, v in metrics.items() if k != "n"]
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        manifest.write_manifest(tmp, config=config, data_files=data_files, extra={"tool": MARKER, "results": results,
                                                                                 "command": sys.argv})
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("\n".join(lines))
    print(f"results: {out}/results.json, {out}/samples_{task}.jsonl, {out}/results.md, {out}/manifest.json")


# --------------------------------------------------------------------------------------------------- CLI
def _train_config(checkpoint: str):
    """(TrainConfig, run directory) of a training run or one of its steps."""
    from llama.checkpoint import resolve
    from llama.train import TrainConfig

    _, params_dir = resolve(checkpoint)
    step_dir = os.path.dirname(params_dir)
    item = os.path.join(step_dir, "config", "metadata")
    if not os.path.isfile(item):
        raise EvalError(f"--heldout: {checkpoint} is not a training run (no {item}); give --data instead")
    with open(item) as f:
        return TrainConfig.from_dict(json.load(f)["train"]), os.path.dirname(os.path.dirname(step_dir))


def _ppl_inputs(a, tok):
    """(token ids per document without BOS/EOS, text per document, data files, defaults) for `ppl`."""
    from input_pipeline.prepared import open_prepared
    from input_pipeline.sources import Source, open_documents

    if a.heldout:
        tcfg, run = _train_config(a.checkpoint)
        if not (tcfg.data.eval_paths or tcfg.data.eval_share):
            raise EvalError(f"--heldout: the run {run} has no eval data (data.eval_share / data.eval_paths)")
        from llama.train import data_source

        src = data_source(tcfg, run)
        ids = trainer_eval_documents(tcfg, src, tok, run)
        es = make_eval_set(ids, bos=tok.bos_id, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                           max_batches=tcfg.eval_batches)
        ids = es.documents_scored(ids)
        return ids, [tok.decode_bytes(d) for d in ids], list(src.paths), tcfg.seq_len
    if not a.data:
        raise EvalError("ppl: give --data FILES (or --heldout with a training run)")
    src = Source(tuple(a.data), format=a.format, field=a.field, separator=a.separator)
    if a.format == "prepared":
        docs = open_prepared(src.paths)
        ids = [[int(t) for t in docs[i]][1:-1] for i in range(len(docs))]
        texts = [tok.decode_bytes(d) for d in ids]
    else:
        docs = open_documents(src)
        texts = [docs[i] for i in range(len(docs))]
        ids = [tok.encode(t) for t in texts]
    return ids, texts, list(src.paths), None


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m llama.eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="Orbax model checkpoint or training run (latest step)")
    common.add_argument("--tokenizer", help="tokenizer file (default: CHECKPOINT/tokenizer.model, else Llama 3's)")
    common.add_argument("--mesh", help="e.g. data=1,fsdp=8,tensor=1 (default: one device)")
    common.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="attention implementation (default: the checkpoint's config; llama/attention.py)")
    common.add_argument("--batch-size", type=int, default=16, help="packed rows (choice, ppl) or prompts per batch")
    common.add_argument("--limit", type=int, help="only the first N examples / documents")
    common.add_argument("--name", help="task name in results.json (default: the file's name)")
    common.add_argument("--out", required=True, help="output directory (written atomically)")
    common.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("ppl", parents=[common], help="loss, perplexity and bits per byte of text")
    p.add_argument("--data", nargs="+", help="files or globs")
    p.add_argument("--format", default="text", choices=("text", "jsonl", "parquet", "array_record", "prepared"))
    p.add_argument("--field", default="text", help="jsonl/parquet text field")
    p.add_argument("--separator", help="text: document separator (default one document per file)")
    p.add_argument("--context", type=int, help="window in tokens (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, help="new tokens per window after the first (default: --context)")
    p.add_argument("--heldout", action="store_true", help="the training run's eval documents, as the trainer "
                   "evaluates them (context = stride = its seq_len, its eval_batches)")
    for name, hlp in (("choice", "multiple-choice log-likelihood (acc, acc_norm)"),
                      ("generate", "greedy generation (exact_match, contains)")):
        t = sub.add_parser(name, parents=[common], help=hlp)
        t.add_argument("--task", required=True, help="JSONL task file")
        t.add_argument("--num-fewshot", type=int, default=0)
        t.add_argument("--fewshot-seed", type=int, default=1234, help="lm-eval's default seed")
        t.add_argument("--chat", action="store_true", help="wrap each prompt in the Llama 3.1 chat format")
        t.add_argument("--on-overflow", choices=("truncate", "error"), default="truncate",
                       help="a prompt longer than the window: cut on the left and count it (lm-eval), or fail")
        if name == "generate":
            t.add_argument("--max-new-tokens", type=int, default=32)
            t.add_argument("--stop", nargs="*", default=[], help="stop strings (Python escapes: '\\n')")
    a = ap.parse_args(argv)
    if a.batch_size < 1 or (a.limit is not None and a.limit < 1):
        raise EvalError(f"--batch-size {a.batch_size} / --limit {a.limit}: expected positive integers")
    return a


def main(argv=None) -> int:
    from llama.generate import load_for_inference, load_tokenizer_for
    from llama.tokenizer import check_vocab

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("passkey", "needle"):  # long-context retrieval grids (issue 14): llama/passkey.py
        from llama import passkey

        return passkey.main(argv)
    a = parse_args(argv)
    tok = load_tokenizer_for(a.checkpoint, a.tokenizer)  # first: a missing tokenizer fails before any loading
    cfg, params, mesh = load_for_inference(a.checkpoint, mesh_text=a.mesh)
    if a.attention_impl:
        cfg = cfg.replace(attention_impl=a.attention_impl)
    check_vocab(tok, cfg.vocab_size)
    progress = None if a.no_progress else a.cmd
    config = {"command": a.cmd, "args": vars(a), "model": cfg, "tokenizer": str(tok.path)}
    if a.cmd == "ppl":
        ids, texts, files, run_ctx = _ppl_inputs(a, tok)
        ids, texts = ids[:a.limit], texts[:a.limit]
        context = a.context or run_ctx or cfg.max_seq_len
        metrics, samples = ppl_scores(params, cfg, ids, texts, bos=tok.bos_id, context=context,
                                      stride=a.stride or context, batch_size=a.batch_size, mesh=mesh, progress=progress)
        task = a.name or ("heldout" if a.heldout else os.path.splitext(os.path.basename(files[0].rstrip("/")))[0])
    else:
        examples = read_task(a.task, a.cmd)
        contexts = fewshot_contexts(examples, a.num_fewshot, a.fewshot_seed)[:a.limit]  # shots from the whole file
        examples = examples[:a.limit]
        files = [a.task]
        task = a.name or os.path.splitext(os.path.basename(a.task))[0]
        if a.cmd == "choice":
            metrics, samples = choice_scores(params, cfg, tok, examples, contexts, batch_size=a.batch_size,
                                             chat=a.chat, overflow=a.on_overflow, mesh=mesh, progress=progress)
        else:
            stop = [s.encode().decode("unicode_escape") for s in a.stop]
            metrics, samples = generate_scores(params, cfg, tok, examples, contexts, batch_size=a.batch_size,
                                               max_new_tokens=a.max_new_tokens, stop=stop, chat=a.chat,
                                               overflow=a.on_overflow, mesh=mesh, progress=progress)
    if metrics.get("truncated"):
        print(f"note: {metrics['truncated']} example(s) were cut on the left to fit the window of "
              f"{cfg.max_seq_len} tokens (samples: truncated_tokens)", file=sys.stderr)
    write_outputs(a.out, task, metrics, samples, config=config, data_files=files + [str(tok.path)])
    return 0


if __name__ == "__main__":
    from llama import cli, host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work

    code = cli.command(main)()  # EvalError, CheckpointError, OSError, ...: one "error:" line naming the input, 2
    # Every output is committed (renamed into place) by now. The interpreter's own teardown (jax's and grain's
    # atexit hooks, then freeing every module) takes 0.4-0.9 s on the 2-core benchmark machine, a fifth of a
    # whole `choice` run (docs/benchmarks.md); skip it once the streams are flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
