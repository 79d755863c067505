"""Lower and compile the Llama 3.1 8B train step for an 8-device mesh from abstract shapes (nothing is
allocated), and print XLA's per-device memory analysis next to the planner's estimate.

    python -m experiments.bench_compile_8b [--mesh data=1,fsdp=8,tensor=1] [--seq-len 4096] [--remat full]

On a machine without 8 accelerators it simulates 8 CPU devices (the flag must precede the JAX import).
The compiled program is the one `llama.train.make_train_step` builds: float32 master parameters and AdamW
state, bfloat16 matmuls, the batch over data x fsdp.
"""

from __future__ import annotations

import argparse
import os
import time

if "--gpu" not in os.sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def compile_8b(mesh_text: str = "data=1,fsdp=8,tensor=1", seq_len: int = 4096, batch: int = 8,
               remat: str = "full") -> dict:
    from llama import train
    from llama.config import LLAMA31_8B
    from sharding import plan, rules
    from sharding.mesh import MeshConfig

    mesh_cfg = MeshConfig.parse(mesh_text)
    model_cfg = LLAMA31_8B.replace(param_dtype="float32", compute_dtype="bfloat16", remat=remat)
    cfg = train.TrainConfig(model=model_cfg, mesh=mesh_cfg, batch_size=batch, seq_len=seq_len, sample_tokens=0)
    mesh = rules.make_mesh(mesh_cfg, jax.devices()[:8])
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        _, step = train.make_train_step(cfg, mesh)
        state = train.abstract_state(cfg, mesh)
        sh = rules.batch_sharding(mesh, 2, (batch, seq_len))
        batch_shapes = {k: jax.ShapeDtypeStruct((batch, seq_len), np.float32 if k == "loss_mask" else np.int32,
                                                sharding=sh) for k in train.BATCH_KEYS}
        lowered = step.lower(state, batch_shapes)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    est = plan.plan(model_cfg, mesh_cfg, 8, mode="training", dtype="bfloat16", batch=batch, seq_len=seq_len,
                    remat=remat)
    return {"mesh": dict(mesh.shape), "seq_len": seq_len, "batch": batch, "remat": remat,
            "lower_s": t1 - t0, "compile_s": t2 - t1,
            "xla_argument_bytes": ma.argument_size_in_bytes, "xla_output_bytes": ma.output_size_in_bytes,
            "xla_alias_bytes": ma.alias_size_in_bytes, "xla_temp_bytes": ma.temp_size_in_bytes,
            "plan_state_bytes": est.params_bytes + est.optimizer_bytes, "plan_grads_bytes": est.grads_bytes,
            "plan_activations_bytes": est.activations_bytes, "plan_gathered_bytes": est.gathered_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--remat", default="full", choices=("none", "full", "save_matmuls"))
    ap.add_argument("--gpu", action="store_true", help="use the real accelerators instead of 8 CPU devices")
    args = ap.parse_args()
    r = compile_8b(args.mesh, args.seq_len, args.batch, args.remat)
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    print(f"Llama 3.1 8B train step, mesh {r['mesh']}, batch {r['batch']} x {r['seq_len']}, remat {r['remat']}, "
          f"on {jax.devices()[0].platform}")
    print(f"  lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s")
    print(f"  XLA per device: arguments {gb(r['xla_argument_bytes'])} (state + batch), outputs "
          f"{gb(r['xla_output_bytes'])}, aliased {gb(r['xla_alias_bytes'])} (donated), temp {gb(r['xla_temp_bytes'])}")
    print(f"  planner per device: params + AdamW {gb(r['plan_state_bytes'])}, grads {gb(r['plan_grads_bytes'])}, "
          f"activations {gb(r['plan_activations_bytes'])}, FSDP gathers {gb(r['plan_gathered_bytes'])} "
          f"(XLA's temp holds the last three)")
    from llama import manifest

    print("results + manifest:", manifest.write_benchmark("compile-8b", r, config=vars(args)))


if __name__ == "__main__":
    main()
