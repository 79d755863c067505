"""Two local processes x 4 CPU devices, joined by `jax.distributed` (gloo collectives over 127.0.0.1), run three
steps of the trainer's jitted train step (`llama.train.make_train_step`) on a tiny model and reach the same
losses as one process with 8 devices.

Each worker is this file run as a script; it loads only its own half of every global batch (process-local data)
and `sharding.distributed.global_batch` assembles the global array, as on a real multi-host job. The 2-process
mesh is a hybrid one (dcn_data=2: the data axis crosses the two "hosts"), built by
`mesh_utils.create_hybrid_device_mesh`; the 1-process reference uses the plain mesh of the same shape.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "data=2,fsdp=2,tensor=2"
STEPS, BATCH, SEQ = 3, 8, 16


def tiny_cfg():
    from llama.config import TINY

    return TINY.replace(dim=64, n_heads=8, n_kv_heads=2, ffn_dim=128, vocab_size=256)


def global_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)  # the same rows every step: the loss must fall
    tokens = rng.integers(0, 256, (BATCH, SEQ + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": positions, "loss_mask": np.ones((BATCH, SEQ), np.float32)}


def run_steps(dcn: str) -> list[float]:
    """Three steps of the trainer's jitted step (`llama.train.make_train_step`) under the mesh; returns the
    losses. The same code in both setups; each process passes only its own rows."""
    import jax

    from llama import optim, train
    from sharding import distributed, rules
    from sharding.mesh import MeshConfig

    mesh_cfg = MeshConfig.parse(MESH, dcn)
    cfg = train.TrainConfig(model=tiny_cfg(), mesh=mesh_cfg, batch_size=BATCH, seq_len=SEQ, steps=STEPS,
                            optimizer=optim.OptimizerConfig(peak_lr=1e-2, warmup_steps=0, decay_steps=10),
                            sample_tokens=0)
    mesh = rules.make_mesh(mesh_cfg)
    losses = []
    with jax.set_mesh(mesh):
        init_state, step = train.make_train_step(cfg, mesh)
        state = init_state(cfg.seed)
        rows = global_rows()
        n, p = BATCH // jax.process_count(), jax.process_index()
        batch = distributed.global_batch({k: v[p * n:(p + 1) * n] for k, v in rows.items()}, mesh)
        for _ in range(STEPS):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, f"127.0.0.1:{port}", "2", str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reference = run_steps("")  # this pytest process: 8 devices (conftest), one process
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, f"worker failed:\n{err[-3000:]}"
        outs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"two-process run: {time.time() - t0:.1f}s; losses {outs[0]['losses']} vs one process {reference}")
    assert [o["process_count"] for o in outs] == [2, 2] and [o["devices"] for o in outs] == [8, 8]
    # Both processes see the same global (replicated) loss. Float32 with a different all-reduce order
    # (gloo across processes vs in-process): relative agreement to ~1e-6 at loss ~5.5; 1e-5 leaves 10x room.
    np.testing.assert_allclose(outs[0]["losses"], outs[1]["losses"], rtol=0, atol=0)
    np.testing.assert_allclose(outs[0]["losses"], reference, rtol=1e-5)
    assert reference[2] < reference[0]  # it trains


_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX", "JOBSET_NAME",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                 "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def test_cluster_detection_and_flags(monkeypatch, tmp_path):
    from sharding import distributed

    for v in _CLUSTER_VARS:
        monkeypatch.delenv(v, raising=False)
    assert distributed.detect_cluster() is None
    info = distributed.initialize()  # nothing detected: one process, jax.distributed untouched
    assert (info.method, info.num_processes, info.global_devices) == ("single", 1, 8)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task allocation is a single process
    assert distributed.detect_cluster() is None
    with pytest.raises(ValueError, match="give all of --coordinator HOST:PORT, --num-processes N and --process-id I"):
        distributed.initialize(coordinator="10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"--process-id 2 must lie in \[0, --num-processes 2\)"):
        distributed.initialize("10.0.0.1:1234", 2, 2)
    path = tmp_path / "sub" / "config.json"
    distributed.write_json_primary(str(path), {"a": 1})  # process 0 writes, atomically
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["config.json"]


if __name__ == "__main__":  # a worker: COORDINATOR NUM_PROCESSES PROCESS_ID
    from sharding import distributed

    info = distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), timeout_s=60)
    losses = run_steps("data=2")
    print(json.dumps({"losses": losses, "process_count": info.num_processes, "devices": info.global_devices}))


def _train_cli(out: str, steps: int, port: int) -> None:
    """`python -m llama.train` as 2 processes x 4 CPU devices on 127.0.0.1, the way a multi-host job runs it."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "llama.train", "--config", os.path.join(ROOT, "experiments", "cpu_small.py"),
           "--out", out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--set", f"steps={steps}",
           "log_every=1", "checkpoint_every=2", "sample_tokens=0", "model.n_layers=2", "seq_len=64"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]


@pytest.mark.slow
def test_train_cli_on_two_processes_resumes_exactly(tmp_path):
    """The trainer's command line on 2 processes: a run stopped at step 4 and restarted (each process gets back
    its own input-iterator position from the checkpoint) logs the same losses as an uninterrupted run."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    _train_cli(straight, 6, _free_port())
    _train_cli(resumed, 4, _free_port())
    _train_cli(resumed, 6, _free_port())

    def losses(out, key="loss"):  # eval_loss rows: cpu_small evaluates its held-out share at the last step
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return {r["step"]: r[key] for r in map(json.loads, f) if key in r}

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # bit for bit on CPU
    # Each process evaluated its share of the held-out batches; the global mean is the one-process `ppl`.
    ea, eb = losses(straight, "eval_loss"), losses(resumed, "eval_loss")
    assert sorted(ea) == [6] and sorted(eb) == [4, 6] and ea[6] == eb[6]
    from llama import eval as llama_eval

    assert llama_eval.main(["ppl", "--checkpoint", straight, "--heldout", "--out", str(tmp_path / "ppl"),
                            "--no-progress"]) == 0
    with open(tmp_path / "ppl" / "results.json") as f:
        assert json.load(f)["heldout"]["loss"] == pytest.approx(ea[6], rel=1e-5)  # float32, other layouts
