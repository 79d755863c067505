"""Checkpoint conversion: one table of names, shape checks, and the Hugging Face, Meta `consolidated.NN.pth` and
llama2.c `.bin` sources and sinks (the safetensors and torch zip containers themselves: llama/tensor_files.py).
The model never sees these names.

Every source is first turned into a lazy mapping from Hugging Face tensor names to numpy arrays in torch
[out, in] layout ("HF layout"); `hf_to_params` then stacks it into this project's parameter pytree, one
parameter at a time. Meta and llama2.c rotate interleaved pairs, HF rotate-half, so their wq/wk rows are
permuted once on the way in (facts sheet 4.1-4.2). Everything here is numpy on the host: no GPU, no torch.

    python -m llama.convert {hf,meta,llama2c,orbax}-to-{orbax,hf} SRC DST [--dtype bfloat16] [--shard-size 5GB]
                            [--quantize int8]   (to orbax: an int8 checkpoint, served as it is)
    e.g. hf-to-orbax HF_DIR CKPT; orbax-to-hf CKPT_OR_RUN HF_DIR; meta-to-orbax META_DIR CKPT;
    llama2c-to-hf stories260K.bin HF_DIR. See docs/checkpoints.md.
    python -m llama.convert orbax-to-peft ADAPTERS PEFT_DIR [--base-model HF_DIR]   (LoRA: docs/post_training.md)
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from llama import cli, manifest
from llama.config import ModelConfig, from_hf_config, from_meta_params, to_hf_config
from llama.tensor_files import (LazyTensor, TensorEntry, read_entry, read_safetensors_header, read_torch_zip,
                                write_safetensors_shards)


class ConvertError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the file and the tensor."""


# ------------------------------------------------------------------------------------------- name table
@dataclass(frozen=True)
class TensorName:
    """One parameter of the pytree and its names elsewhere. `n_in` is how many leading axes of the
    per-layer parameter form the torch *input* axis (wo [N, H, D] has two: N*H -> D)."""

    param: tuple[str, ...]  # path in the param pytree
    hf: str  # "{}" is the layer index
    meta: str
    n_in: int  # 0: not a matrix (norm gains, the embedding table)


TABLE: tuple[TensorName, ...] = (
    TensorName(("embed",), "model.embed_tokens.weight", "tok_embeddings.weight", 0),
    TensorName(("layers", "attn_norm"), "model.layers.{}.input_layernorm.weight", "layers.{}.attention_norm.weight", 0),
    TensorName(("layers", "wq"), "model.layers.{}.self_attn.q_proj.weight", "layers.{}.attention.wq.weight", 1),
    TensorName(("layers", "wk"), "model.layers.{}.self_attn.k_proj.weight", "layers.{}.attention.wk.weight", 1),
    TensorName(("layers", "wv"), "model.layers.{}.self_attn.v_proj.weight", "layers.{}.attention.wv.weight", 1),
    TensorName(("layers", "wo"), "model.layers.{}.self_attn.o_proj.weight", "layers.{}.attention.wo.weight", 2),
    TensorName(("layers", "mlp_norm"), "model.layers.{}.post_attention_layernorm.weight", "layers.{}.ffn_norm.weight", 0),
    TensorName(("layers", "w_gate"), "model.layers.{}.mlp.gate_proj.weight", "layers.{}.feed_forward.w1.weight", 1),
    TensorName(("layers", "w_up"), "model.layers.{}.mlp.up_proj.weight", "layers.{}.feed_forward.w3.weight", 1),
    TensorName(("layers", "w_down"), "model.layers.{}.mlp.down_proj.weight", "layers.{}.feed_forward.w2.weight", 1),
    TensorName(("final_norm",), "model.norm.weight", "norm.weight", 0),
    TensorName(("lm_head",), "lm_head.weight", "output.weight", 1),
)
# Keys older converters wrote that carry no weights (facts sheet 4.3): RoPE tables recomputed from config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")


def _param_shape(t: TensorName, cfg: ModelConfig) -> tuple[int, ...]:
    """Per-layer shape of the parameter (without the leading L axis), from llama.model.param_specs."""
    from llama.model import param_specs

    spec = param_specs(cfg)
    for k in t.param:
        spec = spec[k]
    return spec.shape[1:] if t.param[0] == "layers" else spec.shape


def torch_shape(t: TensorName, cfg: ModelConfig) -> tuple[int, ...]:
    p = _param_shape(t, cfg)
    return p if t.n_in == 0 else (int(np.prod(p[t.n_in:])), int(np.prod(p[:t.n_in])))


def table(cfg: ModelConfig) -> list[TensorName]:
    return [t for t in TABLE if not (t.param == ("lm_head",) and cfg.tie_embeddings)]


def hf_names(t: TensorName, cfg: ModelConfig) -> list[str]:
    return [t.hf.format(i) for i in range(cfg.n_layers)] if "{}" in t.hf else [t.hf]


def to_param_layout(t: TensorName, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """torch [out, in] -> this project's per-layer layout ([in..., out...]): transpose, then reshape."""
    return x if t.n_in == 0 else np.ascontiguousarray(x.T).reshape(_param_shape(t, cfg))


def to_torch_layout(t: TensorName, x: np.ndarray) -> np.ndarray:
    return x if t.n_in == 0 else np.ascontiguousarray(x.reshape(int(np.prod(x.shape[:t.n_in])), -1).T)


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair rows -> rotate-half rows within each head (facts sheet 4.2): view the output axis
    as (heads, H/2, 2), swap the last two, flatten. w: [n*H, D] torch layout."""
    n_rows, d = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, n_rows // n_heads // 2, 2, d).swapaxes(1, 2).reshape(n_rows, d))


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of meta_to_hf_rows."""
    n_rows, d = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, 2, n_rows // n_heads // 2, d).swapaxes(1, 2).reshape(n_rows, d))


# ------------------------------------------------------------------------------ HF layout <-> params
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64))


def _checked(state: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    where = state.where(name) if hasattr(state, "where") and name in state else where
    if name not in state:
        raise ConvertError(f"{where}: tensor {name!r} is missing (expected shape {shape})")
    x = state[name]
    if tuple(x.shape) != tuple(shape):
        raise ConvertError(f"{where}: tensor {name!r} has shape {tuple(x.shape)}, but the config needs {shape}")
    if np.dtype(x.dtype) not in _FLOATS:
        raise ConvertError(f"{where}: tensor {name!r} has dtype {x.dtype}; expected a float type (bf16/fp16/fp32)")
    return x


def check_names(state: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> None:
    """Every expected tensor present and nothing unexpected, before any work is done."""
    expected = {n for t in table(cfg) for n in hf_names(t, cfg)}
    names = {n for n in state if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in names:
        # Meta's 1B/3B and some re-saved checkpoints carry a copy of the embedding (facts sheet 4.3).
        names.discard("lm_head.weight")
        a, b = state["lm_head.weight"], state["model.embed_tokens.weight"]
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ConvertError(f"{where}: tie_word_embeddings is true but 'lm_head.weight' differs from "
                               "'model.embed_tokens.weight'; set tie_word_embeddings=false in config.json")
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise ConvertError(f"{where}: {len(missing)} tensor(s) missing for the config ({cfg.n_layers} layers, "
                           f"tie_embeddings={cfg.tie_embeddings}): {missing[:5]}")
    if extra:
        raise ConvertError(f"{where}: {len(extra)} unexpected tensor(s) for the config ({cfg.n_layers} layers, "
                           f"tie_embeddings={cfg.tie_embeddings}): {extra[:5]}")


def iter_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, dtype=None,
                where: str = "checkpoint") -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yields (pytree path, array) one parameter at a time; layer tensors are stacked into [L, ...].
    Peak memory is one stacked parameter plus one source tensor."""
    dtype = np.dtype(dtype or cfg.param_dtype)
    check_names(state, cfg, where)
    for t in table(cfg):
        shape = torch_shape(t, cfg)
        names = hf_names(t, cfg)
        if t.param[0] != "layers":
            yield t.param, to_param_layout(t, _checked(state, names[0], shape, where), cfg).astype(dtype)
            continue
        out = np.empty((cfg.n_layers,) + _param_shape(t, cfg), dtype)
        for i, name in enumerate(names):
            out[i] = to_param_layout(t, _checked(state, name, shape, where), cfg)
        yield t.param, out
        del out  # before the next parameter is allocated: one stacked parameter alive at a time


def hf_to_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, dtype=None,
                 where: str = "checkpoint") -> dict[str, Any]:
    """HF-named numpy tensors (torch layout) -> this project's param pytree of numpy arrays."""
    params: dict[str, Any] = {}
    for path, x in iter_params(state, cfg, dtype, where):
        (params.setdefault(path[0], {}) if len(path) == 2 else params)[path[-1]] = x
    return params


class ParamsAsHF(Mapping):
    """HF names over this project's params, given `get_param(path)` -> one stacked parameter (an in-memory
    pytree, or an Orbax checkpoint read one parameter at a time). Keeps only the last parameter read."""

    def __init__(self, cfg: ModelConfig, get_param: Callable[[tuple[str, ...]], np.ndarray]):
        self.get_param, self.cached = get_param, (None, None)
        self.names = {n: (t, i) for t in table(cfg) for i, n in enumerate(hf_names(t, cfg))}

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, name):
        t, i = self.names[name]
        if self.cached[0] != t.param:
            self.cached = (t.param, None)  # drop the previous parameter before reading the next
            self.cached = (t.param, np.asarray(self.get_param(t.param)))
        x = self.cached[1]
        return to_torch_layout(t, x[i] if t.param[0] == "layers" else x)


def params_to_hf(params, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
    """This project's param pytree -> HF-named numpy tensors (torch layout)."""
    state = ParamsAsHF(cfg, lambda path: functools.reduce(operator.getitem, path, params))
    return {n: state[n] if dtype is None else state[n].astype(dtype) for n in state}


# ------------------------------------------------------------------------------------------- llama2.c
def load_llama2c(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    """Karpathy's llama2.c legacy (version 0) `.bin` -> (cfg, params). Layout: ../shared/assets/README.md."""
    cfg, state = read_llama2c(path)
    cfg = cfg.replace(param_dtype=dtype, compute_dtype=dtype)
    return cfg, hf_to_params(state, cfg, where=path)


def read_llama2c(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(cfg, HF-layout state dict). wq/wk rows are permuted from interleaved pairs to rotate-half."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(28)
            if len(header) < 28:
                raise ConvertError(f"{path}: {size} bytes is too short for a llama2.c header (7 x int32)")
            dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", header)
            data = np.fromfile(f, dtype="<f4")
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found") from None
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0 or dim % n_heads:
        raise ConvertError(f"{path}: not a llama2.c legacy .bin (header dim={dim} hidden_dim={hidden} "
                           f"n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv} vocab={vocab} seq_len={seq_len})")
    tied, vocab = vocab > 0, abs(vocab)  # a negative vocab_size means a separate classifier at the end
    hs = dim // n_heads
    kv = n_kv * hs
    L = n_layers
    # File order; keys are the last element of TABLE's param paths (None: the legacy RoPE tables, skipped).
    shapes = [("embed", (vocab, dim)), ("attn_norm", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
              ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("mlp_norm", (L, dim)), ("w_gate", (L, hidden, dim)),
              ("w_down", (L, dim, hidden)), ("w_up", (L, hidden, dim)), ("final_norm", (dim,)),
              (None, (2, seq_len, hs // 2))] + ([] if tied else [("lm_head", (vocab, dim))])
    need = sum(int(np.prod(s)) for _, s in shapes)
    if data.size != need:
        raise ConvertError(f"{path}: {size} bytes, but a llama2.c v0 model with this header needs "
                           f"{28 + 4 * need} bytes (truncated, or another llama2.c version)")
    arrays, offset = {}, 0
    for name, shape in shapes:
        arrays[name] = data[offset:offset + int(np.prod(shape))].reshape(shape)
        offset += int(np.prod(shape))
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=hidden,
                      norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=seq_len,
                      tie_embeddings=tied, bos_id=1, eos_ids=(2,), name=os.path.basename(path))
    state = {}
    for t in table(cfg):
        x = arrays[t.param[-1]]
        for i, name in enumerate(hf_names(t, cfg)):
            w = x[i] if t.param[0] == "layers" else x
            if t.param[-1] in ("wq", "wk"):  # llama2.c rotates interleaved pairs, as Meta (facts sheet 4.2)
                w = meta_to_hf_rows(w, n_heads if t.param[-1] == "wq" else n_kv)
            state[name] = w
    return cfg, state


# ------------------------------------------------------------------------------------------ safetensors
class HFCheckpoint(Mapping):
    """A Hugging Face model directory as a lazy mapping name -> numpy array (read on access):
    `model.safetensors`, or shards listed in `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self.entries: dict[str, TensorEntry] = {}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({e!r})") from None
            headers = {fn: read_safetensors_header(os.path.join(directory, fn)) for fn in sorted(set(weight_map.values()))}
            for name, fn in weight_map.items():
                if name not in headers[fn]:
                    raise ConvertError(f"{index}: tensor {name!r} is listed in {fn}, which does not contain it")
                self.entries[name] = headers[fn][name]
        elif os.path.isfile(single):
            self.entries = read_safetensors_header(single)
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
            raise ConvertError(f"{directory}: no model.safetensors or model.safetensors.index.json (found: {found})")

    def __getitem__(self, name: str) -> np.ndarray:
        return read_entry(self.entries[name])

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def where(self, name: str) -> str:
        return self.entries[name].file

    def dtype_of(self, name: str) -> np.dtype:
        return self.entries[name].dtype


# ------------------------------------------------------------------------------ Meta consolidated.NN.pth
# fairscale layer kind -> concatenation axis in torch [out, in] layout (facts sheet 4.4). None: replicated.
_MP_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w_gate": 0, "w_up": 0, "lm_head": 0, "wo": 1, "w_down": 1,
            "attn_norm": None, "mlp_norm": None, "final_norm": None}


class MetaCheckpoint(Mapping):
    """A Meta download directory (`params.json`, `consolidated.NN.pth`) as a lazy mapping from HF names to
    HF-layout numpy arrays: model-parallel shards concatenated, then the wq/wk rows permuted."""

    def __init__(self, directory: str, cfg: ModelConfig):
        self.directory, self.cfg = directory, cfg
        files = sorted(f for f in os.listdir(directory) if f.startswith("consolidated.") and f.endswith(".pth"))
        if not files:
            raise ConvertError(f"{directory}: no consolidated.NN.pth files")
        self.shards = [read_torch_zip(os.path.join(directory, f)) for f in files]  # file-name order (4.4)
        self.by_hf: dict[str, tuple[TensorName, str]] = {}
        for t in TABLE:
            for i, name in enumerate(hf_names(t, cfg)):
                if t.meta.format(i) in self.shards[0][1]:
                    self.by_hf[name] = (t, t.meta.format(i))
        known = {m for _, m in self.by_hf.values()}
        extra = [k for k in self.shards[0][1] if k not in known and not k.endswith(IGNORED_SUFFIXES)]
        for k in extra:  # not a tensor of this config: keep the Meta name so check_names reports it
            self.by_hf[k] = (None, k)

    def __iter__(self):
        return iter(self.by_hf)

    def __len__(self):
        return len(self.by_hf)

    def where(self, name: str) -> str:
        return os.path.join(self.directory, "consolidated.*.pth")

    def dtype_of(self, name: str) -> np.dtype:
        return self.shards[0][1][self.by_hf[name][1]].dtype

    def __getitem__(self, name: str) -> np.ndarray:
        t, mname = self.by_hf[name]
        pieces = []
        for zf, state in self.shards:
            if mname not in state:
                raise ConvertError(f"{zf.filename}: tensor {mname!r} is missing from this shard")
            if not isinstance(state[mname], LazyTensor):
                raise ConvertError(f"{zf.filename}: {mname!r} is not a tensor")
            pieces.append(state[mname].load(zf))
        key = t.param[-1]
        if len(pieces) == 1 or _MP_AXIS.get(key, 0) is None:
            x = pieces[0]
        elif key == "embed":
            # Llama 3 VocabParallelEmbedding splits rows; Llama 2 ParallelEmbedding splits columns (4.4).
            x = np.concatenate(pieces, axis=0 if pieces[0].shape[1] == self.cfg.dim else 1)
        else:
            x = np.concatenate(pieces, axis=_MP_AXIS[key])
        if key in ("wq", "wk"):
            n = self.cfg.n_heads if key == "wq" else self.cfg.n_kv_heads
            if x.ndim != 2 or x.shape[0] != n * self.cfg.head_dim:
                raise ConvertError(f"{self.where(name)}: tensor {mname!r} merges to shape {x.shape}, but params.json "
                                   f"needs ({n * self.cfg.head_dim}, {self.cfg.dim})")
            x = meta_to_hf_rows(x, n)
        return x


# --------------------------------------------------------------------------------------- sources, sinks
def open_source(kind: str, src: str, **cfg_overrides) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    """(cfg, lazy HF-layout state) for a source format: "hf", "meta", "llama2c" or "orbax"."""
    if kind == "hf":
        return (cfg := from_hf_config(src, **cfg_overrides)), HFCheckpoint(src)
    if kind == "meta":
        return (cfg := from_meta_params(src, **cfg_overrides)), MetaCheckpoint(src, cfg)
    if kind == "llama2c":
        cfg, state = read_llama2c(src)
        return cfg.replace(**cfg_overrides), state
    if kind == "orbax":
        from llama.checkpoint import is_int8, read_param, resolve

        cfg_dict, params_dir = resolve(src)
        if is_int8(src):
            raise ConvertError(f"{src}: an int8 checkpoint; convert from the float checkpoint it was made from")
        cfg = ModelConfig.from_dict(cfg_dict).replace(**cfg_overrides)
        # An Orbax source is already in param layout; expose it as HF tensors one stacked param at a time.
        return cfg, ParamsAsHF(cfg, lambda path: read_param(params_dir, path))
    raise ConvertError(f"unknown source format {kind!r}; expected one of hf, meta, llama2c, orbax")


def _dtype_of(state: Mapping[str, np.ndarray], dtype: str | None) -> str:
    """The requested dtype, else the source's (its embedding's), read from headers where there are any."""
    if dtype:
        return str(np.dtype(dtype))
    name = "model.embed_tokens.weight"
    if name not in state:
        raise ConvertError(f"{getattr(state, 'directory', 'source')}: tensor {name!r} is missing")
    return str(np.dtype(state.dtype_of(name) if hasattr(state, "dtype_of") else state[name].dtype))


def write_orbax(dst: str, cfg: ModelConfig, state: Mapping[str, np.ndarray], *, where: str,
                overwrite: bool = False, progress: bool = True, provenance: dict | None = None,
                quantize: str | None = None) -> ModelConfig:
    """An Orbax model checkpoint, one parameter at a time; quantize="int8" stores the linear weights as
    int8 + float32 scales (llama/quant.py), quantized one layer at a time on the host."""
    from tqdm import tqdm

    from llama.checkpoint import save_model_streaming

    check_names(state, cfg, where)
    arrays = iter_params(state, cfg, cfg.param_dtype, where)
    if quantize == "int8":
        from llama import quant

        arrays = quant.quantize_arrays(arrays, head="embed" if cfg.tie_embeddings else "lm_head")
    elif quantize is not None:
        raise ConvertError(f"--quantize {quantize!r}: only int8 is supported")
    done = lambda path, x: path[-1] != "q" and bar.update()  # noqa: E731  (q and its scale: one parameter)
    with tqdm(total=len(table(cfg)), desc=f"-> {dst}", unit="param", disable=not progress) as bar:
        save_model_streaming(dst, cfg, arrays, overwrite=overwrite, provenance=provenance,
                             on_write=lambda path, x: (bar.set_postfix_str("/".join(path)), done(path, x)),
                             quantized=quantize == "int8")
    return cfg


def write_hf(dst: str, cfg: ModelConfig, state: Mapping[str, np.ndarray], *, where: str,
             shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True) -> list[str]:
    """config.json, generation_config.json and safetensors shards (+ index) in `dst`, staged then renamed."""
    from tqdm import tqdm

    from llama.checkpoint import commit_dir, staging_dir

    check_names(state, cfg, where)
    dtype = np.dtype(cfg.param_dtype)
    plan = [(n, torch_shape(t, cfg), dtype) for t in table(cfg) for n in hf_names(t, cfg)]
    tensors = ((n, _checked(state, n, s, where).astype(dtype, copy=False)) for n, s, _ in plan)
    tmp = staging_dir(dst, overwrite)
    try:
        with tqdm(total=len(plan), desc=f"-> {dst}", unit="tensor", disable=not progress) as bar:
            files = write_safetensors_shards(tmp, tensors, plan, shard_bytes, lambda n, x: bar.update())
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_config(cfg), f, indent=2)
        # Llama 3.1 generation_config.json (facts sheet 4.5): sampling defaults of the Meta reference.
        gen = {"bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0],
               "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        commit_dir(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise manifest.naming(e, dst)
    return files


# --------------------------------------------------------------------------------------- LoRA -> PEFT
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LlamaForCausalLM (peft/utils/save_and_load.py drops the adapter name)


def peft_state(cfg: ModelConfig, lcfg, adapters: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """This project's adapters (llama/lora.py) -> PEFT LoRA tensors: `...q_proj.lora_A.weight` [r, in] and
    `...lora_B.weight` [out, r], torch layout like the weights in TABLE (wq's rows are already rotate-half)."""
    by_param = {t.param[-1]: t for t in TABLE if t.param[0] == "layers"}
    state = {}
    for target in lcfg.targets:
        t, a, b = by_param[target], np.asarray(adapters[target]["a"]), np.asarray(adapters[target]["b"])
        for i, name in enumerate(hf_names(t, cfg)):
            module = PEFT_PREFIX + name.removesuffix(".weight")
            state[module + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lcfg.rank).T)
            state[module + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lcfg.rank, -1).T)
    return state


def write_peft(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False,
               base_model: str | None = None) -> dict[str, Any]:
    """A LoRA adapter checkpoint (llama.lora.save_adapters) -> a PEFT adapter directory: adapter_config.json and
    adapter_model.safetensors, staged then renamed. `base_model` (default: the base recorded with the adapters)
    goes to base_model_name_or_path; point it at this project's orbax-to-hf export of the base."""
    from llama import lora
    from llama.checkpoint import commit_dir, staging_dir

    start = time.time()
    manifest.check_no_overlap(dst, {"SRC": src}, "DST")
    cfg, lcfg, adapters, base = lora.load_adapters(src)
    if overwrite:
        manifest.check_replaceable(dst, "DST", lambda d: os.path.isfile(os.path.join(d, "adapter_config.json")),
                                   "a PEFT adapter directory (adapter_config.json)")
    out_dtype = np.dtype(dtype or "float32")
    state = {n: x.astype(out_dtype) for n, x in peft_state(cfg, lcfg, adapters).items()}
    by_param = {t.param[-1]: t for t in TABLE}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
              "lora_dropout": lcfg.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "base_model_name_or_path": base_model or base,
              "target_modules": sorted(by_param[t].hf.split(".")[-2] for t in lcfg.targets)}
    tmp = staging_dir(dst, overwrite)
    try:
        plan = [(n, x.shape, x.dtype) for n, x in state.items()]
        write_safetensors_shards(tmp, iter(state.items()), plan, shard_bytes=2**62)  # one file
        os.replace(os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        commit_dir(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise manifest.naming(e, dst)
    return {"direction": "orbax-to-peft", "src": src, "dst": os.path.abspath(dst), "dtype": str(out_dtype),
            "params": sum(x.size for x in state.values()), "rank": lcfg.rank, "targets": config["target_modules"],
            "files": ["adapter_config.json", "adapter_model.safetensors"], "seconds": round(time.time() - start, 2)}


def convert(direction: str, src: str, dst: str, *, dtype: str | None = None, shard_bytes: int = 5 * 2**30,
            overwrite: bool = False, progress: bool = True, quantize: str | None = None) -> dict[str, Any]:
    """One conversion, e.g. convert("hf-to-orbax", "Llama-3.1-8B", "ckpt/8b", dtype="bfloat16"). Returns a
    summary. Nothing is written to `dst` unless the whole conversion succeeds. quantize="int8" (to orbax
    only): an int8 checkpoint (`llama.generate` serves it as it is)."""
    kinds = {"hf", "meta", "llama2c", "orbax"}
    parts = direction.split("-to-")
    if len(parts) != 2 or parts[0] not in kinds or parts[1] not in ("hf", "orbax"):
        raise ConvertError(f"unknown conversion {direction!r}; expected one of "
                           f"{', '.join(f'{a}-to-{b}' for a in sorted(kinds) for b in ('hf', 'orbax'))}")
    if quantize and parts[1] != "orbax":
        raise ConvertError(f"--quantize {quantize}: int8 checkpoints are Orbax checkpoints; use {parts[0]}-to-orbax")
    start = time.time()
    manifest.check_no_overlap(dst, {"SRC": src}, "DST")  # --overwrite would otherwise delete the source
    cfg, state = open_source(parts[0], src)
    out_dtype = _dtype_of(state, dtype)
    if out_dtype not in ("float32", "bfloat16", "float16"):
        raise ConvertError(f"--dtype {out_dtype!r}: expected float32, bfloat16 or float16")
    check_names(state, cfg, src)  # a bad source fails before the destination is looked at
    if overwrite:
        manifest.check_replaceable(dst, "DST", _is_converted_checkpoint,
                                   "a model checkpoint (config.json with params/ or *.safetensors)")
    cfg = cfg.replace(param_dtype=out_dtype, compute_dtype=out_dtype)
    if parts[1] == "orbax":
        src_files = sorted(os.path.join(src, f) for f in os.listdir(src)) if os.path.isdir(src) else [src]
        write_orbax(dst, cfg, state, where=src, overwrite=overwrite, progress=progress,
                    provenance={"converted_from": direction, "source": os.path.abspath(src),
                                "source_files": [f for f in src_files if os.path.isfile(f)][:64]},
                    quantize=quantize)
        files = ["config.json", "manifest.json", "params/"]
    else:
        files = write_hf(dst, cfg, state, where=src, shard_bytes=shard_bytes, overwrite=overwrite, progress=progress)
        files += ["config.json", "generation_config.json"] + (["model.safetensors.index.json"] if len(files) > 1 else [])
    n = cfg.param_count()
    return {"direction": direction, "src": src, "dst": os.path.abspath(dst), "dtype": out_dtype, "params": n,
            "quantize": quantize, "bytes": _stored_bytes(cfg, quantize), "files": files, "seconds": round(time.time() - start, 2),
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("remat", "attention_impl")}}


def _is_converted_checkpoint(d: str) -> bool:
    """What --overwrite may replace: an Orbax model checkpoint or a Hugging Face model directory."""
    from llama.checkpoint import is_model_checkpoint

    return is_model_checkpoint(d) or (os.path.isfile(os.path.join(d, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(d)))


def _stored_bytes(cfg: ModelConfig, quantize: str | None) -> int:
    from llama import quant
    from llama.checkpoint import expected_params

    return quant.param_bytes(expected_params(cfg, quantize == "int8"))


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", help="SRC-to-DST with SRC in hf, meta, llama2c, orbax and DST in hf, orbax; or "
                    "orbax-to-peft (a LoRA adapter checkpoint, llama/lora.py, to a PEFT adapter directory)")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the source's dtype")
    ap.add_argument("--shard-size", default=5 * 2**30, type=cli.byte_size,
                    help="largest safetensors shard for *-to-hf (default 5GB = 5 GiB; KB/MB/GB are powers of 1024)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once done)")
    ap.add_argument("--quantize", choices=("int8",), help="*-to-orbax: store int8 linear weights (llama/quant.py)")
    ap.add_argument("--base-model", help="orbax-to-peft: base_model_name_or_path in adapter_config.json "
                    "(default: the base recorded with the adapters)")
    args = ap.parse_args(argv)
    if args.direction == "orbax-to-peft":
        if args.quantize:
            raise ConvertError("--quantize: orbax-to-peft exports LoRA adapters, which are not quantized")
        s = write_peft(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, base_model=args.base_model)
        print(f"wrote {s['dst']} (orbax-to-peft, {s['dtype']}): LoRA rank {s['rank']} on {', '.join(s['targets'])}, "
              f"{s['params']:,} parameters in {s['seconds']} s\n  files: {', '.join(s['files'])}")
        return 0
    summary = convert(args.direction, args.src, args.dst, dtype=args.dtype, shard_bytes=args.shard_size,
                      overwrite=args.overwrite, quantize=args.quantize)  # errors: cli.command (exit 2)
    c = summary["config"]
    kind = summary["dtype"] + (", int8 linear weights" if summary["quantize"] else "")
    print(f"wrote {summary['dst']} ({summary['direction']}, {kind}): {summary['params']:,} parameters, "
          f"{summary['bytes'] / 2**20:,.1f} MiB in {summary['seconds']} s\n"
          f"  model: vocab {c['vocab_size']}, dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads "
          f"({c['n_kv_heads']} kv), ffn {c['ffn_dim']}, tied={c['tie_embeddings']}\n  files: {', '.join(summary['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
