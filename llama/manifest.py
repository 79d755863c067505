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

Writing directories safely (every command that writes one uses these):
- staging_dir(dst, overwrite) / commit_dir(tmp, dst): build beside dst, then rename into place; an old dst
  is moved aside and deleted only once the new one is in place. Staging names carry host and pid, and
  staging left by a killed process for that same dst is cleaned (or a moved-aside old dst restored) first.
- check_no_overlap(dst, sources, flag): refuse a destination equal to, inside, or holding a source.
- check_replaceable(dst, flag, is_ours, what): dst may be absent, an empty directory, or what `is_ours` says
  this command wrote before; anything else is an OutputError naming it.

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
import re
import shutil
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
# (GLIBC_TUNABLES and LLAMA_*: the host's malloc, which llama/host.py sets and which moves CPU step times 10-25%.)
ENV_PREFIXES = ("JAX_", "XLA_", "TPU_", "LIBTPU_", "NCCL_", "CUDA_", "CUDNN_", "NVIDIA_TF32", "TF_CPP_", "OMP_",
                "MKL_", "PYTHONHASHSEED", "GLIBC_TUNABLES", "LLAMA_")
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


def save_figure(fig, path: str, **savefig_kw) -> str:
    """Lay out a matplotlib figure, write it to a temp file beside `path`, close it and rename: a plot is whole
    or absent. The suffix stays .png so matplotlib picks the format from it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, **savefig_kw)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ------------------------------------------------------------------------------------ directory outputs
class OutputError(ValueError):
    """A destination that would overwrite or delete something it must not (the message names it)."""


_STALE_LEGACY_S = 3600  # staging dirs named before they carried a pid: an hour without change means orphaned


def _staging_prefix(dst: str, kind: str) -> str:
    return f".{os.path.basename(dst)}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_staging(dst: str) -> list[str]:
    """Removes the staging directories a killed process left for exactly `dst` (ours: `.NAME.tmp-HOST-PID-*`
    whose PID is gone on this host; older names `.NAME.tmp-*` and `NAME.tmp-*` unchanged for an hour), and
    deals with a moved-aside old `dst` (`.NAME.old-...`): deleted when `dst` is in place, renamed back into
    place when the kill came between the two renames. Never touches a name of another pattern. Returns what
    it removed or restored."""
    dst = os.path.abspath(dst)
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    if not os.path.isdir(parent):
        return []
    ours = re.compile(r"\." + re.escape(base) + r"\.(tmp|old)-(.+)-(\d+)-[a-z0-9_]{8}")
    legacy = re.compile(r"\.?" + re.escape(base) + r"\.(tmp|old)-[a-z0-9_]{8}")
    done = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        m = ours.fullmatch(name)
        if m:
            stale = m.group(2) == socket.gethostname() and not _alive(int(m.group(3)))
        elif legacy.fullmatch(name):
            try:
                stale = datetime.datetime.now().timestamp() - os.stat(path).st_mtime > _STALE_LEGACY_S
            except OSError:
                continue
        else:
            continue
        if not stale or not os.path.isdir(path) or os.path.islink(path):
            continue
        kind = (m or legacy.fullmatch(name)).group(1)
        if kind == "old" and not os.path.exists(dst):
            inner = [os.path.join(path, n) for n in os.listdir(path)]
            if len(inner) == 1 and os.path.isdir(inner[0]):
                os.rename(inner[0], dst)  # the previous dst, moved aside by a process killed mid-commit
                done.append(f"restored {dst} from {path}")
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path}")
    return done


def staging_dir(dst: str, overwrite: bool = False) -> str:
    """A fresh temporary directory beside `dst` (same filesystem, so the final rename is atomic), named for
    this host and process so that a later run can tell an orphan from a live one (clean_stale_staging)."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise OutputError(f"{dst} already exists; choose another destination or pass overwrite=True")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    for line in clean_stale_staging(dst):
        print(f"note: {line} (left by a killed run)", file=sys.stderr)
    return tempfile.mkdtemp(prefix=_staging_prefix(dst, "tmp"), dir=parent)


def commit_dir(tmp: str, dst: str) -> None:
    """Moves a finished staging directory into place. An existing `dst` (overwrite) is moved aside first
    and deleted only after the new one is in place, so a crash never leaves a half-written `dst` (and
    clean_stale_staging puts the old one back if the crash came between the renames)."""
    dst = os.path.abspath(dst)
    old = None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output gets the usual permissions
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=_staging_prefix(dst, "old"), dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "x"))
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def naming(e: BaseException, dst) -> BaseException:
    """`raise naming(e, dst)` in an except block: an OSError that names no file (a full disk while writing or
    closing a file) becomes one naming `dst`, so the one-line error says where; anything else is `e` itself."""
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
        new = OSError(e.errno, e.strerror or str(e), os.fspath(dst))
        new.__cause__ = e
        return new
    return e


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def check_no_overlap(dst, sources: Mapping[str, Any], flag: str = "destination") -> None:
    """OutputError unless `dst` and every source path are disjoint: not equal, neither inside the other
    (symlinks resolved). `sources` maps a label (e.g. "SRC", "--checkpoint") to a path or list of paths;
    None entries are skipped. A destination holding its source would be replaced, source and all."""
    d = _real(dst)
    for label, paths in sources.items():
        for p in ([paths] if isinstance(paths, (str, os.PathLike)) else (paths or [])):
            s = _real(p)
            if d == s:
                raise OutputError(f"{flag} {dst}: is the same path as {label} {p}; write somewhere else")
            if s.startswith(d.rstrip(os.sep) + os.sep):
                raise OutputError(f"{flag} {dst}: contains {label} {p}; replacing it would delete the source")
            if d.startswith(s.rstrip(os.sep) + os.sep):
                raise OutputError(f"{flag} {dst}: is inside {label} {p}; write outside the source")


def check_replaceable(dst, flag: str, is_ours, what: str) -> None:
    """OutputError unless `dst` is absent, an empty directory, or (is_ours(dst)) an earlier output of this
    command, described by `what` (e.g. "a comparison report (report.json, probe.npz, manifest.json)")."""
    dst = os.fspath(dst)
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise OutputError(f"{flag} {dst}: exists and is not a directory; it may only replace {what}")
    if not os.listdir(dst) or is_ours(dst):
        return
    raise OutputError(f"{flag} {dst}: exists and is not {what}; refusing to write there (choose another path, "
                      "or remove it yourself)")


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_benchmark(name: str, results: Mapping[str, Any], *, config: Any = None, data_files=None,
                    out_root: str | os.PathLike = os.path.join("runs", "benchmarks")) -> str:
    """Every benchmark's figures land beside the manifest that says what produced them."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(os.fspath(out_root), f"{name}-{stamp}")
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "results.json"), json.dumps(to_jsonable(dict(results)), indent=2, sort_keys=True))
    write_manifest(out, config=config, data_files=data_files, extra={"benchmark": name, "command": sys.argv})
    return out
