"""Cross-backend / cross-dtype / cross-commit comparison: a fixed probe and a diff of two probe reports.

    python -m llama.compare run  --checkpoint DIR --out REPORT [--compute-dtype float32|bfloat16]
    python -m llama.compare run  --init llama3.2-1b --out REPORT --train-steps 0     (random weights)
    python -m llama.compare diff REPORT_A REPORT_B [--tolerances max_abs=1e-3,kl=1e-5,top1=0.99] --out DIR

`run` loads a model checkpoint (llama.checkpoint.load_model), builds a fixed token batch from a seed (numpy,
so every backend sees the same ids) and records, on the current backend:
  - logits of the batch, compactly: per position the top-k values and ids, full-precision (float32)
    summary statistics over the whole vocabulary (logsumexp, max, mean, std, entropy), the logits of a
    fixed uniform sample of vocabulary ids, and the full-vocabulary logits of a few positions (of every
    position when that fits in `full_logits_max_bytes`);
  - greedy continuation ids of the first `prompt_len` tokens of each row;
  - the losses of `train_steps` optimizer steps from the checkpoint on the same fixed batch.
The report is a directory: report.json (probe settings, losses, greedy ids, config), probe.npz (arrays)
and manifest.json (llama.manifest). It is written to a temp directory and renamed.

`diff` compares two reports of the same probe (same tokens) and writes diff.md, diff.json and diff.png;
it prints the table and exits 1 when a `--tolerances` bound is exceeded (2 on bad input). The metrics and
their approximations are documented on `diff_reports`.

Python API: ProbeConfig, probe_tokens(cfg, probe), run_probe(cfg, params, probe) -> (report, arrays),
write_report(out, report, arrays, ...), load_report(dir), diff_reports(a, b) -> metrics,
check_tolerances(metrics, tolerances) -> violations, write_diff(out, metrics, a, b), main(argv) -> exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama import cli, manifest
from llama.config import ATTENTION_IMPLS

REPORT_JSON, REPORT_NPZ = "report.json", "probe.npz"
REPORT_FILES = {REPORT_JSON, REPORT_NPZ, "manifest.json"}


class CompareError(ValueError):
    """Bad input to the probe or the diff: a missing report, mismatched probes, an unknown tolerance."""


@dataclass(frozen=True)
class ProbeConfig:
    seed: int = 0
    batch: int = 2  # B
    seq_len: int = 64  # T
    top_k: int = 64
    vocab_sample: int = 256  # logits of this many uniformly drawn vocabulary ids at every position
    full_positions: tuple[int, ...] = (0, -1)  # full-vocab logits of these positions (negative from the end)
    full_logits_max_bytes: int = 16 << 20  # ... or of every position when B*T*V*4 bytes fit in this
    prompt_len: int = 8  # greedy continuation of tokens[:, :prompt_len]
    gen_len: int = 16
    train_steps: int = 4  # optimizer steps from the checkpoint on the fixed batch; 0 skips
    train_lr: float = 1e-3  # constant AdamW learning rate of those steps

    def to_dict(self) -> dict:
        return manifest.to_jsonable(self)


# ------------------------------------------------------------------------------------------- the probe
def probe_tokens(vocab_size: int, bos_id: int, probe: ProbeConfig) -> np.ndarray:
    """The fixed batch [B, T] int32: BOS then uniform ids, from numpy's PCG64 (backend-independent)."""
    rng = np.random.default_rng(probe.seed)
    tokens = rng.integers(0, vocab_size, size=(probe.batch, probe.seq_len), dtype=np.int64)
    tokens[:, 0] = bos_id
    return tokens.astype(np.int32)


def vocab_sample_ids(vocab_size: int, probe: ProbeConfig) -> np.ndarray:
    rng = np.random.default_rng([probe.seed, 1])
    n = min(probe.vocab_sample, vocab_size)
    return np.sort(rng.choice(vocab_size, size=n, replace=False)).astype(np.int32)


def full_logit_positions(vocab_size: int, probe: ProbeConfig) -> np.ndarray:
    T = probe.seq_len
    if probe.batch * T * vocab_size * 4 <= probe.full_logits_max_bytes:
        return np.arange(T, dtype=np.int32)
    return np.unique([p % T for p in probe.full_positions]).astype(np.int32)


def logit_summary(logits, top_k: int, sample_ids, full_positions) -> dict[str, Any]:
    """logits [B, T, V] float32 -> the compact record (jit-able; nothing [B, T, V] leaves the device)."""
    import jax
    import jax.numpy as jnp

    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    logp = logits - lse[..., None]
    values, indices = jax.lax.top_k(logits, top_k)  # [B, T, k]
    return {
        "topk_values": values, "topk_indices": indices.astype(jnp.int32),
        "logsumexp": lse, "max": jnp.max(logits, -1), "mean": jnp.mean(logits, -1), "std": jnp.std(logits, -1),
        "entropy": -jnp.sum(jnp.exp(logp) * logp, -1),
        "sample_values": logits[:, :, sample_ids],  # [B, T, S]
        "full_logits": logits[:, full_positions],  # [B, P, V]
    }


def _logits(params, tokens, sample_ids, full_positions, *, cfg, top_k: int):
    from llama import model

    return logit_summary(model.forward(params, tokens, cfg=cfg), top_k, sample_ids, full_positions)


@functools.cache
def _logits_jit():
    """Built on first use (importing this module does not import jax) and cached, so repeated probes of one
    config in a process compile once."""
    import jax

    return jax.jit(_logits, static_argnames=("cfg", "top_k"))


def _greedy(params, tokens: np.ndarray, cfg, probe: ProbeConfig, mesh=None) -> np.ndarray:
    """Greedy ids [B, gen_len] continuing tokens[:, :prompt_len], by llama.generate with no stop ids (so every
    row has gen_len ids and the continuations compare position by position)."""
    from llama import generate
    from llama.sampling import GREEDY

    if mesh is not None:
        params = generate.shard_params(params, cfg, mesh)
    result = generate.generate(params, [list(r) for r in tokens[:, :probe.prompt_len]], cfg=cfg,
                               max_new_tokens=probe.gen_len, sampling=GREEDY, stop_ids=[], mesh=mesh)
    out = np.full((len(result.tokens), probe.gen_len), -1, np.int32)
    for i, row in enumerate(result.tokens):
        out[i, :len(row)] = row
    return out


def _train_losses(cfg, params, tokens: np.ndarray, probe: ProbeConfig, mesh=None) -> tuple[np.ndarray, list[float]]:
    """Losses of `train_steps` steps of the trainer's own jitted step (llama.train.make_train_step) on the
    fixed batch, starting from the checkpoint's parameters (as float32 masters, as the trainer keeps them).
    AdamW at a constant `train_lr`, no weight decay, the trainer's default clipping. The loss at step i is
    the loss before update i, so losses[0] is the checkpoint's own loss on the batch. Returns (losses, wall
    seconds of each step)."""
    import jax

    from llama import optim, train
    from sharding.rules import MeshConfig, make_mesh

    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    B, T = tokens.shape
    tcfg = train.TrainConfig(
        model=cfg.replace(param_dtype="float32"), steps=probe.train_steps, batch_size=B, seq_len=T - 1,
        optimizer=optim.OptimizerConfig(peak_lr=probe.train_lr, end_lr=probe.train_lr, warmup_steps=0,
                                        decay_steps=max(probe.train_steps, 1), weight_decay=0.0),
        sample_tokens=0, seed=probe.seed)
    init, step = _train_fns(tcfg, mesh)
    state = init(params)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.zeros((B, T - 1), np.int32),
             "positions": np.broadcast_to(np.arange(T - 1, dtype=np.int32), (B, T - 1)).copy(),
             "loss_mask": np.ones((B, T - 1), np.float32)}
    losses, seconds = [], []
    for _ in range(probe.train_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(np.float32(jax.device_get(metrics["loss"])))
        seconds.append(time.perf_counter() - t0)
    return np.asarray(losses, np.float32), seconds


@functools.lru_cache(maxsize=8)
def _train_fns(tcfg, mesh):
    """(init from given params, the trainer's jitted step), cached per (config, mesh) like `_jitted`."""
    import jax
    import jax.numpy as jnp

    from llama import optim, train

    _, step = train.make_train_step(tcfg, mesh)
    tx = optim.make_optimizer(tcfg.optimizer)

    def init(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
        return train.TrainState(jnp.int32(0), p, tx.init(p), jnp.zeros((2,), jnp.uint32))

    return jax.jit(init, out_shardings=train.state_shardings(tcfg, mesh)), step


def run_probe(cfg, params, probe: ProbeConfig = ProbeConfig(), *, mesh=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Runs the probe on the current default backend. cfg's compute_dtype/attention_impl are used as given.
    Returns (report dict, arrays dict)."""
    import jax

    if probe.prompt_len + probe.gen_len > cfg.max_seq_len:
        raise CompareError(f"prompt_len + gen_len = {probe.prompt_len + probe.gen_len} > max_seq_len={cfg.max_seq_len}")
    tokens = probe_tokens(cfg.vocab_size, cfg.bos_id, probe)
    sample_ids = vocab_sample_ids(cfg.vocab_size, probe)
    full_pos = full_logit_positions(cfg.vocab_size, probe)
    timing = {}

    top_k = min(probe.top_k, cfg.vocab_size)
    t0 = time.perf_counter()
    out = _logits_jit()(params, tokens, sample_ids, full_pos, cfg=cfg, top_k=top_k)
    arrays = {k: np.asarray(v) for k, v in jax.device_get(out).items()}
    timing["logits_s"] = time.perf_counter() - t0  # wall seconds, compilation included
    t0 = time.perf_counter()
    jax.block_until_ready(_logits_jit()(params, tokens, sample_ids, full_pos, cfg=cfg, top_k=top_k))
    timing["logits_run_s"] = time.perf_counter() - t0  # compiled: the forward's own cost
    t0 = time.perf_counter()
    greedy = _greedy(params, tokens, cfg, probe, mesh) if probe.gen_len else np.zeros((probe.batch, 0), np.int32)
    timing["greedy_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses, step_s = (_train_losses(cfg, params, tokens, probe, mesh) if probe.train_steps
                      else (np.zeros((0,), np.float32), []))
    timing["train_s"] = time.perf_counter() - t0
    timing["train_step_s"] = float(np.median(step_s[1:])) if len(step_s) > 1 else None  # without the compile step
    arrays.update(tokens=tokens, sample_ids=sample_ids, full_positions=full_pos, greedy=greedy.astype(np.int32),
                  losses=losses)
    report = {
        "probe": probe.to_dict(),
        "model": cfg.to_dict(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "losses": [float(x) for x in losses],  # float32 -> float64 is exact, so JSON round-trips bit-exactly
        "greedy": greedy.tolist(),
        "timing": timing,  # the only field that differs between identical runs
    }
    return manifest.to_jsonable(report), arrays


def is_report(path: str) -> bool:
    """A directory `write_report` made: report.json and probe.npz, and nothing but the report's files."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return {REPORT_JSON, REPORT_NPZ} <= names and names <= REPORT_FILES


def check_out(out: str, sources: dict) -> None:
    """`run --out` may replace only an earlier report (a training run, a checkpoint or any other directory or
    file there is an error naming it), and never overlaps what the probe reads."""
    manifest.check_no_overlap(out, sources, "--out")
    manifest.check_replaceable(out, "--out", is_report, "a comparison report (report.json, probe.npz, "
                               "manifest.json written by `llama.compare run`)")


def write_report(out: str, report: dict, arrays: dict[str, np.ndarray], **manifest_kwargs) -> str:
    """Writes REPORT/{report.json, probe.npz, manifest.json} via a temp dir + rename; replaces `out` when it
    is an earlier report (anything else there: manifest.OutputError)."""
    out = os.path.abspath(out)
    check_out(out, {})
    tmp = manifest.staging_dir(out, overwrite=True)
    try:
        with open(os.path.join(tmp, REPORT_JSON), "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
        np.savez_compressed(os.path.join(tmp, REPORT_NPZ), **arrays)
        manifest.write_manifest(tmp, **manifest_kwargs)
        manifest.commit_dir(tmp, out)  # an existing report is moved aside and deleted only once this one is in place
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise manifest.naming(e, out)
    return out


def load_report(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    for name in (REPORT_JSON, REPORT_NPZ):
        if not os.path.isfile(os.path.join(path, name)):
            raise CompareError(f"{path}: not a probe report (no {name}; make one with `python -m llama.compare run`)")
    try:
        with open(os.path.join(path, REPORT_JSON)) as f:
            report = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{os.path.join(path, REPORT_JSON)}: not valid JSON ({e}); truncated? run the probe "
                           "again") from None
    if not isinstance(report, dict) or not {"probe", "model", "losses"} <= set(report):
        raise CompareError(f"{os.path.join(path, REPORT_JSON)}: not a probe report (expected probe, model, losses)")
    try:
        with np.load(os.path.join(path, REPORT_NPZ)) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CompareError(f"{os.path.join(path, REPORT_NPZ)}: unreadable ({type(e).__name__}: {e}); truncated? "
                           "run the probe again") from None
    return report, arrays


# -------------------------------------------------------------------------------------------- the diff
def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _kl_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact KL(P_a || P_b) in float64 from full logits [..., V] -> [...]."""
    la, lb = _log_softmax64(a), _log_softmax64(b)
    return np.sum(np.exp(la) * (la - lb), -1)


def _kl_topk(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position KL(P_a || P_b) of the coarse-grained distributions over {each id in both top-k sets} +
    {everything else}. By the log-sum inequality (data processing) this is a LOWER BOUND on the true KL;
    it is tight when the shared top-k ids hold almost all the mass of both. Returns (kl [B,T], matched
    |dlogit| [B,T,k,k] masked, match mask [B,T,k,k])."""
    va, ia, lse_a = a["topk_values"].astype(np.float64), a["topk_indices"], a["logsumexp"].astype(np.float64)
    vb, ib, lse_b = b["topk_values"].astype(np.float64), b["topk_indices"], b["logsumexp"].astype(np.float64)
    match = ia[..., :, None] == ib[..., None, :]  # [B, T, k, k]
    in_b = match.any(-1)  # [B, T, k]: id i of a's top-k is also in b's
    vb_at_a = np.where(in_b, np.sum(np.where(match, vb[..., None, :], 0.0), -1), -np.inf)  # b's logit of a's id i
    lpa = np.where(in_b, va - lse_a[..., None], -np.inf)
    lpb = np.where(in_b, vb_at_a - lse_b[..., None], -np.inf)
    pa = np.exp(lpa)
    shared = np.sum(np.where(in_b, pa * (np.where(in_b, lpa, 0.0) - np.where(in_b, lpb, 0.0)), 0.0), -1)
    # Rest-bucket masses, 1 - sum(p) via expm1 of log-sum-exps for precision; clipped at 0 because the
    # float32 logsumexp from the device carries ~1e-7 relative rounding.
    rest_a = np.clip(-np.expm1(_logsumexp(lpa)), 0.0, 1.0)
    rest_b = np.clip(-np.expm1(_logsumexp(lpb)), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(rest_a > 0, rest_a * (np.log(rest_a) - np.log(np.maximum(rest_b, 1e-300))), 0.0)
    diffs = np.abs(va[..., :, None] - vb[..., None, :])
    return shared + rest, diffs, match


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, -1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m_safe + np.log(np.sum(np.exp(x - m_safe[..., None]), -1))


def _first_divergence(a: np.ndarray, b: np.ndarray) -> list[int | None]:
    out = []
    for ra, rb in zip(a, b):
        n = min(len(ra), len(rb))
        diff = np.nonzero(ra[:n] != rb[:n])[0]
        out.append(int(diff[0]) if len(diff) else (None if len(ra) == len(rb) else n))
    return out


def diff_reports(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict[str, Any]:
    """Metrics of report B against reference report A (both from `load_report`). All in float64.

    - max_abs: largest |logit_A - logit_B| over everything both stored: ids in both top-k sets, the fixed
      vocabulary sample, and the full-logit positions.
    - mean_abs: mean |logit_A - logit_B| over the full vocabulary where full logits are stored at every
      position, otherwise over the fixed uniform vocabulary sample (an unbiased estimate of the full mean).
    - kl: mean over positions of KL(P_A || P_B): exact (full logits) at positions with full logits, the
      top-k lower bound of `_kl_topk` elsewhere; kl_full and kl_topk report each alone.
    - top1: fraction of positions whose argmax agrees (ties in low precision count as disagreements).
    - greedy_first_divergence: per row, the first generated index where the greedy ids differ (None: same).
    - losses: both trajectories and their largest absolute difference.
    """
    (ra, xa), (rb, xb) = a, b
    if ra["probe"] != rb["probe"]:
        raise CompareError(f"the two reports ran different probes: {ra['probe']} vs {rb['probe']}")
    if not np.array_equal(xa["tokens"], xb["tokens"]):
        raise CompareError("the two reports' token batches differ (different vocab_size/bos_id/seed?)")
    m: dict[str, Any] = {"a": {k: ra.get(k) for k in ("backend", "device_kind", "checkpoint")},
                         "b": {k: rb.get(k) for k in ("backend", "device_kind", "checkpoint")}}
    # Comparing backends means comparing one checkpoint on both; two checkpoints differ by their weights too.
    m["same_checkpoint"] = ra.get("checkpoint") == rb.get("checkpoint")
    m["a"]["compute_dtype"], m["b"]["compute_dtype"] = ra["model"]["compute_dtype"], rb["model"]["compute_dtype"]

    kl_topk, topk_diffs, match = _kl_topk(xa, xb)
    per_pos_max = np.max(np.where(match, topk_diffs, 0.0), axis=(-1, -2))  # [B, T]
    sample = np.abs(xa["sample_values"].astype(np.float64) - xb["sample_values"].astype(np.float64))  # [B, T, S]
    per_pos_max = np.maximum(per_pos_max, sample.max(-1))
    kl = kl_topk.copy()
    full_pos = xa["full_positions"]
    full = np.abs(xa["full_logits"].astype(np.float64) - xb["full_logits"].astype(np.float64))  # [B, P, V]
    if full.size:
        kl_exact = _kl_full(xa["full_logits"], xb["full_logits"])  # [B, P]
        kl[:, full_pos] = kl_exact
        per_pos_max[:, full_pos] = np.maximum(per_pos_max[:, full_pos], full.max(-1))
        m["kl_full"] = float(kl_exact.mean())
    all_full = len(full_pos) == xa["tokens"].shape[1]
    m.update(
        max_abs=float(per_pos_max.max()),
        mean_abs=float(full.mean() if all_full else sample.mean()),
        mean_abs_over="full vocabulary" if all_full else f"uniform sample of {sample.shape[-1]} vocabulary ids",
        kl=float(kl.mean()),
        kl_topk=float(kl_topk.mean()),
        topk_overlap=float(match.any(-1).mean()),
        logsumexp_max_abs=float(np.abs(xa["logsumexp"].astype(np.float64) - xb["logsumexp"]).max()),
        top1=float(np.mean(xa["topk_indices"][..., 0] == xb["topk_indices"][..., 0])),
        per_position_max_abs=per_pos_max.max(0).tolist(),
        per_position_kl=kl.mean(0).tolist(),
    )
    div = _first_divergence(xa["greedy"], xb["greedy"])
    m["greedy_first_divergence_per_row"] = div
    m["greedy_first_divergence"] = min((d for d in div if d is not None), default=None)
    m["greedy_len"] = int(xa["greedy"].shape[1])
    la, lb = np.asarray(ra["losses"], np.float64), np.asarray(rb["losses"], np.float64)
    m["losses_a"], m["losses_b"] = la.tolist(), lb.tolist()
    m["loss"] = float(np.abs(la - lb).max()) if len(la) and len(la) == len(lb) else None
    return m


CHECKPOINT_WARNING = ("A and B probed different checkpoints, so the differences below include the weights', "
                      "not only the backends'")

# Bound direction: "max" bounds must not be exceeded; "min" bounds must be reached.
TOLERANCES = {"max_abs": "max", "mean_abs": "max", "kl": "max", "loss": "max", "top1": "min", "greedy": "min"}


def parse_tolerances(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in TOLERANCES:
            raise CompareError(f"--tolerances item {item!r}: expected NAME=VALUE with NAME in {sorted(TOLERANCES)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise CompareError(f"--tolerances {key}={value!r}: not a number") from None
    return out


def check_tolerances(m: dict, tol: dict[str, float]) -> list[str]:
    """Human-readable violations (empty when every bound holds). `greedy=N`: the first N generated ids of
    every row must agree."""
    bad = []
    for key, bound in tol.items():
        if key == "greedy":
            value = m["greedy_len"] if m["greedy_first_divergence"] is None else m["greedy_first_divergence"]
        else:
            value = m[key]
        if value is None:
            bad.append(f"{key}: not measured (the reports have no {key})")
        elif (TOLERANCES[key] == "max" and value > bound) or (TOLERANCES[key] == "min" and value < bound):
            op = "<=" if TOLERANCES[key] == "max" else ">="
            bad.append(f"{key} = {value:.6g}, required {op} {bound:g}")
    return bad


def markdown(m: dict, a_path: str, b_path: str, violations: list[str] | None = None) -> str:
    def side(s):
        return f"{s['backend']} ({s['device_kind']}), compute {s['compute_dtype']}, checkpoint `{s.get('checkpoint')}`"

    rows = [
        ("max abs logit diff", f"{m['max_abs']:.6g}", "over both top-k, the vocab sample and full-logit positions"),
        ("mean abs logit diff", f"{m['mean_abs']:.6g}", m["mean_abs_over"]),
        ("mean KL(A||B)", f"{m['kl']:.6g}", "exact where full logits stored, else top-k lower bound"),
        ("mean KL, top-k bound", f"{m['kl_topk']:.6g}", f"top-k id overlap {m['topk_overlap']:.4f}"),
        ("top-1 agreement", f"{m['top1']:.6g}", "fraction of positions"),
        ("logsumexp max abs diff", f"{m['logsumexp_max_abs']:.6g}", ""),
        ("greedy first divergence", str(m["greedy_first_divergence"]),
         f"of {m['greedy_len']} generated ids; per row {m['greedy_first_divergence_per_row']}"),
        ("train loss max abs diff", "n/a" if m["loss"] is None else f"{m['loss']:.6g}", f"{len(m['losses_a'])} steps"),
    ]
    warn = [] if m.get("same_checkpoint", True) else [f"**Warning: {CHECKPOINT_WARNING}**\n"]
    lines = [f"# Probe diff\n\nA = `{a_path}`: {side(m['a'])}  \nB = `{b_path}`: {side(m['b'])}\n", *warn,
             "| metric | value | note |", "|---|---|---|", *[f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]]
    if m["losses_a"]:
        lines += ["\n| step | loss A | loss B | abs diff |", "|---|---|---|---|"]
        for i, (la, lb) in enumerate(zip(m["losses_a"], m["losses_b"])):
            lines.append(f"| {i} | {la:.8g} | {lb:.8g} | {abs(la - lb):.3g} |")
    if violations is not None:
        lines.append("\n**Tolerances: " + ("all within bounds**" if not violations else "EXCEEDED**: " + "; ".join(violations)))
    return "\n".join(lines) + "\n"


def plot(m: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    if m["losses_a"]:
        ax.plot(m["losses_a"], "o-", label=f"A: {m['a']['backend']} {m['a']['compute_dtype']}")
        ax.plot(m["losses_b"], "x--", label=f"B: {m['b']['backend']} {m['b']['compute_dtype']}")
        ax.legend()
    ax.set(title="train loss from the checkpoint", xlabel="step", ylabel="loss")
    ax = axes[1]
    floor = 1e-12  # log axis: identical values would vanish
    ax.semilogy(np.maximum(m["per_position_max_abs"], floor), label="max |dlogit|")
    ax.semilogy(np.maximum(m["per_position_kl"], floor), label="KL(A||B)")
    ax.set(title="per position (max / mean over the batch)", xlabel="position")
    ax.legend()
    return manifest.save_figure(fig, path, dpi=100)


def write_diff(out: str, m: dict, a_path: str, b_path: str, violations: list[str] | None = None) -> str:
    manifest.check_no_overlap(out, {"report A": a_path, "report B": b_path}, "--out")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise manifest.OutputError(f"--out {out}: exists and is not a directory (expected a directory for diff.md, "
                                   "diff.json, diff.png)")
    os.makedirs(out, exist_ok=True)
    md = markdown(m, a_path, b_path, violations)
    manifest.atomic_write(os.path.join(out, "diff.md"), md)
    manifest.atomic_write(os.path.join(out, "diff.json"), json.dumps(
        {"a": a_path, "b": b_path, "checkpoint_a": m["a"].get("checkpoint"), "checkpoint_b": m["b"].get("checkpoint"),
         "metrics": m, "violations": violations}, indent=1, sort_keys=True) + "\n")
    plot(m, os.path.join(out, "diff.png"))
    return md


# ------------------------------------------------------------------------------------------------ CLI
def _cmd_run(args) -> int:
    import jax

    from llama import checkpoint

    check_out(args.out, {"--checkpoint": args.checkpoint})  # before anything is loaded or computed
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)

    mesh = None
    if args.mesh:
        from sharding.rules import MeshConfig, make_mesh

        mesh = make_mesh(MeshConfig.parse(args.mesh), jax.devices())  # axes left out are 1, as everywhere
    if args.checkpoint:
        cfg, params = checkpoint.load_model(args.checkpoint, mesh=mesh)
        source = os.path.abspath(args.checkpoint)
    else:
        cfg, params = random_model(args.init, args.init_seed, mesh)
        source = f"random init of preset {args.init!r}, seed {args.init_seed}"
    changes = {k: v for k, v in (("compute_dtype", args.compute_dtype), ("attention_impl", args.attention_impl)) if v}
    cfg = cfg.replace(**changes)
    probe = ProbeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeConfig)
                           if getattr(args, f.name, None) is not None})
    report, arrays = run_probe(cfg, params, probe, mesh=mesh)
    report["checkpoint"] = source
    out = write_report(args.out, report, arrays, config={"model": cfg, "probe": probe}, mesh=mesh,
                       seeds={"probe": probe.seed, "init": args.init_seed if args.init else None},
                       data_files=[args.checkpoint] if args.checkpoint else [],
                       extra={"tool": "llama.compare run", "checkpoint": source})
    print(f"probe on {report['backend']} ({report['device_kind']}), compute {cfg.compute_dtype}: "
          f"losses {report['losses']}, wrote {out}")
    return 0


def random_model(preset_name: str, seed: int, mesh=None):
    """(cfg, params) of a preset at random init, drawn on the host CPU so that every backend probes the
    very same bits (jax.random's float transforms are not guaranteed bit-equal across backends), then
    placed on the default device or the mesh. Lets a probe cover a full-size architecture without weights."""
    import jax

    from llama import config, model

    try:
        cfg = config.preset(preset_name)
    except config.ConfigError as e:
        raise CompareError(f"--init: {e}") from None
    with jax.default_device(jax.devices("cpu")[0]):
        params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    if mesh is not None:
        from sharding.rules import param_shardings

        return cfg, jax.device_put(params, param_shardings(model.param_specs(cfg), mesh))
    return cfg, jax.device_put(params, jax.devices()[0])


def _cmd_diff(args) -> int:
    tol = parse_tolerances(args.tolerances)
    manifest.check_no_overlap(args.out, {"report A": args.a, "report B": args.b}, "--out")  # before any work
    m = diff_reports(load_report(args.a), load_report(args.b))
    if not m["same_checkpoint"]:
        print(f"warning: {CHECKPOINT_WARNING}: A {m['a']['checkpoint']}, B {m['b']['checkpoint']}", file=sys.stderr)
    violations = check_tolerances(m, tol) if tol else None
    md = write_diff(args.out, m, args.a, args.b, violations)
    print(md)
    print(f"wrote {args.out}/diff.md, diff.json, diff.png")
    return 1 if violations else 0


# Smallest value of each numeric probe flag (ProbeConfig); train_lr must also be finite.
_PROBE_MIN = {"seed": 0, "batch": 1, "seq_len": 2, "top_k": 1, "vocab_sample": 1, "full_logits_max_bytes": 0,
              "prompt_len": 1, "gen_len": 0, "train_steps": 0}


@cli.command
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m llama.compare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the fixed probe on this backend and write a report directory")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint or train run directory (llama.checkpoint.load_model)")
    src.add_argument("--init", metavar="PRESET", help="a random init of a preset instead (llama.config.PRESETS)")
    r.add_argument("--init-seed", type=int, default=0)
    r.add_argument("--out", required=True, help="report directory to write (an earlier report there is replaced; "
                   "anything else is an error)")
    r.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"))
    r.add_argument("--attention-impl", choices=ATTENTION_IMPLS)
    r.add_argument("--mesh", help="e.g. data=1,fsdp=-1,tensor=1 (default: one device)")
    r.add_argument("--matmul-precision", choices=("default", "high", "highest"),
                   help="jax_default_matmul_precision for the whole probe; 'highest' keeps float32 matmuls "
                        "in full float32 on GPUs, which otherwise may use TF32 for them")
    for f in dataclasses.fields(ProbeConfig):
        if f.type in ("int", "float"):
            kind = (cli.number(_PROBE_MIN[f.name], integer=True) if f.type == "int"
                    else cli.number(0, math.inf, lo_open=True, hi_open=True))
            r.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, help=f"default {f.default}")
    d = sub.add_parser("diff", help="compare report B against reference report A")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--tolerances", help="e.g. max_abs=1e-3,mean_abs=1e-4,kl=1e-5,top1=0.99,loss=1e-4,greedy=16")
    d.add_argument("--out", required=True, help="directory for diff.md, diff.json, diff.png")
    args = p.parse_args(argv)
    return _cmd_run(args) if args.cmd == "run" else _cmd_diff(args)  # errors: cli.command (exit 2)


if __name__ == "__main__":
    from llama import host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work
    sys.exit(main())
