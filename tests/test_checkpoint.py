"""Orbax model checkpoints: exact round trip, restore straight onto a mesh (another mesh and device count
than the saver's), train-run checkpoints, shape mismatches named, atomic writes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama import model
from llama.checkpoint import CheckpointError, load_model, read_param, save_model, save_model_streaming
from llama.config import TINY, TINY_TIED
from sharding.rules import MeshConfig, make_mesh, param_shardings


def params_for(cfg, seed=0):
    """Random params in the config's dtype (numpy: much faster here than jitting the real init per leaf)."""
    leaves, treedef = jax.tree.flatten(model.param_specs(cfg), is_leaf=model.is_spec)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(s.shape), cfg.param_dtype) for s in leaves])


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("cfg", [TINY, TINY_TIED.replace(param_dtype="bfloat16")], ids=["f32", "tied-bf16"])
def test_save_load_round_trip(tmp_path, cfg):
    params = params_for(cfg)
    save_model(str(tmp_path / "m"), cfg, params)
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    cfg2, params2 = load_model(str(tmp_path / "m"))
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert_same(params, params2)
    assert all(x.dtype == jnp.dtype(cfg.param_dtype) for x in jax.tree.leaves(params2))


def test_restore_onto_another_mesh_and_device_count(tmp_path):
    cfg = TINY
    saver_mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    shardings = param_shardings(model.param_specs(cfg), saver_mesh)
    params = jax.device_put(params_for(cfg), shardings)  # saved from 8 devices, sharded
    save_model(str(tmp_path / "m"), cfg, params)

    for mesh_cfg, devices in [(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]),
                              (MeshConfig(data=2, fsdp=4, tensor=1), jax.devices()[:8]),
                              (MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[5:6])]:
        mesh = make_mesh(mesh_cfg, devices)
        _, restored = load_model(str(tmp_path / "m"), mesh=mesh)
        want = param_shardings(model.param_specs(cfg), mesh)
        for got, w, orig in zip(jax.tree.leaves(restored), jax.tree.leaves(want), jax.tree.leaves(params)):
            assert got.sharding.is_equivalent_to(w, got.ndim)
            # each device holds exactly its shard, no more
            for shard in got.addressable_shards:
                assert shard.data.shape == w.shard_shape(got.shape)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(orig))


def test_load_with_dtype(tmp_path):
    params = params_for(TINY)
    save_model(str(tmp_path / "m"), TINY, params)
    cfg, p = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and p["layers"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p["embed"]), np.asarray(params["embed"].astype(jnp.bfloat16)))


def test_mismatched_config_is_named(tmp_path):
    save_model(str(tmp_path / "m"), TINY, params_for(TINY))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["ffn_dim"] = 128
    cfg["tie_embeddings"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / "m"))
    msg = str(e.value)
    assert "['layers']['w_gate']: shape (2, 64, 192), config needs (2, 64, 128)" in msg, msg
    assert "['lm_head']: not in the config's model" in msg, msg


def test_save_rejects_params_not_matching_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['layers'\]\['wq'\]: shape"):
        save_model(str(tmp_path / "m"), TINY.replace(n_heads=8, n_kv_heads=2, head_dim=16), params_for(TINY))
    assert not os.listdir(tmp_path)


def test_existing_destination_not_overwritten_unless_asked(tmp_path):
    save_model(str(tmp_path / "m"), TINY, params_for(TINY, 0))
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(str(tmp_path / "m"), TINY, params_for(TINY, 1))
    assert_same(load_model(str(tmp_path / "m"))[1], params_for(TINY, 0))
    save_model(str(tmp_path / "m"), TINY, params_for(TINY, 1), overwrite=True)
    assert_same(load_model(str(tmp_path / "m"))[1], params_for(TINY, 1))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging or old directories left


def test_streaming_save_equals_save(tmp_path):
    params = params_for(TINY_TIED)
    flat = [(tuple(k.key for k in p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    save_model_streaming(str(tmp_path / "s"), TINY_TIED, iter(flat))
    cfg, restored = load_model(str(tmp_path / "s"))
    assert cfg == TINY_TIED
    assert_same(params, restored)
    np.testing.assert_array_equal(read_param(str(tmp_path / "s" / "params"), ("layers", "wo")),
                                  np.asarray(params["layers"]["wo"]))
    with pytest.raises(CheckpointError, match="never written.*final_norm"):
        save_model_streaming(str(tmp_path / "t"), TINY_TIED, iter(flat[:1]))
    assert not (tmp_path / "t").exists()


def _train_run(run_dir, cfg, steps):
    """Checkpoints as llama/train.py writes them: CheckpointManager items params/opt_state/config/..."""
    mngr = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    for step, seed in steps:
        params = params_for(cfg, seed)
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave({"mu": params}),
            config=ocp.args.JsonSave({"model": cfg.to_dict(), "train": {"steps": 10}}),
            meta=ocp.args.JsonSave({"step": step})))
    mngr.wait_until_finished()
    mngr.close()


def test_loads_train_run_checkpoints(tmp_path):
    run = tmp_path / "run"
    _train_run(str(run), TINY, [(10, 1), (20, 2)])
    os.makedirs(run / "checkpoints" / "30.orbax-checkpoint-tmp-123" / "params")  # an unfinished save: ignored
    for path in (run, run / "checkpoints"):
        cfg, params = load_model(str(path))
        assert cfg == TINY
        assert_same(params, params_for(TINY, 2))  # the latest complete step
    cfg, params = load_model(str(run / "checkpoints" / "10"), mesh=make_mesh(MeshConfig(fsdp=4, tensor=2)))
    assert_same(params, params_for(TINY, 1))
    with pytest.raises(CheckpointError, match="neither a model checkpoint"):
        load_model(str(tmp_path))


def test_train_run_converts_to_hf(tmp_path):
    from llama.convert import HFCheckpoint, convert, params_to_hf

    _train_run(str(tmp_path / "run"), TINY, [(5, 4)])
    convert("orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    got = HFCheckpoint(str(tmp_path / "hf"))
    want = params_to_hf(jax.tree.map(np.asarray, params_for(TINY, 4)), TINY)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ------------------------------------------------------------------------------------------ int8 checkpoints
@pytest.mark.parametrize("cfg", [TINY, TINY_TIED.replace(param_dtype="bfloat16")], ids=["f32", "tied-bf16"])
def test_int8_save_load_round_trip_onto_a_mesh(tmp_path, cfg):
    """An int8 model saves as {"q", "scale"} per linear weight and loads back as the same QuantizedWeights,
    whole or straight onto a mesh with the int8 shardings."""
    from llama import quant
    from llama.checkpoint import is_int8

    q = quant.quantize_params(params_for(cfg))
    save_model(str(tmp_path / "q"), cfg, q)
    assert is_int8(str(tmp_path / "q"))
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert m["extra"]["weights"].startswith("int8")
    cfg2, q2 = load_model(str(tmp_path / "q"))
    assert cfg2 == cfg and quant.is_quantized(q2)
    assert jax.tree.structure(q2) == jax.tree.structure(q)
    assert_same(q, q2)
    assert q2["layers"]["wq"].q.dtype == jnp.int8 and q2["layers"]["wq"].scale.dtype == jnp.float32
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    _, on_mesh = load_model(str(tmp_path / "q"), mesh=mesh)
    want = param_shardings(quant.quantized_specs(cfg), mesh)
    for got, w in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(w, got.ndim)
    assert_same(q, on_mesh)


def test_int8_checkpoint_shapes_are_checked(tmp_path):
    from llama import quant

    q = quant.quantize_params(params_for(TINY))
    q["layers"]["wq"] = quant.QuantizedWeight(q["layers"]["wq"].q, q["layers"]["wq"].scale[:, :, :1])
    with pytest.raises(CheckpointError, match=r"\['layers'\]\['wq'\]\['scale'\]: shape"):
        save_model(str(tmp_path / "bad"), TINY, q)
    assert not (tmp_path / "bad").exists()
