"""Pre-training: the typed config, the pure train step, Orbax checkpoints, and one linear `main()`.

    python -m llama.train --config experiments/cpu_small.py [--set optimizer.peak_lr=3e-4 ...]
                          [--data 'my/texts/*.txt'] [--out runs/cpu_small]

API (also what the sharding tests call):
    cfg = load_experiment("experiments/cpu_small.py")            # a TrainConfig; apply_overrides(cfg, [...])
    init_state, step = make_train_step(cfg, mesh)                # both jitted with explicit shardings
    state = init_state(seed)                                     # TrainState, created already sharded
    state, metrics = step(state, batch)                          # state donated; batch: numpy dicts [B, T]
    state_shardings(cfg, mesh)                                   # the TrainState of NamedShardings used above
    train_step(state, batch, *, cfg, tx, mesh=None)              # the pure function behind `step`

The state's shardings come from `sharding.rules`: params from `param_specs` through `param_shardings`; the
AdamW moments mirror the params (`optax.tree_map_params`) and take the same shardings; scalars replicate.

Checkpoints: OUT/checkpoints/<step>/ with items "params" (the bare param pytree, as in a model checkpoint),
"opt_state", "config" ({"model": ..., "train": ...}), "data" (the input iterator's state) and "meta"
({"step", "rng"}). Orbax writes each step to a temporary directory and renames it when complete, so a
killed run never leaves a step that restores wrongly; the same command resumes from the latest one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama import loss as llama_loss
from llama import model as llama_model
from llama import eval as llama_eval
from llama import metrics as llama_metrics
from llama import optim
from llama.config import ConfigError, ModelConfig
from llama.lora import LoraConfig
from sharding import distributed
from sharding.rules import MeshConfig, batch_sharding, make_mesh, param_shardings, replicated

BATCH_KEYS = llama_eval.ROW_KEYS  # a batch's arrays (input_pipeline.packing.KEYS: the pipeline's rows)


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DataConfig:
    """What to train on; `input_pipeline` reads, tokenizes, shuffles and packs it."""

    paths: str | None = None  # glob of files; None = the CPython docs topics (pydoc_data.topics)
    # input_pipeline.Source formats: text, jsonl, parquet, array_record, hf, prepared; segments (pre-training text
    # with an integer loss weight per span, input_pipeline/chat.py); chat and preference (objective sft, dpo).
    format: str = "text"
    separator: str | None = None  # text only: None = one document per file (see input_pipeline.Source)
    # A tokenizer file; "llama3" = the Llama 3 tokenizer from `llama-models`; None = train a SentencePiece
    # BPE with model.vocab_size pieces on the training text (OUT/tokenizer.model).
    tokenizer: str | None = None
    # Llama 3 masks attention between documents packed in one row (paper section 3.2). False is the ablation:
    # plain causal attention over the whole row with positions 0..T-1, as GPT-style packing does.
    document_mask: bool = True
    # Held-out evaluation (TrainConfig.eval_every): separate files (same format and separator as `paths`), or
    # this share of the training documents, chosen by a stable hash of each one and never trained on.
    eval_paths: str | None = None
    eval_share: float = 0.0
    # format=chat / preference / segments: a row longer than seq_len is an "error" (naming file:line) or is
    # "drop"ped (counted in the pipeline's stats); never truncated (input_pipeline/chat.py).
    overlong: str = "error"


OBJECTIVES = ("pretrain", "sft", "dpo")


@dataclass(frozen=True)
class DpoConfig:
    """Direct Preference Optimization as Llama 3 does it (paper section 4.1.4; docs/post_training.md).

    beta: 0.1, the paper's. nll_coef: weight of an NLL term on the chosen responses, 0.2 in the paper; it is the
    mean per-token NLL over all chosen completion tokens of the batch (TRL's loss_type "sft"). mask_special: header
    and termination tokens out of chosen and rejected (the paper's choice; False = TRL's completion mask, which
    keeps <|eot_id|>). label_smoothing: conservative DPO's eps (0 = plain sigmoid loss). reference: a checkpoint
    (model checkpoint, training run or Hugging Face directory) for the frozen reference policy; None = the
    starting policy (init_from, else the seed's initial parameters)."""

    beta: float = 0.1
    nll_coef: float = 0.2
    mask_special: bool = True
    label_smoothing: float = 0.0
    reference: str | None = None


@dataclass(frozen=True)
class Stage:
    """A stage of a staged schedule (Llama 3's batch ramp and long-context stages, paper sections 3.4.1-3.4.2):
    from `start_step`, or from the step at which `start_tokens` tokens have been trained on, rows of `seq_len`
    tokens, `batch_size` of them per step. Give exactly one start. At a boundary the trainer recompiles its step
    and the input pipeline re-packs the stream at the new length (docs/long_context.md).

    `optimizer`: a learning-rate schedule of the stage's own, counted from its first step (warmup from 0 to
    peak_lr, cosine to end_lr, then held), for continued training that re-warms; it holds until a later stage
    gives another. None: the schedule before the stage continues. Only the schedule fields (optim.SCHEDULE_FIELDS)
    may differ from TrainConfig.optimizer: AdamW's moments carry across the boundary."""

    seq_len: int
    batch_size: int
    start_step: int | None = None
    start_tokens: float | None = None
    optimizer: optim.OptimizerConfig | None = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    optimizer: optim.OptimizerConfig = field(default_factory=optim.OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 8  # global rows per step (all micro-batches together)
    seq_len: int = 256  # T
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many and scanned
    z_loss: float = 0.0  # weight of mean(logsumexp^2) (PaLM section 5 uses 1e-4); 0 disables
    # Tokens per chunk of the fused output layer + cross-entropy (llama.loss): the float32 logits exist for one
    # chunk at a time. 0 = the plain path (whole [B, T, V] logits). Default: see docs/benchmarks.md.
    loss_chunk: int = llama_loss.LOSS_CHUNK
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    sample_tokens: int = 64  # generated after training; 0 disables
    sample_prompt: str = ""
    peak_flops: float = 0.0  # per device, for MFU; 0 = look the device kind up in metrics.PEAK_BF16_FLOPS
    # Held-out eval every this many steps and at the end (data.eval_*); 0 disables. pretrain: eval_loss/eval_ppl
    # (llama/eval.py); sft and dpo: the objective's own metrics on held-out rows (`evaluate_objective`).
    eval_every: int = 0
    eval_batches: int = 4  # fixed eval batches of batch_size x seq_len (make_eval_set; sft/dpo: chat.eval_rows)
    # Later stages (Stage); the first stage is (seq_len, batch_size) from step 0. Empty: one stage.
    stages: tuple[Stage, ...] = ()
    # "pretrain" (text, next-token loss), "sft" (data.format=chat: the same loss on assistant tokens only) or
    # "dpo" (data.format=preference, `dpo`); llama/loss.py holds the pure loss functions.
    objective: str = "pretrain"
    # Starting parameters: a model checkpoint (llama.checkpoint), a training run (its latest step) or a Hugging Face
    # directory (converted on the fly, llama.convert); None = random init from `seed`.
    init_from: str | None = None
    dpo: DpoConfig = field(default_factory=DpoConfig)
    # LoRA (llama/lora.py): None = full fine-tuning; else the base weights are frozen (TrainState.base) and only
    # the adapters are trained, hold optimizer state and are checkpointed (TrainState.params = the adapters).
    lora: LoraConfig | None = None

    def __post_init__(self):
        if _DEFER_CHECKS:  # apply_overrides: fields set one at a time are checked together at the end
            return

        def need(cond, msg):
            if not cond:
                raise ConfigError(f"TrainConfig: {msg}")

        need(self.model.param_dtype == "float32", f"model.param_dtype={self.model.param_dtype!r}; training keeps "
             "float32 master parameters (set model.compute_dtype='bfloat16' for bf16 matmuls)")
        for name in ("steps", "batch_size", "seq_len", "micro_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.batch_size % self.micro_batches == 0,
             f"batch_size={self.batch_size} is not divisible by micro_batches={self.micro_batches}")
        need(self.seq_len <= self.model.max_seq_len, f"seq_len={self.seq_len} > model.max_seq_len={self.model.max_seq_len}")
        need(self.z_loss >= 0, f"z_loss={self.z_loss} must be >= 0")
        need(self.loss_chunk >= 0, f"loss_chunk={self.loss_chunk} must be >= 0 (0 = whole logits)")
        need(self.eval_every >= 0 and self.eval_batches > 0, f"eval_every={self.eval_every} must be >= 0 and "
             f"eval_batches={self.eval_batches} > 0")
        need(0.0 <= self.data.eval_share < 1.0, f"data.eval_share={self.data.eval_share} must be in [0, 1)")
        need(not self.eval_every or bool(self.data.eval_paths or self.data.eval_share),
             f"eval_every={self.eval_every} needs eval data: data.eval_share (a held-out share) or data.eval_paths")
        stage_schedule(self)  # the stages' own checks
        need(self.objective in OBJECTIVES, f"objective={self.objective!r}: expected one of {OBJECTIVES}")
        need(self.data.overlong in ("error", "drop"), f"data.overlong={self.data.overlong!r}: expected error or drop")
        want = {"sft": "chat", "dpo": "preference"}.get(self.objective)
        if want:
            need(self.data.paths is not None and self.data.format == want, f"objective={self.objective} needs "
                 f"data.format={want} and data.paths (JSONL rows, docs/post_training.md); got data.format="
                 f"{self.data.format!r}, data.paths={self.data.paths!r}")
        else:
            need(self.data.format not in ("chat", "preference"), f"data.format={self.data.format} is for "
                 f"objective={'sft' if self.data.format == 'chat' else 'dpo'}, not {self.objective!r}")
        if self.objective == "dpo":
            d = self.dpo
            need(d.beta > 0 and d.nll_coef >= 0 and 0 <= d.label_smoothing < 0.5, f"dpo: beta={d.beta} must be > 0, "
                 f"nll_coef={d.nll_coef} >= 0, label_smoothing={d.label_smoothing} in [0, 0.5)")
            need(self.lora is None or d.reference is None, "dpo.reference with lora: not supported; the reference "
                 "of a LoRA run is its frozen base (the adapters start at B = 0, i.e. at the base)")
            need(self.data.document_mask, "objective=dpo needs data.document_mask=True: chosen and rejected share "
                 "a row as two segments (input_pipeline/chat.py)")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d["model"])
        d["optimizer"] = optim.OptimizerConfig(**d.get("optimizer", {}))
        d["mesh"] = MeshConfig(**d.get("mesh", {}))
        d["data"] = DataConfig(**d.get("data", {}))
        d["stages"] = tuple(Stage(**{**s, "optimizer": optim.OptimizerConfig(**s["optimizer"]) if s.get("optimizer")
                                     else None}) for s in d.get("stages", ()))
        d["dpo"] = DpoConfig(**d.get("dpo", {}))
        lo = d.get("lora")
        d["lora"] = LoraConfig(**{**lo, "targets": tuple(lo["targets"])}) if lo else None
        return cls(**d)


def stage_schedule(cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """[(start_step, seq_len, batch_size)] of every stage, the first from step 0, token starts resolved to the
    first step at which that many tokens have been trained on. ConfigError for a stage that does not fit."""
    out, tokens = [(0, cfg.seq_len, cfg.batch_size)], 0.0  # tokens: trained before out[-1] starts
    context = cfg.mesh.context
    for i, s in enumerate((None, *cfg.stages)):
        where = "TrainConfig" if s is None else f"TrainConfig.stages[{i - 1}]"
        if s is not None:
            start0, T0, B0 = out[-1]
            if (s.start_step is None) == (s.start_tokens is None):
                raise ConfigError(f"{where}: give exactly one of start_step and start_tokens")
            start = s.start_step if s.start_step is not None else \
                start0 + max(0, math.ceil((s.start_tokens - tokens) / (T0 * B0)))
            if start <= start0:
                raise ConfigError(f"{where} starts at step {start}, not after the previous stage's start {start0}")
            tokens += (start - start0) * T0 * B0
            out.append((start, s.seq_len, s.batch_size))
            if s.optimizer is not None:
                base = cfg.optimizer.replace(start_step=0)  # a stage's start_step is its first step (stage_at)
                fixed = [f.name for f in dataclasses.fields(base) if f.name not in optim.SCHEDULE_FIELDS
                         and getattr(s.optimizer, f.name) != getattr(base, f.name)]
                if fixed:
                    raise ConfigError(f"{where}.optimizer: only the schedule ({', '.join(optim.SCHEDULE_FIELDS)}) may "
                                      f"differ from TrainConfig.optimizer (AdamW's state carries over); got {fixed}")
        _, T, B = out[-1]
        if T <= 0 or B <= 0 or B % cfg.micro_batches or T > cfg.model.max_seq_len:
            raise ConfigError(f"{where}: seq_len={T}, batch_size={B}: expected positive sizes, seq_len <= "
                              f"model.max_seq_len={cfg.model.max_seq_len}, batch_size divisible by "
                              f"micro_batches={cfg.micro_batches}")
        if context > 1 and T % (2 * context):
            raise ConfigError(f"{where}: seq_len={T} is not divisible by 2 x mesh.context = {2 * context} chunks "
                              "(context parallelism's load-balanced layout, input_pipeline/context.py)")
    return out


def stage_at(cfg: TrainConfig, step: int) -> tuple[int, TrainConfig]:
    """(index, config) of the stage that step `step` (0-based) trains in: cfg with that stage's seq_len and
    batch_size, and the optimizer of the last stage up to it that gives one (its schedule from that stage's start)."""
    schedule = stage_schedule(cfg)
    i = max(j for j, (start, _, _) in enumerate(schedule) if start <= step)
    opt = cfg.optimizer
    for j in range(1, i + 1):
        if cfg.stages[j - 1].optimizer is not None:
            opt = cfg.stages[j - 1].optimizer.replace(start_step=schedule[j][0])
    return i, cfg.replace(seq_len=schedule[i][1], batch_size=schedule[i][2], optimizer=opt)


def load_experiment(path: str) -> TrainConfig:
    """Imports an experiment file and returns its `CONFIG` (a TrainConfig)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: file not found (experiments live in experiments/*.py)")
    spec = importlib.util.spec_from_file_location(f"experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = getattr(module, "CONFIG", None)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: must define CONFIG = TrainConfig(...), found {type(cfg).__name__}")
    return cfg


def _parse_value(text: str, current: Any, where: str, hint: Any = None) -> Any:
    """`hint` is the field's type annotation: a dict for an Optional[dataclass] field that is None now (e.g.
    model.rope_scaling={'factor': 8.0, ...}) becomes that dataclass."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--set {where}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            value = float(text) if isinstance(current, float) or any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ConfigError(f"--set {where}={text}: expected a number like {current!r}") from None
        if isinstance(current, int) and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"--set {where}={text}: expected an integer")
            value = int(value)
        return value
    if isinstance(current, str):
        return text
    if dataclasses.is_dataclass(current) or isinstance(current, tuple) or current is None:
        if text in ("None", "none", "null"):
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a bare string for an Optional[str] field
        if isinstance(value, dict):
            kinds = [t for t in (type(current), *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
            if kinds:
                return kinds[0](**value)
        if isinstance(current, tuple) and not isinstance(value, (list, tuple)):
            raise ConfigError(f"--set {where}={text}: expected a list like {list(current)}")
        return tuple(value) if isinstance(current, tuple) else value
    raise ConfigError(f"--set {where}: cannot set a field of type {type(current).__name__} from the command line")


_DEFER_CHECKS = False


def apply_overrides(cfg, overrides: list[str]):
    """`["optimizer.peak_lr=3e-4", "model.n_layers=2", "steps=50"]` -> a new config. Unknown fields are errors.
    TrainConfig's cross-field checks run once, on the result, so that fields that must change together can
    (`objective=dpo data.format=preference`)."""
    global _DEFER_CHECKS
    if not isinstance(cfg, TrainConfig):
        return _apply_overrides(cfg, overrides)
    _DEFER_CHECKS = True
    try:
        cfg = _apply_overrides(cfg, overrides)
    finally:
        _DEFER_CHECKS = False
    return cfg.replace()  # the checks, now


def _apply_overrides(cfg, overrides: list[str]):
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. optimizer.peak_lr=3e-4")
        dotted, text = item.split("=", 1)

        def set_path(obj, parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if parts[0] not in names:
                raise ConfigError(f"--set {dotted}: {type(obj).__name__} has no field {parts[0]!r}; fields: {names}")
            current = getattr(obj, parts[0])
            if len(parts) == 1:
                new = _parse_value(text, current, dotted, typing.get_type_hints(type(obj)).get(parts[0]))
            elif dataclasses.is_dataclass(current):
                new = set_path(current, parts[1:])
            else:
                raise ConfigError(f"--set {dotted}: {parts[0]!r} is not a config section")
            replace = getattr(obj, "replace", None) or functools.partial(dataclasses.replace, obj)
            return replace(**{parts[0]: new})  # ModelConfig.replace re-derives head_dim

        cfg = set_path(cfg, dotted.strip().split("."))
    return cfg


# ------------------------------------------------------------------------------------------- train state
@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken
    params: Any  # float32 master parameters (llama.model's pytree)
    opt_state: Any  # optax state: AdamW mu and nu mirror params, plus scalar counts
    rng: jax.Array  # uint32 [2] raw key data; the step needs none (Llama has no dropout), sampling uses it
    # objective=dpo: the frozen reference policy (a float32 copy of the params, sharded like them); else None.
    # Not checkpointed: it is reloaded from its source (dpo.reference, init_from or the seed) on resume.
    ref_params: Any = None
    # lora: the frozen base parameters (`params` holds the adapters); else None. Not checkpointed either.
    base: Any = None


def model_params(params, base, cfg: TrainConfig, key=None):
    """The parameters the model runs with: `params` itself, or with lora the base with the adapters applied
    through model.linear (lora.apply: no merged copy). `key` (training only) turns on lora.dropout."""
    from llama import lora

    return params if cfg.lora is None else lora.apply(base, params, cfg.lora, key)


def frozen_base(params, cfg: TrainConfig):
    """The LoRA run's frozen base as the state holds it: int8 (llama/quant.py) with lora.base_int8, else in the
    compute dtype. It is never updated, and every use casts it to the compute dtype anyway (model.linear, the norms'
    gains, the embedding's gather), so a bfloat16 run holds a bfloat16 base with the same results: 2 bytes per
    weight, as sharding.plan's LoRA case and torchtune's LoRA recipes count it, not float32's 4."""
    from llama import quant

    if cfg.lora is not None and cfg.lora.base_int8:
        return quant.quantize_params(params)
    dt = jnp.dtype(cfg.model.compute_dtype)
    if cfg.lora is None or dt == jnp.float32:
        return params
    return jax.tree.map(lambda p: p.astype(dt) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _objective(params, mb: dict, *, cfg: TrainConfig, n_tokens):
    """The micro-batch's next-token cross-entropy and z-loss summed over its tokens, each token's term times its
    loss_mask (llama.loss; float32 whatever the compute dtype), divided by `n_tokens`, the whole batch's summed
    loss_mask (`_normalizers`), so that micro-batch gradients add up to the full-batch gradient. The loss is
    thus a weighted mean, sum_t w_t nll_t / sum_t w_t: with 0/1 masks (text, chat) the mean over the trained
    tokens; with the segments format's integer weights each token counts w_t times, as if repeated (a weight
    raises a token's share of the loss relative to the others, not the loss's overall scale). Returns
    (loss, (nll_sum, z_sum))."""
    positions, segment_ids = (mb["positions"], mb["segment_ids"]) if cfg.data.document_mask else (None, None)
    h = llama_model.hidden_states(params, mb["tokens"], positions, segment_ids, cfg=cfg.model)
    loss_sum, sums = llama_loss.next_token_loss(params, h, mb["targets"], mb["loss_mask"], cfg=cfg.model,
                                                z_loss=cfg.z_loss, chunk=cfg.loss_chunk)
    return loss_sum / n_tokens, sums


def _split_micro(x: jax.Array, k: int, mesh) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]: micro-batch i takes rows i, i+k, ..., so every device's contiguous block
    of the batch holds rows of every micro-batch and no row moves between devices."""
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        spec = batch_sharding(mesh, x.ndim - 1).spec
        x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec)))
    return x


def _dpo_objective(params, mb: dict, *, cfg: TrainConfig, norms: dict, ref_params):
    """The micro-batch's DPO loss (llama.loss.dpo_loss) summed over its pairs / the batch's pair count, plus
    dpo.nll_coef x its chosen completion tokens' NLL / the batch's chosen completion token count. Pairs are
    segments (2k+1, 2k+2) of a row (input_pipeline/chat.py). The reference log-probs come from `ref_params`
    (no gradient). Returns (loss, sums for the metrics)."""
    d = cfg.dpo

    def logps(p):
        h = llama_model.hidden_states(p, mb["tokens"], mb["positions"], mb["segment_ids"], cfg=cfg.model)
        return llama_loss.token_logps(p, h, mb["targets"], cfg=cfg.model, chunk=cfg.loss_chunk,
                                      mask=mb["loss_mask"]) * mb["loss_mask"]

    seg = mb["segment_ids"]
    pol = llama_loss.pair_sums(logps(params), seg)  # [B, P, 2]
    ref = jax.lax.stop_gradient(llama_loss.pair_sums(logps(ref_params), seg))
    rows_pairs = jnp.max(seg, axis=1, keepdims=True) // 2  # pairs in each row
    valid = (jnp.arange(pol.shape[1])[None, :] < rows_pairs).astype(jnp.float32)  # [B, P]
    loss, rc, rr = llama_loss.dpo_loss(pol[..., 0], pol[..., 1], ref[..., 0], ref[..., 1], beta=d.beta,
                                       label_smoothing=d.label_smoothing)
    dpo_sum = jnp.sum(loss * valid)
    nll_sum = -jnp.sum(pol[..., 0] * valid)  # masked log-probs: the sum over chosen completion tokens
    total = dpo_sum / norms["pairs"] + d.nll_coef * nll_sum / norms["chosen_tokens"]
    sg = jax.lax.stop_gradient
    sums = {"dpo_sum": sg(dpo_sum), "nll_sum": sg(nll_sum), "chosen_reward_sum": sg(jnp.sum(rc * valid)),
            "rejected_reward_sum": sg(jnp.sum(rr * valid)), "correct_sum": sg(jnp.sum((rc > rr) * valid))}
    return total, sums


def _normalizers(batch: dict, cfg: TrainConfig) -> dict:
    """Whole-batch counts the micro-batch losses are divided by, so micro-batch gradients add up to the
    full-batch gradient: loss-masked tokens; for DPO also pairs and chosen completion tokens."""
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    out = {"tokens": jnp.maximum(jnp.sum(mask), 1.0)}
    if cfg.objective == "dpo":
        seg = jnp.asarray(batch["segment_ids"])
        out["pairs"] = jnp.maximum(jnp.sum(jnp.max(seg, axis=1) // 2).astype(jnp.float32), 1.0)
        out["chosen_tokens"] = jnp.maximum(jnp.sum(mask * (seg % 2 == 1)), 1.0)
    return out


def compute_grads(params, batch: dict, *, cfg: TrainConfig, mesh=None, ref_params=None, base=None, key=None):
    """Gradient of the batch's mean loss (the objective's: `_objective` for pretrain and sft, `_dpo_objective`
    for dpo), accumulated over cfg.micro_batches with lax.scan (one code path: k = 1 is a scan of length one).
    With lora, `params` are the adapters and `base` the frozen base: the gradient is the adapters' only; the DPO
    reference is then the base itself (no dropout). `key`: the step's PRNG key for lora.dropout (folded with the
    micro-batch index). Returns (float32 grads, summed metrics dict, normalizers dict)."""
    k = cfg.micro_batches
    micro = {name: _split_micro(jnp.asarray(batch[name]), k, mesh) for name in BATCH_KEYS}
    norms = _normalizers(batch, cfg)
    if cfg.objective == "dpo":
        ref = base if cfg.lora is not None and ref_params is None else ref_params

        def fn(p, mb, i):
            return _dpo_objective(model_params(p, base, cfg, mb_key(i)), mb, cfg=cfg, norms=norms, ref_params=ref)
    else:
        def fn(p, mb, i):
            loss, (nll_sum, z_sum) = _objective(model_params(p, base, cfg, mb_key(i)), mb, cfg=cfg,
                                                n_tokens=norms["tokens"])
            return loss, {"nll_sum": nll_sum, "z_sum": z_sum}
    grad_fn = jax.grad(fn, has_aux=True)

    def mb_key(i):
        return None if key is None else jax.random.fold_in(key, i)

    def one(carry, xs):
        grads, sums = carry
        g, s = grad_fn(params, *xs)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    shapes = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micro), jnp.int32(0))[1]
    sums0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(one, (zeros, sums0), (micro, jnp.arange(k, dtype=jnp.int32)))
    return grads, sums, norms


def objective_metrics(sums: dict, norms: dict, cfg: TrainConfig) -> dict:
    """The logged values of the objective: `loss` is the optimised loss of the step's starting params."""
    if cfg.objective != "dpo":
        return {"loss": sums["nll_sum"] / norms["tokens"], "z_loss": sums["z_sum"] / norms["tokens"]}
    n = norms["pairs"]
    dpo, nll = sums["dpo_sum"] / n, sums["nll_sum"] / norms["chosen_tokens"]
    chosen, rejected = sums["chosen_reward_sum"] / n, sums["rejected_reward_sum"] / n
    return {"loss": dpo + cfg.dpo.nll_coef * nll, "dpo_loss": dpo, "nll": nll, "reward_accuracy":
            sums["correct_sum"] / n, "rewards_chosen": chosen, "rewards_rejected": rejected,
            "reward_margin": chosen - rejected, "pairs": n}


# ------------------------------------------------------------------------------- held-out eval: sft, dpo
def objective_eval_set(cfg: TrainConfig, source, tok) -> "llama_eval.EvalSet":
    """Fixed eval batches for sft/dpo (and pretrain on format=segments): the rows of data.eval_paths (read as the
    training source is: same format, overlong policy and masking; a bad row is a DataError naming file:line), or the
    held-out share (data.eval_share, the documents `input_pipeline` leaves out of training: sources.hash_split), in
    file order, packed whole as in training (input_pipeline.chat.eval_rows) into at most eval_batches x batch_size
    rows; the last batch is padded."""
    from input_pipeline.chat import eval_rows, open_chat
    from input_pipeline.packing import empty_rows
    from input_pipeline.sources import hash_split

    d = cfg.data
    src = dataclasses.replace(source, paths=(d.eval_paths,)) if d.eval_paths else source
    docs = open_chat(src, tok, seq_len=cfg.seq_len, progress=distributed.is_primary())
    docs = docs if d.eval_paths else hash_split(docs, d.eval_share, heldout=True)
    rows, n = eval_rows([docs[i] for i in range(len(docs))], cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    pad = -len(rows["tokens"]) % cfg.batch_size
    rows = {k: np.concatenate([v, empty_rows(pad, cfg.seq_len)[k]]) for k, v in rows.items()}
    return llama_eval.EvalSet.from_rows(rows, cfg.batch_size, n, int(docs[n - 1].shape[1]))


def eval_sums(params, batch: dict, *, cfg: TrainConfig, ref_params=None) -> tuple[dict, dict]:
    """Forward only: the objective's summed metrics over `batch` and its counts (the inputs of `objective_metrics`),
    from the same functions as the train step. Sums of several batches give the whole set's metrics. Every eval
    batch holds at least one masked token (a pair), so `_normalizers`' clamp at 1 never applies to these counts."""
    norms = _normalizers(batch, cfg)
    if cfg.objective == "dpo":
        _, sums = _dpo_objective(params, batch, cfg=cfg, norms=norms, ref_params=ref_params)
    else:
        _, (nll_sum, z_sum) = _objective(params, batch, cfg=cfg, n_tokens=norms["tokens"])
        sums = {"nll_sum": nll_sum, "z_sum": z_sum}
    return sums, norms


def evaluate_objective(state: TrainState, eval_set, *, cfg: TrainConfig, mesh, sums_fn) -> dict:
    """The held-out metrics of sft/dpo, named as training's with an `eval_` prefix: sft eval_loss (the mean NLL of
    the held-out assistant tokens) and eval_ppl; dpo every DPO metric (eval_loss, eval_dpo_loss, eval_nll,
    eval_reward_accuracy, eval_rewards_chosen/rejected, eval_reward_margin, eval_pairs) against the run's
    reference. `sums_fn`: `eval_sums` jitted. Each process feeds its share of every batch's rows."""
    params = model_params(state.params, state.base, cfg)
    ref = state.ref_params if state.ref_params is not None else state.base  # lora: the frozen base
    total = None
    with jax.set_mesh(mesh):
        for batch in eval_set.global_batches(mesh):
            got = jax.device_get(sums_fn(params, batch, ref_params=ref))
            total = got if total is None else jax.tree.map(np.add, total, got)
    m = {k: float(v) for k, v in objective_metrics(*total, cfg).items()}
    if cfg.objective != "dpo":
        return {"eval_loss": m["loss"], "eval_ppl": math.exp(min(m["loss"], 700.0))}
    return {f"eval_{k}": v for k, v in m.items()}


def train_step(state: TrainState, batch: dict, *, cfg: TrainConfig, tx: optax.GradientTransformation,
               mesh=None) -> tuple[TrainState, dict]:
    """One optimizer step: accumulated gradients, global-norm clipping and AdamW (both inside `tx`)."""
    # lora.dropout's key: a function of the seed and the step only, so resumed runs draw the same masks.
    key = (jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
           if cfg.lora is not None and cfg.lora.dropout > 0 else None)
    grads, sums, norms = compute_grads(state.params, batch, cfg=cfg, mesh=mesh, ref_params=state.ref_params,
                                       base=state.base, key=key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = objective_metrics(sums, norms, cfg) | {
        "grad_norm": optim.global_norm(grads), "lr": optim.learning_rate(cfg.optimizer, state.step),
        "tokens": jnp.sum(jnp.asarray(batch["loss_mask"]) > 0).astype(jnp.float32)}  # trained, not their weights
    return TrainState(state.step + 1, params, opt_state, state.rng, state.ref_params, state.base), metrics


def state_shardings(cfg: TrainConfig, mesh) -> TrainState:
    """The TrainState's NamedShardings, derived from sharding.rules (see the module docstring)."""
    from llama import lora, quant

    tx = optim.make_optimizer(cfg.optimizer)
    p_sh = param_shardings(llama_model.param_specs(cfg.model), mesh)
    # The trained tree: the params, or with lora the adapters (sharded like the weights they adapt).
    t_sh = p_sh if cfg.lora is None else param_shardings(lora.adapter_specs(cfg.model, cfg.lora), mesh)
    abstract_opt = jax.eval_shape(lambda: _init_state(cfg, tx, 0).opt_state)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, t_sh,
                                   transform_non_params=lambda _: replicated(mesh),
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=replicated(mesh), params=t_sh, opt_state=opt_sh, rng=replicated(mesh),
                      ref_params=p_sh if cfg.objective == "dpo" and cfg.lora is None else None,
                      base=None if cfg.lora is None else param_shardings(quant.quantized_specs(cfg.model), mesh)
                      if cfg.lora.base_int8 else p_sh)


def _init_state(cfg: TrainConfig, tx, seed: int, params=None) -> TrainState:
    """The step-0 state: the params (given: init_from, or from the seed); with lora, fresh adapters (B = 0, so
    the model starts as the base) as the trained tree and the params as the frozen base."""
    params_key, rng_key = jax.random.split(jax.random.key(seed))
    params = llama_model.init_params(cfg.model, params_key) if params is None else params
    base = None
    if cfg.lora is not None:
        from llama import lora

        base, params = frozen_base(params, cfg), lora.init_adapters(cfg.model, cfg.lora, jax.random.fold_in(params_key, 1))
    # DPO's reference: its own buffers (the state is donated); with lora the frozen base is the reference.
    ref = jax.tree.map(jnp.copy, params) if cfg.objective == "dpo" and cfg.lora is None else None
    return TrainState(jnp.int32(0), params, tx.init(params), jax.random.key_data(rng_key), ref, base)


def abstract_state(cfg: TrainConfig, mesh) -> TrainState:
    """ShapeDtypeStructs carrying the shardings: restore targets, and `eval_shape` checks of huge configs."""
    tx = optim.make_optimizer(cfg.optimizer)

    shapes = jax.eval_shape(lambda: _init_state(cfg, tx, 0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(cfg, mesh))


def _check_batch_divisible(cfg: TrainConfig, mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.micro_batches) % n:
        raise ConfigError(f"TrainConfig: batch_size/micro_batches = {cfg.batch_size // cfg.micro_batches} rows "
                          f"per micro-batch must divide over the data*fsdp = {n} devices of mesh {dict(mesh.shape)}")


def make_train_step(cfg: TrainConfig, mesh):
    """(init_state_fn, step_fn): `init_state_fn(seed, params=None) -> TrainState` jitted with out_shardings
    (parameters are created already sharded, never whole on one device; `params`, placed with the state's
    shardings, start from given weights: init_from), and `step_fn(state, batch) -> (state, metrics)`, jitted
    with explicit in/out shardings and the state donated. For objective=dpo the state's ref_params start as a
    copy of the params (see `with_reference` to set another reference)."""
    _check_batch_divisible(cfg, mesh)
    tx = optim.make_optimizer(cfg.optimizer)
    sh = state_shardings(cfg, mesh)

    def init(seed, params=None):
        return _init_state(cfg, tx, seed, params)

    def step(state, batch):
        # Traced under the mesh, so the model's layer-boundary constraints (sharding.rules.constrain) apply.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, cfg=cfg, tx=tx, mesh=mesh)

    batch_sh = {name: batch_sharding(mesh, 2) for name in BATCH_KEYS}
    init_fn = jax.jit(init, out_shardings=sh)
    step_fn = jax.jit(step, in_shardings=(sh, batch_sh), out_shardings=(sh, replicated(mesh)), donate_argnums=0)
    return init_fn, step_fn


# ------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_ITEMS = ("params", "opt_state", "config", "data", "meta")


def checkpoint_manager(out_dir: str, cfg: TrainConfig):
    """Async saves; keep the last `keep_checkpoints`; temporary directories left by a killed run are
    removed on start (Orbax only ever renames complete steps into place)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")), options=options,
                                 item_names=CHECKPOINT_ITEMS)


def save_checkpoint(mngr, state: TrainState, cfg: TrainConfig, data_state: dict) -> int:
    """Starts an async save of `state` at its step. The device->host copy happens before this returns, so
    the next (donating) step may run at once; the write to disk continues in the background."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    meta = {"step": step, "rng": [int(x) for x in np.asarray(jax.device_get(state.rng))]}
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
        config=ocp.args.JsonSave({"model": cfg.model.to_dict(), "train": cfg.to_dict()}),
        # every process's own iterator position (process 0 writes the JSON item for all)
        data=ocp.args.JsonSave({"processes": distributed.allgather_json(data_state)}),
        meta=ocp.args.JsonSave(meta)), force=True)
    return step


# May change across a restart (and are absent from checkpoints written before them).
NUMERICS_ONLY = ("remat", "compute_dtype", "attention_impl", "attention_block_q", "attention_block_k", "name")


def _model_diff(saved: dict, model: ModelConfig, ignore: tuple[str, ...] = ()) -> dict:
    """{field: (saved, config)} where a saved ModelConfig dict differs from `model` in more than numerics."""
    mine, saved = json.loads(json.dumps(model.to_dict())), json.loads(json.dumps(saved))  # tuples -> lists
    return {k: (saved.get(k), mine[k]) for k in mine
            if k not in NUMERICS_ONLY + ignore and saved.get(k) != mine[k]}


def load_init_params(path: str, cfg: TrainConfig, mesh, what: str = "init_from"):
    """float32 params from `path`, placed with the trainer's shardings: a model checkpoint or a training run (its
    latest step; llama.checkpoint.load_model) or a Hugging Face directory (config.json + *.safetensors, converted
    on the fly by llama.convert). ConfigError when its architecture is not cfg.model's (max_seq_len and the
    stored dtype may differ)."""
    from llama import checkpoint as llama_ckpt
    from llama import convert

    _check_init_dir(what, path)
    hf = glob.glob(os.path.join(path, "*.safetensors")) and not llama_ckpt.is_model_checkpoint(path)
    if hf:
        mcfg, state = convert.open_source("hf", path)
    else:
        mcfg, params = llama_ckpt.load_model(path, mesh, dtype="float32")
    diff = _model_diff(mcfg.to_dict(), cfg.model, ("max_seq_len", "param_dtype"))  # checked before converting
    if diff:
        raise ConfigError(f"{what}={path}: {'the Hugging Face model' if hf else 'its model'} differs from the "
                          f"config's model in {diff}")
    if not hf:
        return params
    host = convert.hf_to_params(state, mcfg, "float32", where=path)
    shardings = param_shardings(llama_model.param_specs(cfg.model), mesh)
    return jax.tree.map(lambda x, sh: jax.device_put(x, sh), host, shardings)


def _check_init_dir(what: str, path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{what}={path}: no such directory (a model checkpoint, a training run or a Hugging "
                          "Face model directory)")


def restore_checkpoint(mngr, step: int, cfg: TrainConfig, mesh) -> tuple[TrainState, dict, dict]:
    """(state placed with the trainer's shardings, data iterator state, saved config dict). A checkpoint
    of another architecture is refused with the differing fields named."""
    import orbax.checkpoint as ocp

    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    diff = _model_diff(saved["model"], cfg.model)
    if diff:
        raise ConfigError(f"{mngr.directory}/{step}: the checkpoint's model differs from the config's in "
                          f"{ {k: f'saved {a!r} vs config {b!r}' for k, (a, b) in diff.items()} }; use another --out")
    target = abstract_state(cfg, mesh)
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params), opt_state=ocp.args.StandardRestore(target.opt_state),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    meta = got["meta"]
    rng = jax.device_put(np.asarray(meta["rng"], np.uint32), target.rng.sharding)
    state = TrainState(jax.device_put(np.int32(meta["step"]), target.step.sharding), got["params"],
                       got["opt_state"], rng)
    # Checkpoints written before the per-process positions (one process) hold that process's state itself.
    data = got["data"]["processes"] if "processes" in got["data"] else [got["data"]]
    if len(data) != jax.process_count():
        raise ConfigError(f"{mngr.directory}/{step}: saved by {len(data)} process(es), resumed with "
                          f"{jax.process_count()}: the input iterator positions are per process; resume with "
                          f"{len(data)} processes")
    return state, data[jax.process_index()], saved


# ---------------------------------------------------------------------------------------- data, tokenizer
CORPUS_SEPARATOR = "<|endoftext|>"


def default_corpus(out_dir: str) -> str:
    """The embedded corpus: the CPython documentation topics that ship with Python (`pydoc_data.topics`,
    ~80 documents, ~0.46 MB), written once to OUT/corpus/pydoc_topics.txt, documents separated by
    CORPUS_SEPARATOR."""
    from pydoc_data.topics import topics

    path = os.path.join(out_dir, "corpus", "pydoc_topics.txt")
    if not os.path.exists(path):
        # Every process writes and renames its own temp file: the bytes are identical, so this is safe on a
        # shared filesystem and also works where each host has its own disk.
        from llama import manifest

        manifest.atomic_write(path, f"\n{CORPUS_SEPARATOR}\n".join(topics[k].strip() for k in sorted(topics)))
    return path


def data_source(cfg: TrainConfig, out_dir: str):
    """The input pipeline's Source for cfg.data (the embedded corpus when no paths are given)."""
    import input_pipeline

    if cfg.data.paths is None:
        return input_pipeline.Source((default_corpus(out_dir),), separator=CORPUS_SEPARATOR)
    # overlong and mask_special apply to the weighted formats only (Source ignores them for the others)
    return input_pipeline.Source((cfg.data.paths,), format=cfg.data.format, separator=cfg.data.separator,
                                 overlong=cfg.data.overlong,
                                 mask_special=cfg.objective == "dpo" and cfg.dpo.mask_special)


def tokenizer_for(cfg: TrainConfig, source, out_dir: str):
    """cfg.data.tokenizer if given ("llama3": Llama 3's); else OUT/tokenizer.model, trained once
    (SentencePiece BPE with model.vocab_size pieces) on the training text and reused on resume."""
    from input_pipeline.sources import open_documents
    from llama.tokenizer import load_tokenizer, train_sentencepiece

    if cfg.data.tokenizer == "llama3":
        return load_tokenizer(None, vocab_size=cfg.model.vocab_size)
    if cfg.data.tokenizer is None and cfg.data.format in ("chat", "preference"):
        # Fine-tuning keeps the tokenizer of the model it starts from: a training run carries its own.
        run_tok = os.path.join(cfg.init_from or "", "tokenizer.model")
        if not (cfg.init_from and os.path.isfile(run_tok)):
            raise ConfigError(f"data.format={cfg.data.format}: give the tokenizer of the starting model, "
                              "data.tokenizer=PATH or data.tokenizer=llama3 (init_from a training run uses its "
                              "tokenizer.model)")
        return load_tokenizer(run_tok, vocab_size=cfg.model.vocab_size)
    if cfg.data.tokenizer is None and cfg.data.format == "segments":
        raise ConfigError("data.format=segments: give the tokenizer, data.tokenizer=PATH or data.tokenizer=llama3 "
                          "(no tokenizer is trained on weighted rows)")
    if cfg.data.tokenizer is None and cfg.data.format == "prepared":
        raise ConfigError("data.format=prepared holds token ids: give the tokenizer it was prepared with, "
                          "data.tokenizer=PATH or data.tokenizer=llama3 (its index.json names it)")
    path = cfg.data.tokenizer or os.path.join(out_dir, "tokenizer.model")
    if cfg.data.tokenizer is None and not os.path.exists(path):
        # Each process trains the same tokenizer (deterministic: one thread) into a temp file and renames it,
        # so identical bytes land whether hosts share a filesystem or not.
        docs = open_documents(source)
        if distributed.is_primary():
            print(f"training a {cfg.model.vocab_size}-piece SentencePiece tokenizer on {len(docs)} documents ...")
        train_sentencepiece((docs[i] for i in range(len(docs))), cfg.model.vocab_size, path)
    return load_tokenizer(path, vocab_size=cfg.model.vocab_size)


def sample_text(params, cfg: TrainConfig, tok, rng) -> str:
    """A short continuation of cfg.sample_prompt (after BOS) with Meta's default sampling (T 0.6, top-p 0.9)."""
    from llama.generate import generate
    from llama.sampling import SamplingConfig

    prompt = tok.encode(cfg.sample_prompt, bos=True)
    seed = int(np.asarray(jax.device_get(rng))[0])
    out = generate(params, [prompt], cfg=cfg.model, max_new_tokens=cfg.sample_tokens, sampling=SamplingConfig(),
                   seed=seed, stop_ids=tok.stop_ids)
    return tok.decode(prompt[1:] + out.tokens[0])  # decoded together, so the first new piece keeps its space


# --------------------------------------------------------------------------------------------------- main
class _Preempted:
    """SIGTERM sets a flag; the loop saves at the end of the current step and exits 0."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame):
        self.flag = True


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m llama.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment file defining CONFIG = TrainConfig(...)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="override config fields, e.g. optimizer.peak_lr=3e-4 steps=200 model.n_layers=2")
    p.add_argument("--data", help="glob of your own text files (one document per file) instead of the default corpus")
    p.add_argument("--out", help="run directory (default runs/<experiment name>); rerun to resume")
    distributed.add_flags(p)
    return p.parse_args(argv)


# What llama.train writes in OUT (and llama.sweep beside it, for a variant's run).
RUN_FILES = {"checkpoints", "adapters", "metrics.jsonl", "tensorboard", "corpus", "tokenizer.model", "manifest.json",
             "loss.png",
             "sample.txt", "sweep_manifest.json", "train.log"}


def is_run_dir(d: str) -> bool:
    """A directory llama.train wrote, which a rerun resumes: nothing in it but RUN_FILES (and our temp files),
    and a manifest, if any, that llama.train wrote. Also the first files another process of this same run
    creates (tokenizer.model, corpus/) before any manifest exists."""
    from llama import manifest

    names = {n for n in os.listdir(d) if not (n.startswith(".") and n.endswith(".tmp"))}
    if not names <= RUN_FILES:
        return False
    if "manifest.json" not in names:
        return True
    try:
        extra = manifest.read_manifest(d).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return False
    # Manifests from before "tool" was recorded name the command instead.
    command = " ".join(map(str, extra.get("command", [])))
    return extra.get("tool") == "llama.train" or "llama.train" in command or os.path.join("llama", "train.py") in command


def check_setup(cfg: TrainConfig, out: str) -> None:
    """Everything that can be checked before OUT is created: the mesh fits the devices and the batch, the data
    and tokenizer exist, and OUT is new, empty or a run directory (a model checkpoint, a report or any other
    directory is refused, naming it; a half-made OUT is never left behind by a bad setup)."""
    import input_pipeline
    from input_pipeline.sources import expand_paths
    from llama import manifest
    from llama.checkpoint import is_model_checkpoint
    from llama.tokenizer import load_tokenizer

    if os.path.isdir(out) and is_model_checkpoint(out):
        raise ConfigError(f"--out {out}: is a model checkpoint (config.json + params/), not a training run "
                          "directory; training into it would mix its weights with a new run. Choose another --out")
    manifest.check_replaceable(out, "--out", is_run_dir, "a training run directory (checkpoints/, metrics.jsonl)")
    _check_batch_divisible(cfg, make_mesh(cfg.mesh))
    if cfg.data.paths is not None:
        input_pipeline.Source((cfg.data.paths,), format=cfg.data.format, separator=cfg.data.separator)
        files = expand_paths((cfg.data.paths,), allow_dirs=cfg.data.format in ("prepared", "hf"))
        manifest.check_no_overlap(out, {"data.paths": files}, "--out")
        if cfg.data.format == "prepared":
            from input_pipeline.prepared import read_index

            for d in files:
                read_index(d)
    if cfg.eval_every and cfg.data.eval_paths:
        try:
            expand_paths((cfg.data.eval_paths,), allow_dirs=cfg.data.format in ("prepared", "hf"))
        except input_pipeline.DataError as e:
            raise input_pipeline.DataError(f"data.eval_paths: {e}") from None
    if cfg.data.tokenizer not in (None, "llama3"):
        load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size)
    for what, path in (("init_from", cfg.init_from), ("dpo.reference", cfg.dpo.reference)):
        if path is not None:
            _check_init_dir(what, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.initialize_from_args(args)  # multi-host: before anything touches devices; one process: no-op
    primary = distributed.is_primary()  # only process 0 prints, writes metrics, plots and the manifest
    say = print if primary else (lambda *a, **k: None)
    cfg = apply_overrides(load_experiment(args.config), args.set)
    if args.data:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, paths=args.data))
    out = os.path.abspath(args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0]))
    check_setup(cfg, out)  # validate first, then create
    os.makedirs(out, exist_ok=True)
    preempted = _Preempted()

    # Data and tokenizer.
    import input_pipeline

    source = data_source(cfg, out)
    tok = tokenizer_for(cfg, source, out)
    own = os.path.abspath(os.path.join(out, "tokenizer.model"))
    if os.path.abspath(tok.path) != own and not os.path.exists(own):
        # The run directory carries its tokenizer, so `llama.generate --checkpoint OUT` needs nothing else.
        from llama import manifest

        with open(tok.path, "rb") as f:
            manifest.atomic_write(own, f.read())
    holdout = 0.0 if cfg.data.eval_paths else cfg.data.eval_share
    # Weighted rows (sft, dpo, pretrain on format=segments) are evaluated as they are trained: packed whole, weighted.
    eval_set = None if not cfg.eval_every else (
        llama_eval.trainer_eval_set(cfg, source, tok, out) if source.format not in input_pipeline.WEIGHTED_FORMATS
        else objective_eval_set(cfg, source, tok))

    def open_data(stage: int, scfg: TrainConfig):
        # Each stage packs the stream anew at its own length (seed + stage: stage 0 is the unstaged run's data).
        return input_pipeline.make_dataset(input_pipeline.DataConfig(sources=(source,), holdout=holdout), tok,
                                           seq_len=scfg.seq_len, global_batch_size=scfg.batch_size,
                                           seed=cfg.seed + stage)

    # Model, optimizer state and the step, sharded over the mesh; resume from the latest checkpoint.
    mesh = make_mesh(cfg.mesh)
    mngr = checkpoint_manager(out, cfg)
    start = mngr.latest_step()
    stage, scfg = stage_at(cfg, start or 0)
    data = open_data(stage, scfg)
    init_fn, step_fn = make_train_step(scfg, mesh)
    if start is None:
        state = init_fn(cfg.seed, load_init_params(cfg.init_from, cfg, mesh) if cfg.init_from else None)
        say(f"new run in {out}: {llama_model.count_params(state.params) / 1e6:.2f}M trained parameters"
            f"{' (LoRA adapters)' if cfg.lora else ''}, mesh {dict(mesh.shape)}, "
            f"{jax.process_count()} process(es)")
    else:
        state, data_state, _ = restore_checkpoint(mngr, start, cfg, mesh)
        if stage_at(cfg, max(start - 1, 0))[0] == stage:  # else it ends the previous stage: open this one afresh
            data.set_state(data_state)
        say(f"resuming {out} from step {start}")
    if cfg.lora is not None and start is not None:  # the frozen base is not checkpointed: reload it
        state = dataclasses.replace(state, base=jax.jit(functools.partial(frozen_base, cfg=cfg),
                                                        out_shardings=state_shardings(cfg, mesh).base)(
            load_init_params(cfg.init_from, cfg, mesh)) if cfg.init_from else init_fn(cfg.seed).base)
    if cfg.objective == "dpo" and cfg.lora is None and (cfg.dpo.reference or start is not None):
        # The frozen reference: dpo.reference, else the starting policy (reloaded on resume: not checkpointed).
        src = cfg.dpo.reference or cfg.init_from
        ref = (load_init_params(src, cfg, mesh, "dpo.reference" if cfg.dpo.reference else "init_from") if src
               else init_fn(cfg.seed).params)
        state = dataclasses.replace(state, ref_params=ref)
    start = start or 0
    from llama import manifest

    if primary:
        manifest.write_manifest(out, config=cfg, mesh=mesh, seeds={"init": cfg.seed, "data": cfg.seed},
                                data_files=sorted(glob.glob(source.paths[0], recursive=True))[:1000] + [str(tok.path)],
                                extra={"tool": "llama.train",
                                       "command": sys.argv if argv is None else ["python", "-m", "llama.train", *argv],
                                       "resumed_from_step": start, "tokenizer": str(tok.path),
                                       "eval": eval_set.describe() if eval_set else None})

    # The loop: metrics every log_every steps, async checkpoints every checkpoint_every. Dispatch is asynchronous:
    # step N's metrics are fetched after step N+1 is dispatched, so the device never waits for the host. A step
    # that is saved waits for its own metrics first, so the NaN/Inf check precedes any save of its state.
    from tqdm import tqdm

    writer = llama_metrics.MetricsWriter(out) if primary else None

    def step_flops(c: TrainConfig) -> float:
        per_token = (llama_metrics.lora_train_flops_per_token(c.model, c.seq_len, c.lora) if c.lora is not None
                     else llama_metrics.train_flops_per_token(c.model, c.seq_len))  # LoRA: no base weight grads
        return per_token * c.batch_size * c.seq_len

    peak = llama_metrics.peak_flops(override=cfg.peak_flops)
    last_saved, status, stop, last_eval = start, 0, False, None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not primary)
    t_prev = time.perf_counter()

    def finish(done: int, m: dict, stage: int, scfg: TrainConfig) -> bool:
        """Fetches step `done`'s metrics (waiting for it), shows and logs them; False, after saying so, when the
        loss or the gradient norm is not finite. `stage`, `scfg`: the stage that step ran in."""
        nonlocal t_prev
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            mngr.wait_until_finished()
            bar.close()
            good = mngr.latest_step()
            say(f"\nstopping: non-finite loss at step {done} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                "nothing saved after it; " + (f"the last good checkpoint is step {good} in {mngr.directory}"
                                              if good is not None else "no checkpoint was saved before it"),
                file=sys.stderr)
            return False
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{scfg.batch_size * scfg.seq_len / dt:,.0f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            scalars = dict(m, step_time_s=dt, tokens_per_s=scfg.batch_size * scfg.seq_len / dt, stage=stage,
                           mfu=step_flops(scfg) / dt / (peak * mesh.size) if peak else None,
                           memory_bytes=llama_metrics.memory_in_use(), first_step=float(done == start + 1))
            if writer:
                writer.write(done, scalars)
        return True

    pending = None  # (step number, its metrics still on the device, its stage, its stage's config)
    eval_fn = jax.jit(functools.partial(eval_sums, cfg=cfg)) if eval_set is not None and cfg.objective != "pretrain" \
        else None
    for step in range(start, cfg.steps):
        if stage_at(cfg, step)[0] != stage:  # a stage boundary: re-pack the data, recompile the step
            stage, scfg = stage_at(cfg, step)
            data.close()
            data = open_data(stage, scfg)
            _, step_fn = make_train_step(scfg, mesh)
            say(f"\nstage {stage} from step {step}: {scfg.batch_size} rows x {scfg.seq_len} tokens")
        batch = input_pipeline.to_global_batch(next(data), mesh)
        state, m = step_fn(state, batch)  # dispatched: it runs while the host finishes the step before
        if pending is not None and not finish(*pending):
            status = 1
            break
        done, pending = step + 1, (step + 1, m, stage, scfg)
        if eval_set is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            # `state` is step `done`'s here (the next step is not dispatched yet); the eval waits for it
            last_eval = (done, llama_eval.evaluate(model_params(state.params, state.base, cfg), eval_set,
                                                   cfg=cfg.model, mesh=mesh) if cfg.objective == "pretrain" else
                         evaluate_objective(state, eval_set, cfg=cfg, mesh=mesh, sums_fn=eval_fn))
            if writer:
                writer.write(done, last_eval[1])
        stop = preempted.flag
        if jax.process_count() > 1:  # all processes agree, or some would enter the collective save alone
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.process_allgather(np.int32(stop)).any())
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            finished, pending = finish(*pending), None  # saving step N waits for N's metrics
            if not finished:
                status = 1
                break
            last_saved = save_checkpoint(mngr, state, cfg, data.get_state())
        if stop:
            bar.close()
            say(f"\nSIGTERM: saved step {done}; rerun the same command to resume", file=sys.stderr)
            break
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    data.close()
    if status or stop:
        if writer:
            writer.close()
        return status
    if not primary:
        if cfg.sample_tokens:
            # a collective computation: every process takes part
            sample_text(model_params(state.params, state.base, cfg), cfg, tok, state.rng)
        return 0
    writer.close()
    if last_eval:
        llama_eval.record_in_manifest(out, *last_eval)

    # Outputs: the loss plot and a sample from the trained model.
    plot = llama_metrics.plot_loss(writer.jsonl_path, os.path.join(out, "loss.png"), f"{cfg.model.name}: loss")
    lines = [f"run directory:  {out}", f"checkpoint:     {mngr.directory}/{last_saved}  (params, opt_state, "
             "config, data, meta)", f"tokenizer:      {tok.path}", f"metrics:        {writer.jsonl_path}, "
             f"{out}/tensorboard", f"loss plot:      {plot}",
             f"generate more:  python -m llama.generate --checkpoint {out} --prompt 'The'"]
    if cfg.lora is not None and jax.process_count() == 1:
        # The adapters as a LoRA adapter checkpoint: `python -m llama.convert orbax-to-peft OUT/adapters DST`.
        from llama import lora

        lora.save_adapters(os.path.join(out, "adapters"), cfg.model, cfg.lora, jax.device_get(state.params),
                           base=cfg.init_from, overwrite=True)
        lines.append(f"adapters:       {out}/adapters (LoRA; the base: {cfg.init_from or 'the seed init'})")
    if cfg.sample_tokens:
        text = sample_text(model_params(state.params, state.base, cfg), cfg, tok, state.rng)
        with open(os.path.join(out, "sample.txt"), "w") as f:
            f.write(text + "\n")
        lines += [f"sample:         {out}/sample.txt", "", "--- sample ---", text, "--------------"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so experiment files and this code share one TrainConfig class.
    from llama import host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work
    from llama import cli, train

    # Expected errors (ConfigError, DataError, ShardingError, CheckpointError, TokenizerError, OSError): one
    # `error:` line naming the input, exit 2 (llama/cli.py).
    sys.exit(cli.command(train.main)())
