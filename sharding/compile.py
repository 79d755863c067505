"""Ahead-of-time compilation for a TPU topology on any machine (no TPU needed): XLA's per-chip memory, the
collectives in the compiled program and the planner's estimate for the same case, before paying for a pod.

    python -m sharding.compile --preset llama3.1-8b --topology v5p:2x2x2 --mesh fsdp=8 --mode training \\
        --seq-len 8192 --batch 8 --remat full
    python -m sharding.compile --preset llama3.1-405b --topology v6e:4x4 --mesh tensor=8,fsdp=2 --mode decode \\
        --quantize int8 [--json] [--out DIR]
    python -m sharding.compile --config experiments/llama31_405b.py --topology v5p:16x16x16 --mode training

It compiles the project's real jitted programs with abstract inputs that carry the mesh shardings (nothing is
allocated): the trainer's step (`llama.train.make_train_step`, the state from `llama.train.abstract_state`),
and `llama.generate`'s prefill and decode loop (`_prefill_jit`, `_decode_jit`, with the shardings
`llama.generate._prepare` gives their inputs). The devices are libtpu's compile-only TPU devices
(`jax.experimental.topologies.get_topology_desc`), so `pip install -r requirements-tpu.txt` (libtpu pinned to
this JAX) is needed; the machine's own backend stays the CPU (`JAX_PLATFORMS=cpu` is set for the CLI).

Per chip it prints XLA's `memory_analysis()` (arguments, outputs, the part of the outputs aliased to donated
arguments, the temporaries alive at XLA's peak, and the peak itself) next to `sharding.plan`'s components for the
same case, the chip's HBM (Google's datasheets, `TPU_CHIPS`) and whether the peak fits in it (the figure XLA's
TPU compiler checks; `memory`), `temp_size_in_bytes` for reference, the compile time, and the
collectives in the compiled HLO counted per kind. The count is static: a collective inside the scanned layer
body appears once but runs once per layer. Likewise XLA's cost analysis counts the scanned body once, so the
FLOPs printed come from the model (`llama.metrics.train_flops_per_token`; inference is its forward third).

Results go to stdout (`--json` for JSON) and to OUT/results.json beside a manifest (`llama.manifest`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

MODES = ("training", "prefill", "decode")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
INSTALL_HINT = ("pip install -r requirements-tpu.txt (libtpu pinned to the installed JAX; jax 0.10.2 pins "
                "libtpu 0.0.42.*, its `jax[tpu]` extra)")

# HBM per chip, matched by substring of the compile-only device's device_kind (first match wins). Google's
# datasheets: cloud.google.com/tpu/docs/v4 (32 GiB HBM2), /v5e (16 GB), /v5p (95 GB HBM2e), /v6e (32 GB); the
# "GB" there are binary (XLA's TPU compiler reports 15.75 GiB available on a v5e and 95.74 GiB on a v5p, the
# rest reserved), so the table holds GiB. Peak bf16 FLOP/s comes from llama.metrics.PEAK_BF16_FLOPS.
TPU_CHIPS: tuple[tuple[str, str, float], ...] = (
    ("TPU v4", "v4", 32 * 2**30),
    ("TPU v5 lite", "v5e", 16 * 2**30),
    ("TPU v5e", "v5e", 16 * 2**30),
    ("TPU v5", "v5p", 95 * 2**30),
    ("TPU v6 lite", "v6e", 32 * 2**30),
    ("TPU v6e", "v6e", 32 * 2**30),
)


class CompileError(ValueError):
    """A topology, mesh or option this tool cannot compile for; the message names the flag and the fix."""


# ------------------------------------------------------------------------------------------------ devices
def _quiet_libtpu_env() -> None:
    """libtpu's compile-only client still runs its runtime's start-up checks. On a machine without TPUs these
    print five lines of warnings (no accelerator type, no worker hostnames; the metadata server is already
    skipped by jax, `TPU_SKIP_MDS_QUERY`) unless the two values are set, and a second process loading libtpu
    at the same time fails on /tmp/libtpu_lockfile unless it is allowed to. None of these matter for
    compiling; a value the user set wins."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):  # no local TPU chips
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def libtpu_version_note() -> str | None:
    """A warning when the installed libtpu is not the one this JAX pins in its `tpu` extra (a mismatched pair
    can fail to load, or compile differently from what the pod will run)."""
    from importlib import metadata

    try:
        have = metadata.version("libtpu")
        want = [r.split(";")[0].strip() for r in metadata.requires("jax") or [] if r.startswith("libtpu")]
    except metadata.PackageNotFoundError:
        return None
    if not want:
        return None
    spec = want[0].split("==", 1)[-1]
    if not re.fullmatch(re.escape(spec).replace(r"\*", ".*"), have):
        return (f"note: libtpu {have} is installed but jax {metadata.version('jax')} pins libtpu=={spec}; "
                f"pip install 'jax[tpu]=={metadata.version('jax')}' installs the matching one")
    return None


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology, e.g. 'v5e:2x2', 'v5p:2x2x1', 'v6e:16x16', 'v4:2x2x2'; or
    'local': this machine's own devices (a GPU's compile and memory analysis, or the simulated CPU devices)."""
    if topology == "local":
        import jax

        return list(jax.devices())
    if not libtpu_available():
        raise CompileError(f"--topology {topology}: compiling for TPU needs libtpu, which is not installed; "
                           f"{INSTALL_HINT}")
    if not re.fullmatch(r"v[0-9a-z]+:[0-9]+(x[0-9]+){1,2}", topology):
        raise CompileError(f"--topology {topology!r}: expected CHIP:SHAPE, e.g. v5e:2x2, v5p:2x2x1, v6e:16x16, "
                           f"v4:2x2x2")
    _quiet_libtpu_env()
    note = libtpu_version_note()
    if note:
        print(note, file=sys.stderr)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001  (libtpu's errors are JaxRuntimeError/RuntimeError with its text)
        raise CompileError(f"--topology {topology!r}: libtpu cannot build this topology ({str(e).strip()[:300]}); "
                           f"expected e.g. v5e:2x2, v5p:2x2x1, v6e:16x16, v4:2x2x2 (a shape the chip comes in)"
                           ) from None


def chip_info(device) -> tuple[str, float, float | None]:
    """(short name, memory bytes, peak bf16 FLOP/s or None) of a device: TPUs from `TPU_CHIPS`, a local device
    from what its runtime reports (`memory_stats()["bytes_limit"]`; NaN where there is none, e.g. the CPU)."""
    from llama.metrics import PEAK_BF16_FLOPS

    kind = device.device_kind
    name, hbm = next(((n, b) for sub, n, b in TPU_CHIPS if sub in kind), (kind, float("nan")))
    if hbm != hbm and getattr(device, "client", None) is not None:  # a real local device, not compile-only
        try:
            hbm = float((device.memory_stats() or {}).get("bytes_limit", hbm))
        except Exception:  # noqa: BLE001  (CPU devices have no memory stats)
            pass
    peak = next((f for sub, f in PEAK_BF16_FLOPS if sub in kind), None)
    return name, hbm, peak


def make_topology_mesh(mesh_cfg, topology: str, devices: list):
    """sharding.mesh.make_mesh over the topology's chips, with the error naming both flags."""
    from sharding.mesh import ShardingError, make_mesh

    try:
        mesh_cfg.shape(len(devices))
    except ShardingError as e:
        text = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(mesh_cfg).items() if v != 1 or k == "fsdp")
        raise CompileError(f"--mesh {text} does not fit --topology {topology} ({len(devices)} chips): {e}") from None
    return make_mesh(mesh_cfg, devices)


# ---------------------------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Case:
    """What to compile. batch: global sequences; seq_len: training T, or the inference context (the prefill's
    prompt length and the KV cache's slots)."""

    mode: str
    batch: int
    seq_len: int
    quantize: str | None = None
    cache_dtype: str | None = None
    max_new: int = 64  # inference: the `out` buffer's columns (shapes only)
    micro_batches: int = 1


def _abstract(shape_tree, sharding_tree):
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape_tree, sharding_tree)


def lower_training(train_cfg, mesh):
    """The trainer's own jitted step (`make_train_step`), lowered for the abstract state and batch."""
    import jax
    import numpy as np

    from llama import train
    from sharding import rules

    _, step = train.make_train_step(train_cfg, mesh)
    state = train.abstract_state(train_cfg, mesh)
    shape = (train_cfg.batch_size, train_cfg.seq_len)
    sh = rules.batch_sharding(mesh, 2, shape)
    batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32, sharding=sh)
             for k in train.BATCH_KEYS}
    return step.lower(state, batch)


def _prefill_inputs(cfg, mesh, case: Case):
    """The arguments and static options `llama.generate._prepare` would build for `case.batch` prompts of
    `case.seq_len` tokens, as abstract arrays with the same shardings (`generate.param_shardings`,
    `cache_sharding`, the batch fitted over data x fsdp)."""
    import jax
    import jax.numpy as jnp

    from llama import generate, model, quant
    from llama.sampling import SamplingConfig
    from sharding import rules

    params = model.abstract_params(cfg)
    if case.quantize == "int8":
        params = jax.eval_shape(quant.quantize_params, params)
    params = _abstract(params, generate.param_shardings(cfg, mesh, quantized=case.quantize == "int8"))
    B, T = case.batch, case.seq_len

    def batch_arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rules.fitted_sharding(
            mesh, ("batch",) + (None,) * (len(shape) - 1), shape))

    # The prompt in passes of at most generate.PREFILL_CHUNK tokens, by `generate._prepare`'s rule (equal chunks
    # rounded up to its BUCKET, the prompt padded to n of them), as `llama.generate` runs it by default and the
    # planner plans it. Compiling one whole-prompt pass instead made XLA's 8B prefill temp 2.55x the planner's
    # (the [1, 8192, ...] activations of one pass over 8K tokens against the planner's 4K; docs/sharding.md).
    chunk = None
    if generate.PREFILL_CHUNK < T:
        n = -(-T // generate.PREFILL_CHUNK)
        per_pass = -(-T // n)
        chunk = -(-per_pass // generate.BUCKET) * generate.BUCKET
        T = n * chunk
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (params, batch_arg((B, T), jnp.int32), batch_arg((B,), jnp.int32), batch_arg((B,), jnp.int32),
            batch_arg((B, len(cfg.eos_ids)), jnp.int32), jax.ShapeDtypeStruct(key.shape, key.dtype,
                                                                             sharding=rules.replicated(mesh)))
    static = dict(cfg=cfg, sampling=SamplingConfig(), max_new=case.max_new, cache_len=max(case.seq_len, T),
                  cache_sharding=generate.cache_sharding(cfg, mesh, B, max(case.seq_len, T)),
                  cache_dtype=case.cache_dtype, chunk=chunk)
    return args, static


def lower_inference(cfg, mesh, case: Case):
    """`llama.generate`'s prefill, or its decode loop on the state a prefill leaves (the cache sharded by the
    rules, the per-row fields fitted over the batch axes, the key replicated), traced under the mesh as
    `generate._programs` does."""
    import jax
    import jax.numpy as jnp

    from llama import generate
    from sharding import rules

    args, static = _prefill_inputs(cfg, mesh, case)
    with jax.set_mesh(mesh):
        if case.mode == "prefill":
            return generate._prefill_jit.lower(*args, **static)
        state = jax.eval_shape(lambda *a: generate.prefill(*a, **static), *args)[1]
        cache_sh = rules.cache_shardings(mesh, state.cache)

        def per_row(x):
            if x.ndim == 0 or jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                return rules.replicated(mesh)
            return rules.fitted_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape)

        shardings = dataclasses.replace(jax.tree.map(per_row, state), cache=cache_sh)
        until = jax.ShapeDtypeStruct((), jnp.int32, sharding=rules.replicated(mesh))
        return generate._decode_jit.lower(args[0], _abstract(state, shardings), until, cfg=cfg,
                                          sampling=static["sampling"])


# ------------------------------------------------------------------------------------------------ results
def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions per kind in HLO text (async `-start` halves counted, `-done` not)."""
    found = collections.Counter(re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text))
    return {k: found.get(k, 0) for k in COLLECTIVES}


def out_of_memory(message: str) -> dict | None:
    """XLA's TPU compiler stops with RESOURCE_EXHAUSTED when a program's buffers cannot fit the chip ("the total
    memory required for HLO temporaries (159.79G) exceeds available HBM (95.74G)"): that is the answer "does not
    fit", with XLA's own figures (G = GiB in XLA's messages). None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "": 1}
    found = {}
    for key, pattern in (("required", r"required for ([A-Za-z ]+?) \(([0-9.]+)([KMGT]?)\)"),
                         ("available", r"available HBM \(([0-9.]+)([KMGT]?)\)")):
        m = re.search(pattern, message)
        if m and key == "required":
            found |= {"what": m.group(1), "required_bytes": float(m.group(2)) * units[m.group(3)]}
        elif m:
            found["available_bytes"] = float(m.group(1)) * units[m.group(2)]
    first = next((line for line in message.splitlines() if "memory" in line.lower()), message.splitlines()[0])
    return {"message": first.strip()[:500], **found}


def memory(compiled) -> dict[str, int]:
    """XLA's per-chip memory: `memory_analysis()`'s sizes, and its peak of live buffers where the backend reports
    it. `total` is that peak (arguments + outputs not aliased to them + `heap`, the temporaries alive at the
    peak): the figure XLA's TPU compiler itself holds to the HBM. `temp` (`temp_size_in_bytes`) is larger in
    training steps, by about one float32 copy of the parameters, and `temp_total` = arguments + outputs - aliased +
    temp (MaxText's `print_mem_stats`) with it. Measured 2026-12-04 (docs/sharding.md, "Which XLA figure"): the
    405B step on v5p:4x4x8 compiles with a temp_total of 109.0 GB against 102.8 GB of HBM (peak 93.3 GB), and at
    1.5x its sequence length is refused for "HLO temporaries" of exactly the peak extrapolated linearly from 4K and
    8K (111.22 GB), not temp_total (128.5 GB)."""
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                  "generated_code")}
    out["peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)  # 0 where the backend does not report it
    return with_totals(out)


def with_totals(x: dict) -> dict:
    """`heap`, `total` and `temp_total` (`memory`) from XLA's raw sizes (also for results saved before they were
    recorded)."""
    unaliased = x["argument"] + x["output"] - x["alias"]
    heap = x["peak"] - unaliased if x.get("peak") else x["temp"]
    return {**x, "heap": heap, "total": unaliased + heap, "temp_total": unaliased + x["temp"]}


def planner_components(cfg, mesh_cfg, n: int, case: Case, remat: str, hbm: float,
                       loss_chunk: int | None = None) -> dict[str, float]:
    """sharding.plan's estimate for the same case, grouped the way XLA reports memory: what the program
    takes as arguments, what it returns beyond them, and its temporaries. loss_chunk: the TrainConfig's (default
    llama.loss.LOSS_CHUNK)."""
    from llama.loss import LOSS_CHUNK
    from sharding import plan as P

    mode = "training" if case.mode == "training" else "inference"
    # with gradient accumulation one micro-batch's activations are live at a time
    batch = case.batch // case.micro_batches if case.mode == "training" else case.batch
    p = P.plan(cfg, mesh_cfg, n, mode=mode, dtype=cfg.compute_dtype, quantize=case.quantize, batch=batch,
               seq_len=case.seq_len, remat=remat, device_memory=hbm, param_dtype=cfg.param_dtype,
               cache_dtype=case.cache_dtype, loss_chunk=LOSS_CHUNK if loss_chunk is None else loss_chunk)
    out = {"params": p.params_bytes, "optimizer": p.optimizer_bytes, "grads": p.grads_bytes, "update": p.update_bytes,
           "activations": p.activations_bytes, "kv_cache": p.kv_cache_bytes, "gathered": p.gathered_bytes}
    if case.mode == "training":  # the state comes in donated and goes out aliased to it
        state = p.params_bytes + p.optimizer_bytes
        out |= {"argument": state, "output": state, "alias": state,
                "temp": p.grads_bytes + p.update_bytes + p.activations_bytes + p.gathered_bytes}
    elif case.mode == "prefill":  # the cache is created inside and returned
        # XLA's layout copies around the loop over prefill passes (buffer assignment of the 8B prefill on v5e:2x2,
        # tensor=4, 2026-12-04; docs/sharding.md): the cache is carried in a layout other than the returned one,
        # so a second cache-sized buffer (as in the decode loop below), and the stacked wq, wk and wv are copied
        # once, before the loop, into the layout the loop body's matmuls read (bf16[32,4096,8,128]{3,2,1,0} ->
        # {1,3,2,0}). Measured 0.27 + 0.40 of the 0.72 GB temp; the pass's own activations are the rest.
        sizes = mesh_cfg.shape(n)
        layers = P.model.param_specs(cfg)["layers"]
        w = 1 if case.quantize == "int8" else P._BYTES[cfg.compute_dtype]
        relayout = P.sharded_bytes({k: layers[k] for k in ("wq", "wk", "wv")}, sizes, lambda path, s: w)
        out["relayout"] = relayout
        out |= {"argument": p.params_bytes, "output": p.kv_cache_bytes, "alias": 0.0,
                "temp": p.activations_bytes + p.gathered_bytes + p.kv_cache_bytes + relayout}
    else:  # decode: the cache comes in donated and goes out aliased; one token per row per step
        sizes = mesh_cfg.shape(n)
        dp = sizes["data"] * sizes["fsdp"]
        rows = case.batch / dp if case.batch % dp == 0 else case.batch
        out["activations"] = rows * P.inference_bytes_per_token(cfg, case.seq_len, sizes["tensor"],
                                                                P._BYTES[cfg.compute_dtype])
        # XLA's TPU decode loop holds one more cache-sized buffer besides the donated one (measured: 8B, 405B
        # int8; docs/sharding.md), so temp counts a copy of the cache. For one token per row the partitioner
        # keeps the layer weights sharded and all-reduces partial products instead of gathering them (the HLO
        # has one all-gather: the embedding table, which model.embed makes whole along D)
        if sizes["fsdp"] > 1:
            tied_int8 = case.quantize == "int8" and cfg.tie_embeddings
            out["gathered"] = (cfg.vocab_size * cfg.dim / sizes["tensor"]
                               * (1 if tied_int8 else P._BYTES[cfg.compute_dtype]))
        out |= {"argument": p.params_bytes + p.kv_cache_bytes, "output": p.kv_cache_bytes,
                "alias": p.kv_cache_bytes, "temp": p.kv_cache_bytes + out["activations"] + out["gathered"]}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def model_flops(cfg, case: Case) -> float:
    """Model FLOPs of one call: training 6P + 12LNHT per token (llama.metrics); a forward is a third of that
    (2P + 4LNHS, S the keys attended: T for a prefill, the cache's slots for a decode step)."""
    from llama.metrics import train_flops_per_token

    if case.mode == "training":
        return train_flops_per_token(cfg, case.seq_len) * case.batch * case.seq_len
    if case.mode == "prefill":
        return train_flops_per_token(cfg, case.seq_len) / 3 * case.batch * case.seq_len
    return train_flops_per_token(cfg, case.seq_len) / 3 * case.batch


class _Progress:
    """An elapsed-seconds line on stderr while XLA compiles (a big model takes minutes on a small CPU)."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.t0 = label, enabled, time.perf_counter()
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()

    def _run(self):
        every = 0.5 if self._tty else 30.0
        while not self._stop.wait(every):
            msg = f"{self.label}: {time.perf_counter() - self.t0:.0f} s"
            sys.stderr.write(f"\r{msg}" if self._tty else msg + "\n")
            sys.stderr.flush()

    def __enter__(self):
        if self.enabled:
            sys.stderr.write(f"{self.label} ...\n" if not self._tty else "")
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            sys.stderr.write(f"\r{self.label}: done in {time.perf_counter() - self.t0:.1f} s\n")
        return False


def compile_case(model_cfg, mesh_cfg, mesh, case: Case, *, topology: str = "", train_cfg=None,
                 progress: bool = False, hlo_path: str | None = None) -> dict[str, Any]:
    """Lowers and compiles one case on `mesh` (compile-only TPU devices, or any devices) and returns the
    figures (module docstring). training needs `train_cfg` (a llama.train.TrainConfig). hlo_path: where to
    write the compiled HLO text (for reading what the temporaries are)."""
    devices = list(mesh.devices.flat)
    chip, hbm, peak = chip_info(devices[0])
    label = f"compiling {model_cfg.name} {case.mode} for {topology or chip} ({len(devices)} chips)"
    t0 = time.perf_counter()
    from llama import attention

    with attention.target_backend(devices[0].platform):  # the kernels are chosen for the target, not this CPU
        if case.mode == "training":
            lowered = lower_training(train_cfg, mesh)
        elif case.mode in ("prefill", "decode"):
            lowered = lower_inference(model_cfg, mesh, case)
        else:
            raise CompileError(f"--mode {case.mode!r}: expected one of {MODES}")
    t1 = time.perf_counter()
    oom = None
    with _Progress(label, progress):
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001  (XLA's TPU compiler refuses a program that cannot fit its HBM)
            oom = out_of_memory(str(e))
            if oom is None:
                raise
    t2 = time.perf_counter()
    xla = memory(compiled) if oom is None else None
    hlo = compiled.as_text() if oom is None else None
    if hlo and hlo_path:
        from llama.manifest import atomic_write

        atomic_write(hlo_path, hlo)
    hbm = None if hbm != hbm else hbm  # unknown (CPU)
    plan = planner_components(model_cfg, mesh_cfg, len(devices), case, model_cfg.remat, hbm or 0.0,
                              loss_chunk=train_cfg.loss_chunk if train_cfg is not None else None)
    flops = model_flops(model_cfg, case)
    return {
        "model": model_cfg.name, "mode": case.mode, "topology": topology, "chip": chip,
        "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": dict(mesh.shape),
        "batch": case.batch, "seq_len": case.seq_len, "remat": model_cfg.remat if case.mode == "training" else None,
        "compute_dtype": model_cfg.compute_dtype, "param_dtype": model_cfg.param_dtype, "quantize": case.quantize,
        "cache_dtype": case.cache_dtype, "attention_impl": model_cfg.attention_impl,
        "micro_batches": case.micro_batches if case.mode == "training" else None,
        "loss_chunk": train_cfg.loss_chunk if train_cfg is not None else None,
        "lower_s": t1 - t0, "compile_s": t2 - t1, "xla": xla, "planner": plan, "hbm_bytes": hbm,
        "fits": False if oom else None if hbm is None else bool(xla["total"] <= hbm), "xla_out_of_memory": oom,
        "collectives": count_collectives(hlo) if oom is None else None,
        "model_flops": flops, "model_flops_per_chip": flops / len(devices), "peak_flops": peak,
        "seconds_at_peak": flops / len(devices) / peak if peak else None,
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b and a == a else "   - "


def format_result(r: dict) -> str:
    x, p = r["xla"], r["planner"]
    if x is None:  # XLA refused: show the planner beside XLA's own requirement
        oom = r["xla_out_of_memory"]
        x = {k: float("nan") for k in ("argument", "output", "alias", "temp", "heap", "total", "temp_total")}
        if "required_bytes" in oom:  # "HLO temporaries (X)": X is the peak, arguments included (`memory`)
            x["total"] = oom["required_bytes"]
    unit, scale = ("GB", 1e9) if max(p["total"], x["total"] if x["total"] == x["total"] else 0) >= 1e8 else ("MB", 1e6)
    gb = lambda v: f"{v / scale:9.2f} {unit}" if v == v else "        -   "  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    if r["mode"] == "training":
        what = (f"batch {r['batch']} x {r['seq_len']} tokens, remat {r['remat']}, {r['param_dtype']} params + "
                f"AdamW, {r['compute_dtype']} compute"
                + (f", {r['micro_batches']} micro-batches" if r["micro_batches"] > 1 else ""))
    elif r["mode"] == "prefill":
        what = f"{r['batch']} x {r['seq_len']}-token prompts into a {r['seq_len']}-slot cache"
    else:
        what = f"one token for each of {r['batch']} rows against a {r['seq_len']}-slot cache"
    if r["mode"] != "training":
        what += f", {r['quantize'] or r['compute_dtype']} weights, {r['cache_dtype'] or r['compute_dtype']} cache"
    parts = {"training": ("params + optimizer state", "the new state", "grads + update + activations + gathers"),
             "prefill": ("params", "KV cache", "activations + FSDP gathers + a cache copy + q/k/v relayout"),
             "decode": ("params + KV cache", "the new KV cache", "a cache copy + one step's activations + gathers")}
    pa, po, pt = parts[r["mode"]]
    mem = f", {r['hbm_bytes'] / 2**30:.0f} GiB HBM each" if r["hbm_bytes"] else ""
    lines = [f"{r['model']}  {r['mode']}  topology {r['topology']} ({r['chips']} x {r['device_kind']}{mem})  "
             f"mesh {mesh}",
             f"  {what}; attention {r['attention_impl']}",
             f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
             f"per chip            XLA           planner      ratio  (planner: what)",
             f"  arguments  {gb(x['argument'])}  {gb(p['argument'])}  {_ratio(x['argument'], p['argument'])}  ({pa})",
             f"  outputs    {gb(x['output'])}  {gb(p['output'])}  {_ratio(x['output'], p['output'])}  ({po})",
             f"  aliased    {gb(x['alias'])}  {gb(p['alias'])}  {_ratio(x['alias'], p['alias'])}  "
             f"(outputs written over donated arguments)",
             f"  temp       {gb(x['heap'])}  {gb(p['temp'])}  {_ratio(x['heap'], p['temp'])}  ({pt}; XLA: "
             f"the temporaries alive at its peak)",
             f"  total      {gb(x['total'])}  {gb(p['total'])}  {_ratio(x['total'], p['total'])}  "
             f"(arguments + outputs - aliased + temp: XLA's peak, what its TPU compiler holds to the HBM)",
             (f"  memory_analysis temp_size {gb(x['temp'])}, with arguments + outputs - aliased {gb(x['temp_total'])}"
              f" ({_ratio(x['temp_total'], p['total']).strip()} of the planner's total; above the peak in big training "
              f"steps, not what the compiler checks: docs/sharding.md)" if r["xla"] is not None else
              "  (XLA's requirement above is its peak, arguments included: docs/sharding.md)"),
             (f"  does NOT fit: XLA's TPU compiler refused it: {r['xla_out_of_memory']['message']}"
              + f" (planner {p['total'] / r['hbm_bytes']:.0%} of HBM)" if r["xla_out_of_memory"] else
              f"  HBM {r['hbm_bytes'] / 2**30:.0f} GiB: " + ("fits" if r["fits"] else "does NOT fit")
              + f" ({x['total'] / r['hbm_bytes']:.0%} by XLA; planner {p['total'] / r['hbm_bytes']:.0%})"
              if r["hbm_bytes"] else "  device memory unknown"),
             "collectives in the compiled HLO (static count; the scanned layer body's run once per layer): "
             + (", ".join(f"{k} {v}" for k, v in r["collectives"].items()) if r["collectives"] else "-"),
             f"model FLOPs per call {r['model_flops']:.4g} ({r['model_flops_per_chip']:.4g} per chip)"
             + (f"; at {r['peak_flops'] / 1e12:.0f} TFLOP/s peak: {r['seconds_at_peak'] * 1e3:.1f} ms (a lower bound)"
                if r["peak_flops"] else "")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def build(a):
    """(model config, TrainConfig fields or None, case, MeshConfig) from the parsed flags."""
    from llama import train
    from llama.config import preset
    from sharding.mesh import MeshConfig

    base = train.load_experiment(a.config) if a.config else None
    cfg = base.model if base else preset(a.preset)
    mesh_cfg = MeshConfig.parse(a.mesh) if a.mesh else (base.mesh if base else MeshConfig())
    changes = {}
    if a.attention_impl:
        changes["attention_impl"] = a.attention_impl
    elif cfg.attention_impl == "cudnn":  # a GPU kernel; the TPU compiler cannot lower it
        print("note: attention_impl 'cudnn' is a GPU kernel; compiling the xla path (--attention-impl to choose)",
              file=sys.stderr)
        changes["attention_impl"] = "xla"
    seq_len = a.seq_len or (base.seq_len if base else min(8192, cfg.max_seq_len))
    if seq_len > cfg.max_seq_len:
        changes["max_seq_len"] = seq_len
    if a.mode == "training":
        if a.quantize or a.cache_dtype:
            raise CompileError("--quantize and --cache-dtype apply to --mode prefill or decode")
        changes |= {"param_dtype": "float32", "compute_dtype": a.dtype or cfg.compute_dtype}
        if a.remat:
            changes["remat"] = a.remat
        cfg = cfg.replace(**changes)
        fields = dict(model=cfg, seq_len=seq_len, sample_tokens=0,
                      batch_size=a.batch or (base.batch_size if base else None),
                      micro_batches=a.micro_batches or (base.micro_batches if base else 1))
        return cfg, (base, fields), Case("training", fields["batch_size"] or 0, seq_len,
                                         micro_batches=fields["micro_batches"]), mesh_cfg
    if a.micro_batches or a.remat:
        raise CompileError("--micro-batches and --remat apply to --mode training")
    dtype = a.dtype or "bfloat16"
    cfg = cfg.replace(**changes, param_dtype=dtype, compute_dtype=dtype)
    return cfg, None, Case(a.mode, a.batch or 1, seq_len, a.quantize, a.cache_dtype), mesh_cfg


def train_config(base, fields: dict, mesh_cfg, n: int):
    """The TrainConfig to compile: the experiment's (or defaults) with the flags and the resolved mesh; the
    batch defaults to one row per data x fsdp device."""
    from llama.train import TrainConfig

    sizes = mesh_cfg.shape(n)
    fields = {**fields, "mesh": mesh_cfg, "batch_size": fields["batch_size"] or sizes["data"] * sizes["fsdp"]}
    return base.replace(**fields) if base else TrainConfig(**fields)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharding.compile", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a llama.config preset, e.g. llama3.1-8b")
    src.add_argument("--config", help="an experiment file (experiments/*.py): its model, mesh, batch, seq_len")
    ap.add_argument("--topology", required=True, help="TPU CHIP:SHAPE, e.g. v5e:2x2, v5p:2x2x1, v6e:16x16; or "
                    "'local': this machine's devices (e.g. one GPU)")
    ap.add_argument("--mesh", help="e.g. fsdp=8 or data=1,fsdp=-1,tensor=4 (default: the config's, else fsdp=-1)")
    ap.add_argument("--mode", choices=MODES, default="training")
    ap.add_argument("--seq-len", type=int, help="training T, or the inference context (prompt and cache); "
                    "default: the config's, else 8192")
    ap.add_argument("--batch", type=int, help="global sequences (training default: the config's, else data*fsdp; "
                    "inference: 1)")
    ap.add_argument("--micro-batches", type=int, help="training: gradient accumulation steps")
    ap.add_argument("--remat", choices=("none", "full", "save_matmuls"), help="training (default: the config's)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="compute dtype (inference: weights too); "
                    "default bfloat16 for inference, the config's for training")
    ap.add_argument("--quantize", choices=("int8",), help="inference: int8 weights (llama.quant)")
    ap.add_argument("--cache-dtype", choices=("bfloat16", "float32", "int8"), help="inference: KV cache dtype")
    ap.add_argument("--attention-impl", help="ModelConfig.attention_impl (default: the config's; cudnn -> xla)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--out", default=os.path.join("runs", "compile"),
                    help="results.json + manifest.json go to OUT/<model>-<mode>-<topology>-<UTC time>/")
    a = ap.parse_args(argv)
    if a.topology != "local":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never claim a local accelerator
    try:
        import jax  # noqa: F401

        from llama import manifest

        cfg, train_fields, case, mesh_cfg = build(a)
        devices = topology_devices(a.topology)
        mesh = make_topology_mesh(mesh_cfg, a.topology, devices)
        tcfg = None
        if case.mode == "training":
            tcfg = train_config(*train_fields, mesh_cfg, len(devices))
            case = dataclasses.replace(case, batch=tcfg.batch_size)
        os.makedirs(a.out, exist_ok=True)
        hlo_tmp = os.path.join(a.out, f".compiled_hlo.{os.getpid()}.txt")
        r = compile_case(cfg, mesh_cfg, mesh, case, topology=a.topology, train_cfg=tcfg, progress=True,
                         hlo_path=hlo_tmp)
    except ValueError as e:  # CompileError, ConfigError, ShardingError: they name the input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if a.json else format_result(r))
    name = f"{cfg.name}-{case.mode}-{a.topology.replace(':', '_')}"
    out = manifest.write_benchmark(name, r, config={"model": cfg, "train": tcfg, "args": vars(a)}, out_root=a.out)
    if os.path.exists(hlo_tmp):
        os.replace(hlo_tmp, os.path.join(out, "compiled_hlo.txt"))
    print(f"results + manifest (+ compiled_hlo.txt): {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
