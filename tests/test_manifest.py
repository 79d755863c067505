"""The run manifest: complete, JSON, atomic, and tolerant of a missing git."""

import json
import os

import jax
import numpy as np

from llama import manifest
from llama.config import TINY
from sharding.rules import MeshConfig, make_mesh


def test_manifest_records_config_versions_mesh_seeds_env_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true")
    monkeypatch.setenv("SOME_API_TOKEN", "secret")  # credentials are never recorded
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # the host's malloc (llama/host.py)
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc" * 1000)
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "index.json").write_text("{}")
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1), jax.devices())
    path = manifest.write_manifest(tmp_path / "run", config={"model": TINY, "train": {"steps": 3}}, mesh=mesh,
                                   seeds={"init": 0, "data": np.int32(1)}, data_files=[data, folder],
                                   extra={"step": 3})
    assert path == str(tmp_path / "run" / "manifest.json")
    m = json.loads(open(path).read())
    assert m == manifest.read_manifest(tmp_path / "run")
    assert m["config"]["model"] == json.loads(json.dumps(TINY.to_dict()))  # full resolved config, tuples -> lists
    assert m["config"]["train"] == {"steps": 3}
    assert m["seeds"] == {"init": 0, "data": 1}
    env = m["environment"]
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        assert env["packages"][pkg], pkg
    assert env["python"].count(".") == 2
    assert env["jax"]["backend"] == "cpu" and env["jax"]["device_count"] == 8 and env["jax"]["process_count"] == 1
    assert "--xla_gpu_deterministic_ops=true" in env["xla_flags"]
    assert "XLA_FLAGS" in env["env"] and "SOME_API_TOKEN" not in env["env"]
    assert env["env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert m["mesh"]["axis_names"] == ["data", "fsdp", "context", "tensor"]
    assert m["mesh"]["shape"] == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert len(m["git"]["commit"]) == 40 and isinstance(m["git"]["dirty"], bool)
    f, d = m["data"]
    assert f["kind"] == "file" and f["size"] == 3000 and len(f["sha256_head"]) == 64
    assert d["kind"] == "dir" and d["n_files"] == 1
    assert m["extra"] == {"step": 3}
    assert not [p for p in os.listdir(tmp_path / "run") if p != "manifest.json"]  # no temp files left


def test_data_fingerprint_changes_with_content_and_size(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello")
    a = manifest.data_fingerprint([p])[0]
    p.write_text("hellp")
    b = manifest.data_fingerprint([p])[0]
    p.write_text("hellp!")
    c = manifest.data_fingerprint([p], head_bytes=5)[0]
    assert a["sha256_head"] != b["sha256_head"]
    assert c["sha256_head"] == b["sha256_head"] and c["size"] != b["size"]  # size catches appends past the head
    assert manifest.data_fingerprint([tmp_path / "missing"])[0]["kind"] == "missing"


def test_git_absent_is_recorded_not_raised(tmp_path, monkeypatch):
    g = manifest.git_state(str(tmp_path))  # not a repository
    assert g["commit"] is None and g["error"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    g = manifest.git_state()
    assert g["commit"] is None and g["error"]
