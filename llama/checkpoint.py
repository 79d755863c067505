"""Model checkpoints with Orbax: a directory D holding D/config.json (ModelConfig.to_dict()) and D/params/
(an Orbax PyTree checkpoint of the parameter pytree), so that a checkpoint alone rebuilds the model.

`load_model` also reads a training run's checkpoints (Orbax CheckpointManager: RUN/checkpoints/<step>/ with
items "params" and "config" = {"model": ModelConfig dict, ...}), and restores straight onto a mesh: every
array is read with its target sharding, so each device reads only its own shards, whatever mesh or device
count wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from llama.config import ModelConfig
from llama.model import abstract_params, param_specs


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is incomplete, or does not match the model config."""


CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
INT8_NOTE = "int8 weight-only, symmetric, one float32 scale per output channel (llama/quant.py)"


# ----------------------------------------------------------------------------------------- atomic writes
# Staged beside the destination, then renamed (one implementation for every command: llama/manifest.py).
from llama.manifest import OutputError, commit_dir, naming  # noqa: E402
from llama.manifest import staging_dir as _staging_dir  # noqa: E402


def staging_dir(dst: str, overwrite: bool = False) -> str:
    try:
        return _staging_dir(dst, overwrite)
    except OutputError as e:
        raise CheckpointError(str(e)) from None


def is_model_checkpoint(directory: str) -> bool:
    """A model checkpoint (config.json + params/), as save_model writes it; not a training run."""
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


def expected_params(cfg: ModelConfig, quantized: bool = False):
    """The abstract param tree a checkpoint of `cfg` stores: the model's parameters or, for an int8 checkpoint
    (llama/quant.py), {"q": int8, "scale": float32} in place of each linear weight."""
    if not quantized:
        return abstract_params(cfg)
    from llama import quant

    return quant.to_dicts(jax.eval_shape(quant.quantize_params, abstract_params(cfg)))


def _quantized(tree) -> bool:
    from llama import quant

    try:
        return quant.is_quantized(tree)
    except (KeyError, TypeError):  # not even a model's tree: check_params names what is missing
        return False


def check_params(params, cfg: ModelConfig, where: str = "params") -> None:
    """The pytree has exactly the config's parameters (plain or int8) with the config's shapes; errors name
    each mismatch."""
    from llama import quant

    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected_params(cfg, _quantized(params)))[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(quant.to_dicts(params))[0]}
    problems = [f"{k}: missing (config needs {want[k]})" for k in sorted(set(want) - set(have))]
    problems += [f"{k}: not in the config's model (shape {have[k]})" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: shape {have[k]}, config needs {want[k]}" for k in sorted(set(want) & set(have))
                 if want[k] != have[k]]
    if problems:
        raise CheckpointError(f"{where} does not match the model config ({_describe(cfg)}):\n  " + "\n  ".join(problems))


def _describe(cfg: ModelConfig) -> str:
    return (f"vocab={cfg.vocab_size} dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
            f"head_dim={cfg.head_dim} ffn={cfg.ffn_dim} tied={cfg.tie_embeddings}")


# ------------------------------------------------------------------------------------------------- save
def _write_config_and_manifest(tmp: str, cfg: ModelConfig, provenance: dict | None) -> None:
    """D/config.json, and D/manifest.json (llama.manifest: versions, git state, devices; `provenance` says
    where the weights came from, e.g. the conversion's source files)."""
    from llama import manifest

    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    provenance = dict(provenance or {})
    manifest.write_manifest(tmp, config=cfg, data_files=provenance.pop("source_files", None), extra=provenance)


def save_model(directory: str, cfg: ModelConfig, params, *, overwrite: bool = False,
               provenance: dict | None = None) -> str:
    """Writes D/config.json, D/manifest.json and D/params/ atomically (staged beside D, then renamed). Returns D."""
    from llama import quant

    check_params(params, cfg)
    if quant.is_quantized(params):
        provenance = {**(provenance or {}), "weights": INT8_NOTE}
    tmp = staging_dir(directory, overwrite)
    try:
        _write_config_and_manifest(tmp, cfg, provenance)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), quant.to_dicts(params))
        commit_dir(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, directory)
    return os.path.abspath(directory)


def save_model_streaming(directory: str, cfg: ModelConfig, arrays: Iterable[tuple[tuple[str, ...], np.ndarray]],
                         *, overwrite: bool = False, on_write=None, provenance: dict | None = None,
                         quantized: bool = False) -> str:
    """Like save_model, but takes (path, array) pairs one at a time and writes each before the next is
    made, with Orbax partial saves, so host memory holds one parameter at once (HF -> Orbax conversion).
    quantized: the pairs are an int8 checkpoint's (("layers", "wq", "q"), ...; `expected_params`)."""
    from orbax.checkpoint.experimental.v1 import partial

    want = {tuple(str(k.key) for k in p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected_params(cfg, quantized))[0]}
    if quantized:
        provenance = {**(provenance or {}), "weights": INT8_NOTE}
    tmp = staging_dir(directory, overwrite)
    try:
        _write_config_and_manifest(tmp, cfg, provenance)
        target = os.path.join(tmp, "partial")
        seen = set()
        for path, x in arrays:
            if want.get(path) != tuple(x.shape):
                raise CheckpointError(f"parameter {'/'.join(path)} has shape {tuple(x.shape)}; config needs "
                                      f"{want.get(path, 'no such parameter')}")
            tree: dict = {}
            node = tree
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = x
            partial.save(target, tree)
            seen.add(path)
            if on_write:
                on_write(path, x)
            del tree, node, x  # release this parameter before the iterator makes the next one
        if seen != set(want):
            raise CheckpointError(f"parameters never written: {sorted('/'.join(p) for p in set(want) - seen)}")
        partial.finalize(target)
        # The v1 layout wraps the PyTree checkpoint in target/state/; unwrap it so that every model
        # checkpoint has the same layout (a v0 PyTree checkpoint in params/).
        os.rename(os.path.join(target, "state"), os.path.join(tmp, PARAMS_DIR))
        with open(os.path.join(target, "_CHECKPOINT_METADATA")) as f:
            meta = json.load(f)
        meta["item_handlers"] = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
        with open(os.path.join(tmp, PARAMS_DIR, "_CHECKPOINT_METADATA"), "w") as f:
            json.dump(meta, f)
        shutil.rmtree(target)
        commit_dir(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, directory)
    return os.path.abspath(directory)


# ------------------------------------------------------------------------------------------------- load
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(directory: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, Orbax params dir) of a checkpoint or run (`resolve`); a bad config names its file."""
    from llama.config import ConfigError

    cfg_dict, params_dir = resolve(directory)
    try:
        return ModelConfig.from_dict(cfg_dict), params_dir
    except (ConfigError, TypeError) as e:
        where = os.path.join(os.path.dirname(params_dir), CONFIG_FILE)
        raise CheckpointError(f"{where if os.path.isfile(where) else os.path.dirname(params_dir)}: {e}") from None


class _Unreadable:
    """Turns Orbax / TensorStore failures while reading params/ (they raise bare Exceptions, with a hundred
    lines of trace) into one CheckpointError naming the checkpoint."""

    def __init__(self, params_dir: str):
        self.params_dir = params_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or not issubclass(kind, Exception) or isinstance(e, (CheckpointError, MemoryError)):
            return False
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". See full TensorStore")[0][:200]
        raise CheckpointError(f"{self.params_dir}: cannot read the parameters ({first}); the checkpoint is "
                              "incomplete or damaged (a file under params/ missing or cut short?)") from None


def _is_complete_step(path: str) -> bool:
    return (os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isdir(os.path.join(path, "config"))
            and ".orbax-checkpoint-tmp" not in os.path.basename(path))


def resolve(directory: str) -> tuple[dict, str]:
    """(ModelConfig dict, Orbax params dir) for a model checkpoint, a train-run step dir, RUN/checkpoints,
    or RUN (latest complete step)."""
    d = os.path.abspath(directory)
    if not os.path.isdir(d):
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if os.path.isfile(os.path.join(d, CONFIG_FILE)) and os.path.isdir(os.path.join(d, PARAMS_DIR)):
        return _read_json(os.path.join(d, CONFIG_FILE)), os.path.join(d, PARAMS_DIR)
    if _is_complete_step(d):  # a train step dir: config item is a JSON checkpoint of {"model": ..., ...}
        cfg_file = os.path.join(d, "config", "metadata")  # JsonCheckpointHandler's default file name
        if not os.path.isfile(cfg_file):
            raise CheckpointError(f"{cfg_file}: missing; the step's 'config' item was not written by JsonSave")
        item = _read_json(cfg_file)
        cfg_dir = os.path.dirname(cfg_file)
        if "model" not in item:
            raise CheckpointError(f"{cfg_dir}: the 'config' item has no 'model' entry (keys {sorted(item)})")
        return item["model"], os.path.join(d, PARAMS_DIR)
    if os.path.isdir(os.path.join(d, "checkpoints")):
        d = os.path.join(d, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit() and _is_complete_step(os.path.join(d, n))]
    if not steps:
        raise CheckpointError(f"{d}: neither a model checkpoint (config.json + params/) nor a train run "
                              "(checkpoints/<step>/ with 'params' and 'config' items)")
    return resolve(os.path.join(d, str(max(steps))))


def load_model(directory: str, mesh: Mesh | None = None, dtype: str | None = None) -> tuple[ModelConfig, Any]:
    """(cfg, params). With a mesh, each array is restored directly with its sharding from
    `sharding.rules.param_shardings`; without, onto the first device. `dtype` casts while reading
    (and sets cfg.param_dtype). An int8 checkpoint comes back as int8 `QuantizedWeight`s (dtype casts
    only the rest: norms, an untied embedding)."""
    from llama import quant

    cfg, params_dir = read_config(directory)
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = _metadata_tree(ckptr, params_dir)
        check_params(meta, cfg, where=params_dir)
        quantized = _quantized(meta)
        # Without a requested dtype, keep what is stored (the config's param_dtype follows the arrays).
        cfg = cfg.replace(param_dtype=dtype or str(np.dtype(meta["final_norm"].dtype)))
        abstract = expected_params(cfg, quantized)  # int8 q and float32 scales keep their dtypes
        if mesh is not None:
            from sharding.rules import param_shardings

            specs = quant.quantized_specs(cfg) if quantized else param_specs(cfg)
            shardings = quant.to_dicts(param_shardings(specs, mesh))
        else:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape),
                            target)
        with _Unreadable(params_dir):
            params = ckptr.restore(params_dir, item=target, restore_args=args)
    return cfg, quant.from_dicts(params)


def is_int8(directory: str) -> bool:
    """Whether a model checkpoint (or train run) holds int8 weights, from its metadata alone."""
    _, params_dir = resolve(directory)
    with ocp.PyTreeCheckpointer() as ckptr:
        return _quantized(_metadata_tree(ckptr, params_dir))


def _metadata_tree(ckptr, params_dir: str):
    """The params checkpoint's tree of array metadata (shapes, dtypes), read without the arrays."""
    with _Unreadable(params_dir):
        meta = ckptr.metadata(params_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    if not meta:  # Orbax reads a params/ without its _METADATA / manifest.ocdbt as an empty tree
        raise CheckpointError(f"{params_dir}: no parameters found (its metadata is missing); the checkpoint is "
                              "incomplete or damaged (a file under params/ deleted?)")
    return meta


def read_param(params_dir: str, path: tuple[str, ...], dtype=None) -> np.ndarray:
    """One parameter of an Orbax params checkpoint as a host numpy array, without reading the others
    (Orbax -> HF conversion holds one stacked parameter at a time)."""
    item: dict = {}
    node = item
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = np.zeros(())  # structure only
    node_args: dict = {}
    a = node_args
    for k in path[:-1]:
        a = a.setdefault(k, {})
    a[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    with ocp.PyTreeCheckpointer() as ckptr, _Unreadable(params_dir):
        out = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=node_args,
                                                                    partial_restore=True))
    for k in path:
        out = out[k]
    return out
