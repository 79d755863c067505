"""Multi-host: the one `jax.distributed` initialisation path, global batches from process-local data, and
output (logs, small files) from process 0 only.

JAX's multi-controller model: every host runs the same program on its own local devices; `jax.devices()` lists
all devices of all hosts, a jitted step runs on a mesh spanning them, and collectives cross hosts through the
runtime (NCCL on GPU, ICI/DCN on TPU, gloo on CPU). Nothing here is home-made networking.

    from sharding import distributed
    distributed.add_flags(parser)                 # --coordinator, --num-processes, --process-id, ...
    info = distributed.initialize_from_args(args)  # before any other JAX call
    batch = distributed.global_batch(local_numpy_batch, mesh)
    distributed.log0("step %d loss %.3f", step, loss)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.rules import batch_sharding

logger = logging.getLogger("llama")


@dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    method: str  # "single" (no jax.distributed), "explicit" (flags / JAX_* env) or the detected cluster


def detect_cluster() -> str | None:
    """Which cluster environment `jax.distributed.initialize()` can configure itself from, judged by the same
    environment variables JAX's own cluster classes read (jax/_src/clusters/*.py), or None. A one-task job
    (e.g. a SLURM allocation running a single process) counts as no cluster."""
    env = os.environ
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):
        return "slurm" if int(env["SLURM_NTASKS"]) > 1 else None
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi" if int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1 else None
    if "KUBERNETES_SERVICE_HOST" in env and ("JOB_COMPLETION_INDEX" in env or "JOBSET_NAME" in env):
        return "k8s"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    if hosts and ("," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env):
        return "tpu"  # multi-host TPU VM / GKE / multi-slice; a single TPU host needs no initialisation
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> ProcessInfo:
    """The one initialisation path. Call before any other JAX call that touches devices.

    - explicit: `coordinator` ("host:port" of process 0), `num_processes` and `process_id` (all three; the
      JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables stand in for them);
    - otherwise, on SLURM (srun), Open MPI (mpirun), Kubernetes (an indexed Job / JobSet) and multi-host
      Cloud TPU, `jax.distributed.initialize()` detects everything itself;
    - otherwise one process: nothing to initialise.
    `cpu_collectives` ("gloo" or "mpi") lets CPU devices of different processes talk (tests, CPU clusters).
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("multi-host: give all of --coordinator HOST:PORT, --num-processes N and --process-id I "
                         f"(got coordinator={coordinator!r}, num_processes={num_processes}, "
                         f"process_id={process_id}), or none of them to auto-detect SLURM/Kubernetes/TPU")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must lie in [0, --num-processes {num_processes})")
        method = "explicit"
    else:
        method = detect_cluster() or "single"
    if method != "single":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id) \
            if method == "explicit" else {}
        jax.distributed.initialize(**kwargs, local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    info = ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                       method)
    configure_logging()
    log0("jax.distributed: %s", info)
    return info


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (omit on SLURM/Kubernetes/TPU)")
    g.add_argument("--num-processes", type=int, default=None, help="total number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0-based")
    g.add_argument("--local-device-ids", default=None, help="comma-separated local devices (one process per GPU)")


def initialize_from_args(args: argparse.Namespace) -> ProcessInfo:
    ids = [int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids else None
    return initialize(args.coordinator, args.num_processes, args.process_id, ids)


# ---------------------------------------------------------------------------------------------- data
def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows ([B_local, T, ...] numpy, the input pipeline's shard) into global arrays
    [B_local * num_processes, T, ...] sharded by the rules' batch axes. Process p's rows become global rows
    p*B_local ... (p+1)*B_local - 1 (the mesh's batch axes follow process order)."""
    out = {}
    for k, x in local.items():
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, shape), x, shape)
    return out


# ------------------------------------------------------------------------------------------ process 0
def is_primary() -> bool:
    return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
    """Process 0 logs at `level`; the others only warnings and errors, each line tagged with its process."""
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [p{jax.process_index()}] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_primary() else logging.WARNING)
    logger.propagate = False


def log0(msg: str, *args: Any) -> None:
    """Log once per job (process 0), not once per host."""
    if is_primary():
        logger.info(msg, *args)


def barrier(name: str) -> None:
    """All processes wait here (e.g. after process 0 wrote a file the others will read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list:
    """Every process's JSON-able `obj`, in process order ([obj] for one process). For small per-process
    state that process 0 writes for all, e.g. each process's input-iterator position in a checkpoint."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
    buf = np.zeros(n, np.uint8)
    buf[:raw.size] = raw
    return [json.loads(bytes(row).rstrip(b"\0")) for row in np.asarray(multihost_utils.process_allgather(buf))]


def write_primary(path: str, data: bytes | str) -> None:
    """Process 0 writes `path` atomically (temp file + rename); every process then waits for it. For small
    files (configs, metrics, manifests). Orbax checkpoints are different: every process must call save,
    since each writes its own shards; Orbax coordinates that itself."""
    if is_primary():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    barrier(f"write_primary:{path}")


def write_json_primary(path: str, obj: Any) -> None:
    write_primary(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
