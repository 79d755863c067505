"""Run manifests: one small JSON file that says exactly what produced a result.

Every training run, checkpoint, generation report, benchmark and comparison report writes one:

    from llama import manifest
    manifest.write_manifest(out_dir, config=cfg, mesh=mesh, seeds={"init": 0, "data": 1},
                            data_files=[train_path], extra={"command": sys.argv})
    # -> out_dir/manifest.json (written to a temp file, then renamed)

API
- build_manifest(*, config=None, mesh=None, seeds=None, data_files=None, extra=None) -> dict
    config: a dataclass (ModelConfig, a train config, ...), a dict of them, or a plain dict; dataclasses are
            turned into dicts recursively (tuples -> lists), so the manifest holds the full resolved config.
    mesh: a jax.sharding.Mesh (its axis names and shape are recorded) or None.
    seeds: any JSON-able mapping, e.g. {"init": 0, "data": 1}.
    data_files: paths (files or directories); each gets a fingerprint (see data_fingerprint).
    extra: any JSON-able mapping, stored under "extra" (command line, step, checkpoint path...).
- write_manifest(out_dir, *, filename="manifest.json", **same keywords) -> path of the written file.
- write_benchmark(name, results, *, config=None, data_files=None, out_root="runs/benchmarks") -> directory:
    a benchmark's results.json beside its manifest.json, in out_root/<name>-<UTC time>/.
- read_manifest(path_or_dir) -> dict.
- data_fingerprint(paths, head_bytes=HEAD_BYTES) -> list of {"path", "kind", "size", "sha256_head", ...}.
- git_state(path=None) -> {"commit", "dirty", "root"} or {"commit": None, "error": ...} without git.
- environment() -> versions, backend, devices, processes, XLA flags and relevant environment variables.

The manifest never fails a run: each probe that can fail (git absent, jax not initialised, a missing
package) records None or an "error" string instead of raising. Keys are sorted so two manifests diff cleanly.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 1
# Hashing the first MiB of each file identifies a data file cheaply (a 100 GB shard is not read whole);
# the size is recorded beside it, so an appended or truncated file still changes the fingerprint.
HEAD_BYTES = 1 << 20
# A directory is fingerprinted by its listing (relative path + size) and the head hash of each file,
# up to this many files; larger directories record their listing hash only.
MAX_DIR_FILES = 256

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml_dtypes",
            "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu", "transformers",
            "torch")
# Environment variables that change numerics, placement or determinism.
ENV_PREFIXES = ("JAX_", "XLA_", "TPU_", "LIBTPU_", "NCCL_", "CUDA_", "CUDNN_", "NVIDIA_TF32", "TF_CPP_", "OMP_",
                "MKL_", "PYTHONHASHSEED")
ENV_EXCLUDE_SUBSTRINGS = ("TOKEN", "SECRET", "PASSWORD", "KEY")  # never record credentials


def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples/sets -> lists, numpy scalars/arrays -> Python numbers/lists, enums ->
    values, dtypes and other objects -> str. Recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)  # JSON has no NaN/inf
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy / jax scalars and small arrays
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


# ----------------------------------------------------------------------------------------------- git
def _git(args: list[str], cwd: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          timeout=20).stdout.strip()


def git_state(path: str | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding `path` (default: this package's source)."""
    cwd = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        root = _git(["rev-parse", "--show-toplevel"], cwd)
        commit = _git(["rev-parse", "HEAD"], cwd)
        # Untracked files count as dirty: an untracked experiment file can change what a run did.
        status = _git(["status", "--porcelain", "--untracked-files=normal"], cwd)
        out = {"root": root, "commit": commit, "dirty": bool(status)}
        if status:
            out["dirty_files"] = [line[3:] for line in status.splitlines()][:50]
            diff = subprocess.run(["git", "diff", "HEAD"], cwd=cwd, capture_output=True, timeout=20).stdout
            out["diff_sha256"] = hashlib.sha256(diff).hexdigest()  # tracked changes only
        return out
    except (OSError, subprocess.SubprocessError) as e:
        msg = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        return {"root": None, "commit": None, "dirty": None, "error": msg[:300]}


# -------------------------------------------------------------------------------------------- versions
def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def relevant_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES) and not any(s in k.upper() for s in ENV_EXCLUDE_SUBSTRINGS)}


def jax_state() -> dict[str, Any]:
    """Backend, devices and processes. Imports jax (which initialises the backend) only if the caller
    already did, so a manifest written from a non-JAX tool never grabs an accelerator."""
    if "jax" not in sys.modules:
        return {"initialised": False}
    import jax

    try:
        devices = jax.devices()
        return {
            "initialised": True,
            "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind if devices else None,
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(),
            "process_index": jax.process_index(),
            "platform_version": getattr(devices[0].client, "platform_version", None) if devices else None,
            "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "enable_x64": bool(jax.config.jax_enable_x64),
        }
    except Exception as e:  # noqa: BLE001 - a manifest records failures, it never raises them
        return {"initialised": False, "error": f"{type(e).__name__}: {e}"[:300]}


def mesh_state(mesh) -> dict[str, Any] | None:
    if mesh is None:
        return None
    try:
        return {"axis_names": list(mesh.axis_names), "shape": {str(k): int(v) for k, v in mesh.shape.items()},
                "device_ids": [int(d.id) for d in mesh.devices.flat][:4096]}
    except AttributeError:
        return {"repr": repr(mesh)[:500]}


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
        "jax": jax_state(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": relevant_env(),
        "argv": list(sys.argv),
    }


# ------------------------------------------------------------------------------------------------ data
def _sha256_head(path: str, head_bytes: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(head_bytes))
    return h.hexdigest()


def data_fingerprint(paths: Iterable[str | os.PathLike], head_bytes: int = HEAD_BYTES) -> list[dict[str, Any]]:
    """One entry per path. A file: size and the sha256 of its first `head_bytes` (no mtime: a copy of the
    same data has the same fingerprint). A directory (e.g. a
    prepared dataset with an index): the sha256 of its sorted listing (relative path, size) plus the head
    hash of every file up to MAX_DIR_FILES. A missing path is recorded as missing, not raised."""
    out = []
    for p in paths:
        p = os.fspath(p)
        entry: dict[str, Any] = {"path": os.path.abspath(p)}
        if os.path.isfile(p):
            entry.update(kind="file", size=os.path.getsize(p), head_bytes=head_bytes,
                         sha256_head=_sha256_head(p, head_bytes))
        elif os.path.isdir(p):
            files = sorted(os.path.relpath(os.path.join(r, f), p) for r, _, fs in os.walk(p) for f in fs)
            listing = hashlib.sha256()
            combined = hashlib.sha256()
            total = 0
            for i, rel in enumerate(files):
                size = os.path.getsize(os.path.join(p, rel))
                total += size
                listing.update(f"{rel}\0{size}\n".encode())
                if i < MAX_DIR_FILES:
                    combined.update(f"{rel}\0{_sha256_head(os.path.join(p, rel), head_bytes)}\n".encode())
            entry.update(kind="dir", n_files=len(files), size=total, listing_sha256=listing.hexdigest(),
                         head_bytes=head_bytes, files_hashed=min(len(files), MAX_DIR_FILES),
                         sha256_heads=combined.hexdigest())
        else:
            entry.update(kind="missing")
        out.append(entry)
    return out


# -------------------------------------------------------------------------------------------- manifest
def build_manifest(*, config: Any = None, mesh: Any = None, seeds: Mapping[str, Any] | None = None,
                   data_files: Iterable[str | os.PathLike] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest as a JSON-able dict (see the module docstring for the arguments)."""
    return to_jsonable({
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "git": git_state(),
        "environment": environment(),
        "mesh": mesh_state(mesh),
        "seeds": dict(seeds) if seeds is not None else None,
        "data": data_fingerprint(data_files) if data_files else [],
        "extra": dict(extra) if extra is not None else {},
    })


def atomic_write(path: str, data: str | bytes) -> str:
    """Write `data` (text as UTF-8) to a temp file of its own in the same directory, fsync, then rename: readers
    never see half a file, and processes writing the same file at once each rename a whole one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); a result file is readable like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_manifest(out_dir: str | os.PathLike, *, filename: str = "manifest.json", **kwargs) -> str:
    """build_manifest(**kwargs) written atomically to out_dir/filename; returns the path."""
    m = build_manifest(**kwargs)
    return atomic_write(os.path.join(os.fspath(out_dir), filename), json.dumps(m, indent=1, sort_keys=True) + "\n")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest here (expected a manifest.json written by "
                                "llama.manifest.write_manifest)") from None


def write_benchmark(name: str, results: Mapping[str, Any], *, config: Any = None, data_files=None,
                    out_root: str | os.PathLike = os.path.join("runs", "benchmarks")) -> str:
    """Every benchmark's figures land beside the manifest that says what produced them."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(os.fspath(out_root), f"{name}-{stamp}")
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "results.json"), json.dumps(to_jsonable(dict(results)), indent=2, sort_keys=True))
    write_manifest(out, config=config, data_files=data_files, extra={"benchmark": name, "command": sys.argv})
    return out
