"""Text generation with a preallocated KV cache: one prefill pass, then a decode loop that runs on the device.

Design (compare Meta's `Llama3.generate`, facts sheet section 6):
- Prompts of different lengths are right-padded into one [B, T] batch and prefilled in ONE pass with positions
  0..T-1; each row's first new token is sampled from the logits at its own last prompt token. Meta instead
  starts every row at the shortest prompt and teacher-forces the longer ones one token per step; prefilling
  everything at once does the same arithmetic in one pass.
- The cache slot of a token is its position (`model.forward_cached`). A row of length n therefore decodes from
  position n: each step writes its token's K/V into slot n (over the pad token's K/V that the padded prefill
  left there) before attending to slots <= n, so the pad K/V in later slots are never seen.
- `decode` is a `lax.while_loop` inside one jitted call: a step is one forward of B tokens, a sample and a
  few [B] updates; it stops when every row has hit a stop token or its own max_new_tokens.
- The cache is sharded by `sharding.rules.RULES` through `model.CACHE_AXES` (batch over data x fsdp, KV heads
  over tensor), fitted: an axis whose size does not divide its mesh axes is replicated for the cache. Params
  follow the strict rules unless the model does not divide the mesh (then fitted too, with a note).

CLI: `python -m llama.generate --checkpoint DIR --prompt "Once upon a time"` (see docs/inference.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama import cli, model
from llama.config import ATTENTION_IMPLS, ModelConfig
from llama.sampling import GREEDY, SamplingConfig, sample
from sharding import rules as sharding_rules

PAD_ID = 0  # any valid id works: a pad token's K/V land in slots its row overwrites before reading them
BUCKET = 64  # prompt and cache lengths round up to this, so nearby lengths share one compiled program
PREFILL_CHUNK = 4096  # prompt tokens per prefill pass: bounds prefill activations (docs/inference.md)
# `--mesh auto` on a CPU host splits it (`cpu_mesh`) from this prompt length: the probe's prefill gains from 4K
# tokens (0.20 s against 0.23), while at 1K its decode runs 1.2-1.4K tokens/s split against 1.8-2.0K whole (the
# per-token all-reduces); from 4K the decode speeds are equal (docs/benchmarks.md, "One device per core")
CPU_SPLIT_TOKENS = 4096


class ContextLimitError(ValueError):
    """A prompt plus its requested new tokens would not fit the model's context (cfg.max_seq_len)."""


# ---------------------------------------------------------------------------------------- device state
@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """Everything the decode loop carries, all on device. B rows, M = max new tokens, E = stop ids per row."""

    cache: dict  # {"k", "v"}: [L, B, K, S, H] (model.init_cache)
    token: jax.Array  # [B] the last sampled token, not yet written to the cache
    position: jax.Array  # [B] its position, which is also the cache slot it will be written to
    out: jax.Array  # [B, M] generated ids; -1 after a row has stopped
    n_out: jax.Array  # [B] tokens generated so far per row (a stop token counts)
    done: jax.Array  # [B] bool
    limit: jax.Array  # [B] max new tokens per row
    stop: jax.Array  # [B, E] stop ids per row, padded with -1
    step: jax.Array  # [] columns of `out` filled so far
    key: jax.Array  # PRNG key; step i samples with fold_in(key, i)


def _is_stop(tok: jax.Array, stop: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == stop, axis=-1)


def prefill(params, tokens: jax.Array, lengths: jax.Array, limit: jax.Array, stop: jax.Array, key: jax.Array, *,
            cfg: ModelConfig, sampling: SamplingConfig, max_new: int, cache_len: int,
            cache_sharding=None, cache_dtype=None, chunk: int | None = None) -> tuple[jax.Array, DecodeState]:
    """tokens: [B, T] right-padded prompts, lengths: [B] (>= 1). Writes the whole padded batch into a fresh
    cache of cache_len slots, `chunk` tokens at a time (T a multiple of it; None: one pass), each chunk attending
    to the cache written so far, so activations are bounded by the chunk, not the prompt. Keeps each row's last
    prompt token's hidden state, and samples its first new token from those logits.
    Returns (those logits [B, V] float32, the state)."""
    B, T = tokens.shape
    C = T if chunk is None or chunk >= T else chunk
    if T % C:
        raise ValueError(f"prefill: {T} prompt slots are not a multiple of the chunk {C}")
    cache = model.init_cache(cfg, B, cache_len, cache_dtype)
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding)

    def one_chunk(carry, start):
        cache, last = carry
        positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
        x, cache = model.hidden_states_cached(params, jax.lax.dynamic_slice_in_dim(tokens, start, C, 1), positions,
                                              cache, cfg=cfg)
        at = lengths.astype(jnp.int32) - 1 - start  # each row's last prompt token, if it is in this chunk
        x_at = jnp.take_along_axis(x, jnp.clip(at, 0, C - 1)[:, None, None], axis=1)[:, 0]
        return (cache, jnp.where(((at >= 0) & (at < C))[:, None], x_at, last)), None

    last = jnp.zeros((B, cfg.dim), jnp.dtype(cfg.compute_dtype))
    (cache, last), _ = jax.lax.scan(one_chunk, (cache, last), jnp.arange(0, T, C, dtype=jnp.int32))
    logits = model.unembed(params, last[:, None], cfg)[:, 0]
    tok = sample(logits, jax.random.fold_in(key, 0), sampling)
    state = DecodeState(
        cache=cache, token=tok, position=lengths.astype(jnp.int32),
        out=jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(tok), n_out=jnp.ones((B,), jnp.int32),
        done=_is_stop(tok, stop) | (limit <= 1), limit=limit.astype(jnp.int32), stop=stop.astype(jnp.int32),
        step=jnp.ones((), jnp.int32), key=key)
    return logits, state


def decode_step(params, state: DecodeState, *, cfg: ModelConfig,
                sampling: SamplingConfig) -> tuple[jax.Array, DecodeState]:
    """Feeds each row's last token at its position and samples the next. Stopped rows keep their position and
    emit -1. Returns (the step's logits [B, V] float32, the new state); the decode loop's body."""
    logits, cache = model.forward_cached(params, state.token[:, None], state.position[:, None], state.cache,
                                         cfg=cfg)
    logits = logits[:, 0]
    active = ~state.done
    nxt = jnp.where(active, sample(logits, jax.random.fold_in(state.key, state.step), sampling), -1)
    n_out = state.n_out + active
    return logits, dataclasses.replace(
        state, cache=cache, token=jnp.where(active, nxt, state.token), position=state.position + active,
        out=jax.lax.dynamic_update_slice(state.out, nxt[:, None], (0, state.step)), n_out=n_out,
        done=state.done | (active & (_is_stop(nxt, state.stop) | (n_out >= state.limit))), step=state.step + 1)


def decode(params, state: DecodeState, until: jax.Array, *, cfg: ModelConfig,
           sampling: SamplingConfig) -> DecodeState:
    """Runs decode_step on the device until every row is done or `until` columns of `out` are filled
    (`until` is traced, so streaming in chunks reuses one compiled loop)."""
    until = jnp.minimum(until, state.out.shape[1])

    def cond(s):
        return (s.step < until) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, lambda s: decode_step(params, s, cfg=cfg, sampling=sampling)[1], state)


_prefill_jit = jax.jit(prefill, static_argnames=("cfg", "sampling", "max_new", "cache_len", "cache_sharding",
                                                 "cache_dtype", "chunk"))
_decode_jit = jax.jit(decode, static_argnames=("cfg", "sampling"), donate_argnames=("state",))
_COMPILED: dict = {}


def _compiled(fn, args: tuple, static: dict):
    """Ahead-of-time compile, cached by the arguments' shapes, dtypes and shardings, so the tokens/s that
    `generate` reports never include compilation (which it reports separately)."""
    sig = jax.tree.map(lambda x: (x.shape, str(x.dtype), getattr(x, "sharding", None)), args)
    key = (fn, str(sig), jax.tree.structure(args), tuple(sorted(static.items())))
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args, **static).compile()
    return _COMPILED[key]


# -------------------------------------------------------------------------------------------- sharding
def cache_sharding(cfg: ModelConfig, mesh, batch: int, cache_len: int = 1):
    """NamedSharding of the KV cache [L, B, K, S, H] (model.CACHE_AXES), fitted by sharding/rules.py: batch over
    data x fsdp and KV heads over tensor where they divide, replicated on that axis otherwise."""
    shape = jax.ShapeDtypeStruct(model.cache_shape(cfg, batch, cache_len), jnp.float32)
    return sharding_rules.cache_shardings(mesh, {"k": shape})["k"]


def param_shardings(cfg: ModelConfig, mesh, quantized: bool = False):
    """Shardings of the (plain or int8) params by the rules table. Parameters are strict in sharding/rules.py
    (a surprise replication could run a large model out of memory); serving a model the mesh does not divide
    (e.g. 4 KV heads on tensor=8) fits each parameter instead, as the cache is fitted, with a note on stderr."""
    from llama import quant

    specs = quant.quantized_specs(cfg) if quantized else model.param_specs(cfg)
    try:
        return sharding_rules.param_shardings(specs, mesh)
    except sharding_rules.ShardingError as e:
        print(f"note: {e}; replicating the parameter axes that the mesh does not divide", file=sys.stderr)
        return jax.tree.map(lambda spec: sharding_rules.fitted_sharding(mesh, spec.logical_axes, spec.shape), specs,
                            is_leaf=lambda x: hasattr(x, "logical_axes"))


def cpu_mesh(cfg: ModelConfig, devices=None):
    """The serving mesh on a CPU host (`--mesh auto`, the CLI's default): tensor parallel over t CPU devices, t the
    most that divide the model's KV heads, query heads, FFN width and vocabulary, up to one per core
    (llama/host.py `split_cpu` makes them); None (one device) where t is 1, on an accelerator or across
    processes. One device per core runs each device's heads' attention loop on its own core: the 16K-token
    prefill 1.15-1.2x faster than one device spreading every op over both cores (docs/benchmarks.md, "One device
    per core")."""
    from llama import host

    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return None
    devices = list(jax.local_devices() if devices is None else devices)
    n = min(len(devices), host.cpu_cores())
    sizes = (cfg.n_kv_heads, cfg.n_heads, cfg.ffn_dim, cfg.vocab_size)
    t = max(d for d in range(1, n + 1) if all(x % d == 0 for x in sizes))
    if t == 1:
        return None
    return sharding_rules.make_mesh(sharding_rules.MeshConfig(data=1, fsdp=1, tensor=t), devices[:t])


def shard_params(params, cfg: ModelConfig, mesh):
    """Places params (plain or int8) on the mesh (`param_shardings`)."""
    from llama import quant

    return jax.device_put(params, param_shardings(cfg, mesh, quant.is_quantized(params)))


# ---------------------------------------------------------------------------------------------- host API
@dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # new ids per row, a final stop token included
    stop_reason: list[str]  # "stop" (a stop token), "length" (max_new_tokens), "context" (cut at max_seq_len)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float

    @property
    def decode_tokens(self) -> int:
        return sum(max(len(t) - 1, 0) for t in self.tokens)  # the first new token comes from the prefill

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _per_row(value, n: int, what: str) -> list:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} values for {n} prompts")
    return value


def plan(prompts: Sequence[Sequence[int]], max_new_tokens, cfg: ModelConfig,
         truncate: bool) -> tuple[list[int], list[bool]]:
    """Per-row new-token limits within the context, and which rows were cut (Meta: prompt + new <=
    max_seq_len). Raises ContextLimitError unless truncate."""
    limits, cut = [], []
    for i, (p, m) in enumerate(zip(prompts, _per_row(max_new_tokens, len(prompts), "max_new_tokens"))):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; start it with at least the BOS token ({cfg.bos_id})")
        if m < 1:
            raise ValueError(f"max_new_tokens for prompt {i} is {m}; expected >= 1")
        room = cfg.max_seq_len - len(p)
        if room < 1 or (m > room and not truncate):
            raise ContextLimitError(
                f"prompt {i}: {len(p)} prompt tokens + {m} new tokens exceed the context of {cfg.max_seq_len} "
                f"(cfg.max_seq_len); shorten the prompt, lower --max-new-tokens, or pass truncate=True")
        limits.append(min(m, room))
        cut.append(m > room)
    return limits, cut


def _stop_rows(stop_ids, cfg: ModelConfig, B: int) -> list[list[int]]:
    if stop_ids is None:
        return [list(cfg.eos_ids)] * B
    stop_ids = list(stop_ids)
    if stop_ids and not isinstance(stop_ids[0], (int, np.integer)):
        if len(stop_ids) != B:
            raise ValueError(f"stop_ids: {len(stop_ids)} rows for {B} prompts")
        return [list(s) for s in stop_ids]
    return [stop_ids] * B


def _prepare(params, prompts, *, cfg, max_new_tokens, sampling, seed, stop_ids, mesh, truncate, cache_dtype,
             prefill_chunk=PREFILL_CHUNK):
    """Host-side batch assembly shared by `generate` and `stream`: (prefill args, prefill statics, limits,
    cut rows, stop ids per row). Lengths are bucketed so that nearby prompts share compiled programs; a prompt
    longer than one chunk is split into equal chunks (the pad's K/V past the cache are dropped, and within it are
    overwritten before they are read, as a shorter row's are)."""
    B = len(prompts)
    limits, cut = plan(prompts, max_new_tokens, cfg, truncate)
    lengths = [len(p) for p in prompts]
    stop_rows = _stop_rows(stop_ids, cfg, B)
    stop = np.full((B, max(1, max(len(s) for s in stop_rows))), -1, np.int32)
    for i, s in enumerate(stop_rows):
        stop[i, :len(s)] = s
    T = min(_round_up(max(lengths), BUCKET), cfg.max_seq_len)
    max_new = max(limits)
    cache_len = min(_round_up(T + max_new, BUCKET), max(cfg.max_seq_len, T))
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk}: expected a positive number of tokens (or None: one pass)")
    chunk = None
    if prefill_chunk and prefill_chunk < T:  # equal chunks of at most prefill_chunk, padded by < 64 per chunk
        n = -(-T // prefill_chunk)
        chunk = _round_up(-(-T // n), BUCKET) if prefill_chunk >= BUCKET else prefill_chunk
        T = n * chunk
    tokens = np.full((B, T), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    host = (tokens, np.asarray(lengths, np.int32), np.asarray(limits, np.int32), stop)
    csh = None
    if mesh is not None:
        csh = cache_sharding(cfg, mesh, B, cache_len)
        host = tuple(jax.device_put(x, sharding_rules.fitted_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1),
                                                                      x.shape)) for x in host)
    static = dict(cfg=cfg, sampling=sampling, max_new=max_new, cache_len=cache_len, cache_sharding=csh,
                  cache_dtype=cache_dtype, chunk=chunk)
    return (params, *host, jax.random.key(seed)), static, limits, cut, stop_rows


def _programs(args, static, mesh=None):
    """The compiled prefill and decode for these arguments (decode's state shardings are prefill's outputs).
    Traced under the mesh, so the model's layer-boundary constraints (sharding/rules.py) apply."""
    if mesh is not None:
        with jax.set_mesh(mesh):
            return _programs(args, static)
    prefill_fn = _compiled(_prefill_jit, args, static)
    shapes = jax.eval_shape(lambda *a: prefill(*a, **static), *args)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                         prefill_fn.output_shardings)[1]
    until = jax.ShapeDtypeStruct((), jnp.int32)
    decode_fn = _compiled(_decode_jit, (args[0], state, until), dict(cfg=static["cfg"], sampling=static["sampling"]))
    return prefill_fn, decode_fn


def generate(params, prompts: Sequence[Sequence[int]], *, cfg: ModelConfig, max_new_tokens=256,
             sampling: SamplingConfig = GREEDY, seed: int = 0, stop_ids=None, mesh=None,
             truncate: bool = False, cache_dtype=None, prefill_chunk: int | None = PREFILL_CHUNK) -> GenerationResult:
    """Generates for a batch of token-id prompts (of any lengths). max_new_tokens: an int or one per row.
    stop_ids: ids shared by all rows (default cfg.eos_ids), or one sequence per row. With a mesh, params must
    already be placed (`shard_params`); the cache is sharded by the rules table. prefill_chunk: prompt tokens per
    prefill pass (None: the whole prompt in one)."""
    args, static, limits, cut, stop_rows = _prepare(
        params, prompts, cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
        mesh=mesh, truncate=truncate, cache_dtype=cache_dtype, prefill_chunk=prefill_chunk)
    t0 = time.perf_counter()
    prefill_fn, decode_fn = _programs(args, static, mesh)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, state = prefill_fn(*args)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    state = decode_fn(params, state, jnp.asarray(static["max_new"], jnp.int32))
    out, n_out = jax.device_get((state.out, state.n_out))
    t2 = time.perf_counter()

    rows, reasons = [], []
    for i in range(len(prompts)):
        row = [int(t) for t in out[i, :n_out[i]]]
        rows.append(row)
        reasons.append("stop" if row and row[-1] in stop_rows[i] else ("context" if cut[i] else "length"))
    return GenerationResult(rows, reasons, sum(len(p) for p in prompts), t1 - t0, t2 - t1, compile_s)


def stream(params, prompt: Sequence[int], *, cfg: ModelConfig, max_new_tokens: int = 256,
           sampling: SamplingConfig = GREEDY, seed: int = 0, stop_ids=None, chunk: int = 4,
           truncate: bool = True, cache_dtype=None, prefill_chunk: int | None = PREFILL_CHUNK) -> Iterator[list[int]]:
    """Yields one prompt's new ids a few at a time (`chunk` on-device decode steps per host round trip), for
    streaming text as it is generated; the same programs and ids as `generate` on that prompt alone. The stop
    token, if reached, is the last id yielded."""
    args, static, *_ = _prepare(params, [prompt], cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling,
                                seed=seed, stop_ids=stop_ids, mesh=None, truncate=truncate, cache_dtype=cache_dtype,
                                prefill_chunk=prefill_chunk)
    prefill_fn, decode_fn = _programs(args, static)
    _, state = prefill_fn(*args)
    sent = 0
    while True:
        n, done = (int(x) for x in jax.device_get((state.n_out[0], state.done[0])))
        if n > sent:
            yield [int(t) for t in jax.device_get(state.out[0, sent:n])]
            sent = n
        if done:
            return
        state = decode_fn(params, state, jnp.asarray(n + chunk, jnp.int32))


# ------------------------------------------------------------------------------------------------- CLI
LORA_MODES = ("merge", "runtime")


def adapter_dir(checkpoint: str) -> str | None:
    """The LoRA adapter checkpoint `checkpoint` names: itself (llama.lora.save_adapters' layout), or a LoRA
    training run's final RUN/adapters (llama/train.py writes it at the end of the run); else None."""
    from llama import lora

    for d in (checkpoint, os.path.join(checkpoint, "adapters")):
        if lora.is_adapter_checkpoint(d):
            return d
    return None


def _lora_base(adir: str) -> str:
    from llama import lora
    from llama.checkpoint import CheckpointError

    base = lora.load_adapters(adir)[3]
    if not base:
        raise CheckpointError(f"{os.path.join(adir, lora.LORA_FILE)}: records no base checkpoint (the run trained "
                              "adapters on a seed-initialised model, which has no saved weights to serve with); "
                              "train with init_from=<model checkpoint>")
    return base


def load_for_inference(checkpoint: str, *, mesh_text: str | None = None, quantize: str | None = None,
                       dtype: str | None = None, lora_mode: str = "merge"):
    """(cfg, params, mesh) from a model checkpoint directory: restored, optionally cast, placed on the mesh
    and int8-quantized there (the quantizer runs jitted on the devices, donating the full-precision copy).
    mesh_text: a `MeshConfig.parse` text, "auto" (`cpu_mesh` on a CPU host, else one device), or None / "one"
    (one device).
    An int8 checkpoint (`python -m llama.convert ... --quantize int8`) loads as int8 whatever `quantize` says.

    A LoRA adapter checkpoint or LoRA training run (`adapter_dir`) loads its base (lora.json's "base") and
    `lora_mode` "merge" folds the adapters in at load (lora.merge, then int8 if asked: plain weights, the
    speed of the base model), "runtime" keeps them apart (lora.apply: model.linear adds (x A) B at every
    projection; with int8 the base is quantized and the adapters stay float32)."""
    from llama.checkpoint import load_model

    if lora_mode not in LORA_MODES:
        raise ValueError(f"--lora {lora_mode!r}: expected one of {list(LORA_MODES)}")
    adir = adapter_dir(checkpoint)
    if adir is not None:
        from llama import lora

        _, lcfg, adapters, _ = lora.load_adapters(adir)
        cfg, params, mesh = load_for_inference(_lora_base(adir), mesh_text=mesh_text, dtype=dtype)
        lora.check_adapters(adapters, cfg, lcfg, where=os.path.join(adir, lora.ADAPTERS_DIR))
        if mesh is not None:
            adapters = jax.device_put(adapters, sharding_rules.param_shardings(lora.adapter_specs(cfg, lcfg), mesh))
        if lora_mode == "merge":
            params = jax.jit(lambda p, a: lora.merge(p, a, lcfg), donate_argnums=0)(params, adapters)
        params = _quantized(params, cfg, mesh, quantize)
        if lora_mode == "runtime":
            params = lora.apply(params, jax.tree.map(jnp.asarray, adapters), lcfg)
        return cfg, params, mesh

    if mesh_text == "auto":
        from llama.checkpoint import read_config

        mesh = cpu_mesh(read_config(checkpoint)[0])
    else:
        mesh_cfg = sharding_rules.MeshConfig.parse(mesh_text) if mesh_text not in (None, "one") else None
        mesh = sharding_rules.make_mesh(mesh_cfg) if mesh_cfg is not None else None
    try:  # restore straight onto the mesh when the plain rules fit this model
        cfg, params = load_model(checkpoint, mesh=mesh, dtype=dtype)
    except sharding_rules.ShardingError:  # e.g. fewer KV heads than tensor devices: replicate those axes
        cfg, params = load_model(checkpoint, dtype=dtype)
        params = shard_params(params, cfg, mesh)
    if dtype:
        cfg = cfg.replace(param_dtype=dtype, compute_dtype=dtype)
    return cfg, _quantized(params, cfg, mesh, quantize), mesh


def _quantized(params, cfg: ModelConfig, mesh, quantize: str | None):
    """params int8-quantized on their devices (jitted, donating the full-precision copy) when quantize="int8";
    an int8 checkpoint is served as it is."""
    from llama import quant

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: only 'int8' is supported")
    if quantize == "int8" and not quant.is_quantized(params):
        out_sh = param_shardings(cfg, mesh, quantized=True) if mesh is not None else None
        params = jax.jit(quant.quantize_params, out_shardings=out_sh, donate_argnums=0)(params)
    return params


def load_tokenizer_for(checkpoint: str, path: str | None):
    """--tokenizer, else DIR/tokenizer.model if present, else the Llama 3 tokenizer from `llama-models`;
    checked against the checkpoint's vocabulary (read from its config alone, before any weight is loaded):
    ids the model has no embedding row for are an error here, not garbage later."""
    from llama.checkpoint import read_config
    from llama.tokenizer import TokenizerError, check_vocab, load_tokenizer

    adir = adapter_dir(checkpoint)
    if adir is not None:  # a LoRA run or adapter checkpoint: the base's tokenizer and vocabulary
        checkpoint = _lora_base(adir)
    if path is None and os.path.exists(os.path.join(checkpoint, "tokenizer.model")):
        path = os.path.join(checkpoint, "tokenizer.model")
    tok = load_tokenizer(path)
    cfg, _ = read_config(checkpoint)
    try:
        check_vocab(tok, cfg.vocab_size)
    except TokenizerError as e:
        raise TokenizerError(f"--checkpoint {checkpoint} / --tokenizer: {e}") from None
    return tok


def is_generation_report(d: str) -> bool:
    """A directory `--report` wrote: generations.json, and nothing but its manifest beside it."""
    names = set(os.listdir(d))
    return "generations.json" in names and names <= {"generations.json", "manifest.json"}


def check_report_dir(report: str, checkpoint: str, tokenizer: str | None) -> None:
    """--report may only replace an earlier generation report, never another command's manifest.json (a
    training run's record of its config and seeds), and never lies in or around the checkpoint."""
    from llama import manifest

    manifest.check_no_overlap(report, {"--checkpoint": checkpoint, "--tokenizer": tokenizer}, "--report")
    manifest.check_replaceable(report, "--report", is_generation_report,
                               "an earlier generation report (generations.json + manifest.json)")


def read_prompts(path: str) -> list[str]:
    """--prompt-file: UTF-8 text, one prompt per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise cli.UsageError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise cli.UsageError(f"--prompt-file {path}: no prompts (one per line expected)")
    return texts


def add_sampling_flags(ap, max_new_tokens: int) -> None:
    """The numeric flags generate and chat share, as ranges (NaN and inf fail them)."""
    number = cli.number
    ap.add_argument("--max-new-tokens", type=number(1, integer=True), default=max_new_tokens)
    ap.add_argument("--temperature", type=number(0, float("inf"), hi_open=True), default=0.6,
                    help="0 = greedy (Meta default 0.6)")
    ap.add_argument("--top-p", type=number(0, 1, lo_open=True), default=0.9, help="in (0, 1]; Meta default 0.9; 1 = off")
    ap.add_argument("--top-k", type=number(0, integer=True), default=0, help="0 = off")
    ap.add_argument("--seed", type=number(0, 2**32 - 1, integer=True), default=0)


@cli.command
def main(argv: Sequence[str] | None = None) -> None:
    ap = cli.ArgumentParser(prog="python -m llama.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model checkpoint directory (config.json + params/), a "
                    "training run, or a LoRA run / adapter checkpoint (with its base)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="a text file, one prompt per line (blank lines skipped)")
    ap.add_argument("--tokenizer", help="tokenizer file (default: DIR/tokenizer.model, else Llama 3's)")
    add_sampling_flags(ap, max_new_tokens=256)
    ap.add_argument("--quantize", choices=["int8"], help="weight-only int8 for the linear layers")
    ap.add_argument("--lora", choices=LORA_MODES, default="merge", help="a LoRA run or adapter checkpoint: merge "
                    "the adapters into the base at load (default) or apply them at runtime")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params and compute")
    ap.add_argument("--cache-dtype", choices=["float32", "bfloat16", "int8"],
                    help="KV cache dtype (default: the compute dtype); int8: one float32 scale per token and KV head")
    ap.add_argument("--mesh", default="auto", help="e.g. data=1,fsdp=1,tensor=8; 'one': one device; default "
                    f"'auto': on a CPU host with a prompt of {CPU_SPLIT_TOKENS}+ tokens, the heads split over one "
                    "CPU device per core (`cpu_mesh`; LLAMA_CPU_DEVICES=1 keeps one device), else one device")
    ap.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                    help="attention implementation (default: the checkpoint's config; llama/attention.py)")
    ap.add_argument("--prefill-chunk", type=cli.number(0, integer=True), default=PREFILL_CHUNK,
                    help=f"prompt tokens per prefill pass (default {PREFILL_CHUNK}; 0: the whole prompt at once)")
    ap.add_argument("--truncate", action="store_true", help="cut generation at the context limit, not error")
    ap.add_argument("--json-ids", action="store_true", help="print generated ids as JSON, one line per prompt")
    ap.add_argument("--report", metavar="DIR", help="also write DIR/generations.json (ids, text, timings) and "
                    "DIR/manifest.json (config, versions, devices, seed, checkpoint fingerprint); DIR may be new, "
                    "empty or an earlier report")
    a = ap.parse_args(argv)

    if a.report:
        check_report_dir(a.report, a.checkpoint, a.tokenizer)  # before anything is loaded or generated
    texts = [a.prompt] if a.prompt is not None else read_prompts(a.prompt_file)
    tok = load_tokenizer_for(a.checkpoint, a.tokenizer)
    prompts = [tok.encode(t, bos=True) for t in texts]
    mesh_text = "one" if a.mesh == "auto" and max(map(len, prompts)) < CPU_SPLIT_TOKENS else a.mesh
    cfg, params, mesh = load_for_inference(a.checkpoint, mesh_text=mesh_text, quantize=a.quantize, dtype=a.dtype,
                                           lora_mode=a.lora)
    if a.attention_impl:
        cfg = cfg.replace(attention_impl=a.attention_impl)
    stops = tuple(sorted(set(cfg.eos_ids) | set(tok.stop_ids)))
    res = generate(params, prompts, cfg=cfg, max_new_tokens=a.max_new_tokens, seed=a.seed, stop_ids=stops,
                   sampling=SamplingConfig(a.temperature, a.top_p, a.top_k), mesh=mesh, truncate=a.truncate,
                   cache_dtype=a.cache_dtype, prefill_chunk=a.prefill_chunk or None)
    for text, prompt, ids, why in zip(texts, prompts, res.tokens, res.stop_reason):
        if a.json_ids:
            print(json.dumps({"prompt": text, "ids": ids, "stop_reason": why}))
        else:  # decode prompt and reply together: SentencePiece drops a leading space at the start of a decode
            print(tok.decode(prompt[1:] + [t for t in ids if t not in stops]))
            print(f"[{len(ids)} tokens, {why}]")
    print(f"prefill: {res.prompt_tokens} tokens in {res.prefill_s:.3f}s = {res.prefill_tokens_per_s:.1f} tokens/s; "
          f"decode: {res.decode_tokens} tokens in {res.decode_s:.3f}s = {res.decode_tokens_per_s:.1f} tokens/s "
          f"(batch {len(prompts)}; compile {res.compile_s:.1f}s)", file=sys.stderr)
    if a.report:
        from llama import manifest

        rows = [{"prompt": t, "prompt_ids": p, "ids": ids, "text": tok.decode([i for i in ids if i not in stops]),
                 "stop_reason": why} for t, p, ids, why in zip(texts, prompts, res.tokens, res.stop_reason)]
        timing = {"prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
                  "prefill_s": res.prefill_s, "decode_s": res.decode_s, "compile_s": res.compile_s}
        os.makedirs(a.report, exist_ok=True)
        manifest.atomic_write(os.path.join(a.report, "generations.json"),
                              json.dumps({"generations": rows, "timing": timing}, indent=1))
        manifest.write_manifest(a.report, config={"model": cfg, "args": vars(a)}, mesh=mesh, seeds={"sampling": a.seed},
                                data_files=[os.path.join(a.checkpoint, "config.json"), str(tok.path)],
                                extra={"tool": "llama.generate", "checkpoint": os.path.abspath(a.checkpoint)})
        print(f"report: {a.report}/generations.json, {a.report}/manifest.json", file=sys.stderr)


if __name__ == "__main__":
    from llama import host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work
    host.split_cpu()  # one XLA:CPU device per core, for `--mesh auto` (llama/host.py), before the backend starts
    sys.exit(main())  # expected errors (they name the input): one `error:` line, exit 2 (llama/cli.py)
