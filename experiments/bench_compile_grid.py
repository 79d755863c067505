"""Planner vs XLA's TPU compiler over a grid of models, modes and meshes (docs/sharding.md, "Compiled for TPU").

    python -m experiments.bench_compile_grid [--only 405b] [--timeout 900] [--out runs/compile_grid]
    python -m experiments.bench_compile_grid --table          # the table from the results already in --out

Each case is one `python -m sharding.compile ... --json` in its own process (a big model's compile holds a few GB
of host memory; a case that runs out of time is recorded as such). Results: OUT/<case>.json, and OUT/table.md
with per-chip XLA memory (arguments, outputs - aliased, temp, total), the planner's total and the ratio of each
component (XLA's side: its peak of live buffers, `peak_memory_in_bytes`, and the temporaries alive at it, the
figure its TPU compiler holds to the HBM), `memory_analysis()`'s `temp_size_in_bytes` and its total beside them
(larger in training steps; docs/sharding.md, "Which XLA figure"), HBM fit by the peak, compile time and collectives.
Needs libtpu (requirements-tpu.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (case id, flags). Training at 8K with remat full; inference at an 8K context, batch 1, bf16 or int8 weights.
CASES: list[tuple[str, list[str]]] = [
    ("1b-train-v5p8", ["--preset", "llama3.2-1b", "--mode", "training", "--topology", "v5p:2x2x2", "--mesh", "fsdp=8",
                       "--remat", "full"]),
    ("1b-decode-v5e4", ["--preset", "llama3.2-1b", "--mode", "decode", "--topology", "v5e:2x2", "--mesh", "tensor=4"]),
    ("8b-train-v5p8", ["--preset", "llama3.1-8b", "--mode", "training", "--topology", "v5p:2x2x2", "--mesh", "fsdp=8",
                       "--remat", "full"]),
    ("8b-prefill-v5e4", ["--preset", "llama3.1-8b", "--mode", "prefill", "--topology", "v5e:2x2", "--mesh",
                         "tensor=4"]),
    ("8b-decode-v5e4", ["--preset", "llama3.1-8b", "--mode", "decode", "--topology", "v5e:2x2", "--mesh", "tensor=4"]),
    ("8b-decode-int8-v5e4", ["--preset", "llama3.1-8b", "--mode", "decode", "--topology", "v5e:2x2", "--mesh",
                             "tensor=4", "--quantize", "int8"]),
    ("70b-train-v5p64", ["--preset", "llama3.1-70b", "--mode", "training", "--topology", "v5p:4x4x4", "--mesh",
                         "fsdp=8,tensor=8", "--remat", "full"]),
    ("70b-decode-v6e16", ["--preset", "llama3.1-70b", "--mode", "decode", "--topology", "v6e:4x4", "--mesh",
                          "fsdp=2,tensor=8"]),
    ("70b-decode-int8-v6e8", ["--preset", "llama3.1-70b", "--mode", "decode", "--topology", "v6e:2x4", "--mesh",
                              "tensor=8", "--quantize", "int8"]),
    ("405b-decode-v6e32", ["--preset", "llama3.1-405b", "--mode", "decode", "--topology", "v6e:4x8", "--mesh",
                           "fsdp=4,tensor=8"]),
    ("405b-decode-int8-v6e16", ["--preset", "llama3.1-405b", "--mode", "decode", "--topology", "v6e:4x4", "--mesh",
                                "fsdp=2,tensor=8", "--quantize", "int8"]),
    ("405b-decode-v5e64", ["--preset", "llama3.1-405b", "--mode", "decode", "--topology", "v5e:8x8", "--mesh",
                           "fsdp=8,tensor=8"]),
    ("405b-decode-int8-v5e32", ["--preset", "llama3.1-405b", "--mode", "decode", "--topology", "v5e:4x8", "--mesh",
                                "fsdp=4,tensor=8", "--quantize", "int8"]),
    ("405b-train-v5p256", ["--preset", "llama3.1-405b", "--mode", "training", "--topology", "v5p:4x8x8", "--mesh",
                           "fsdp=32,tensor=8", "--remat", "full"]),
    ("405b-train-v5p128", ["--preset", "llama3.1-405b", "--mode", "training", "--topology", "v5p:4x4x8", "--mesh",
                           "fsdp=16,tensor=8", "--remat", "full"]),
    ("405b-train-v5p4096", ["--preset", "llama3.1-405b", "--mode", "training", "--topology", "v5p:16x16x16", "--mesh",
                            "fsdp=512,tensor=8", "--remat", "full", "--batch", "2048", "--micro-batches", "4"]),
    ("405b-train-v5p4096-nomicro", ["--preset", "llama3.1-405b", "--mode", "training", "--topology", "v5p:16x16x16",
                                    "--mesh", "fsdp=512,tensor=8", "--remat", "full", "--batch", "2048"]),
]


def run_case(name: str, flags: list[str], out: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sharding.compile", *flags, "--seq-len", "8192", "--json", "--out",
           os.path.join(out, "runs")]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": name, "command": " ".join(cmd[1:]), "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"case": name, "command": " ".join(cmd[1:]), "error": (p.stderr.strip().splitlines() or ["?"])[-1],
                "stderr_tail": p.stderr[-2000:]}
    r = json.loads(p.stdout)
    r.update(case=name, command=" ".join(cmd[1:]), wall_s=time.time() - t0)
    return r


def replan(r: dict) -> dict:
    """The planner's side recomputed with today's sharding.plan (the XLA side does not change); the one recorded
    when the case ran is kept as planner_at_run."""
    from llama.config import preset
    from sharding import compile as C
    from sharding.mesh import MeshConfig

    cfg = preset(r["model"])
    cfg = cfg.replace(param_dtype=r["param_dtype"], compute_dtype=r["compute_dtype"],
                      attention_impl=r["attention_impl"], remat=r["remat"] or cfg.remat,
                      max_seq_len=max(cfg.max_seq_len, r["seq_len"]))
    case = C.Case(r["mode"], r["batch"], r["seq_len"], r["quantize"], r["cache_dtype"],
                  micro_batches=r.get("micro_batches") or 1)
    r.setdefault("planner_at_run", r["planner"])
    r["hbm_bytes"] = next((b for _, n, b in C.TPU_CHIPS if n == r["chip"]), r["hbm_bytes"])  # today's table
    if r["xla"] is not None:  # today's definitions of XLA's totals (sharding.compile.memory)
        r["xla"] = C.with_totals(r["xla"])
        r["fits"] = r["xla"]["total"] <= r["hbm_bytes"]
    r["planner"] = C.planner_components(cfg, MeshConfig(**r["mesh"]), r["chips"], case, cfg.remat, r["hbm_bytes"],
                                        loss_chunk=r.get("loss_chunk"))
    return r


def table(results: list[dict]) -> str:
    gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
    rows = ["| case | mesh (chips) | XLA args | XLA out - alias | XLA peak temp | XLA peak total | planner total | "
            "ratio args / temp / total (XLA peak / planner) | memory_analysis temp; its total (ratio to planner total) "
            "| HBM GiB | fits (peak) | compile s | all-gather / reduce-scatter / all-reduce / all-to-all / permute |",
            "|" + "---|" * 13]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | | | | | | | | | | {r['error']} | | |")
            continue
        if r["xla"] is None:  # XLA's TPU compiler refused: it does not fit
            oom, mesh = r["xla_out_of_memory"], ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
            # "HLO temporaries (X)": X is XLA's peak, arguments included (sharding.compile.memory)
            need = (f"refused: peak {oom['required_bytes'] / 1e9:.1f} GB" if "required_bytes" in oom
                    else oom["message"])
            rows.append(f"| {r['case']} | {mesh} ({r['chips']}) | | | | XLA {need} | {gb(r['planner']['total'])} | "
                        f"- / - / {oom.get('required_bytes', float('nan')) / r['planner']['total']:.2f} | | "
                        f"{r['hbm_bytes'] / 2**30:.0f} | NO | {r['compile_s']:.0f} | |")
            continue
        x, p, c = r["xla"], r["planner"], r["collectives"]
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        rows.append(f"| {r['case']} | {mesh} ({r['chips']}) | {gb(x['argument'])} | {gb(x['output'] - x['alias'])} | "
                    f"{gb(x['heap'])} | {gb(x['total'])} | {gb(p['total'])} | {ratio(x['argument'], p['argument'])} / "
                    f"{ratio(x['heap'], p['temp'])} / {ratio(x['total'], p['total'])} | {gb(x['temp'])}; "
                    f"{gb(x['temp_total'])} ({ratio(x['temp_total'], p['total'])}) | {r['hbm_bytes'] / 2**30:.0f} | "
                    f"{'yes' if r['fits'] else 'NO'} | "
                    f"{r['compile_s']:.0f} | {' / '.join(str(c[k]) for k in c)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose id contains one of these (comma-separated), "
                    "in that order")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--out", default=os.path.join("runs", "compile_grid"))
    ap.add_argument("--table", action="store_true", help="only rebuild OUT/table.md from OUT/*.json")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    wanted = [s for s in a.only.split(",") if s]
    # in the order --only names them (each a substring of case ids), else the table's
    todo = [] if a.table else [c for w in wanted for c in CASES if w in c[0]] if wanted else CASES
    for name, flags in dict(todo).items():
        print(f"{time.strftime('%H:%M:%S')} {name} ...", file=sys.stderr, flush=True)
        r = run_case(name, flags, a.out, a.timeout)
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(r, f, indent=1)
        print(f"  {r.get('error') or 'compiled in %.0f s' % r['compile_s']}", file=sys.stderr, flush=True)
    done = [json.load(open(os.path.join(a.out, f"{n}.json"))) for n, _ in CASES
            if os.path.exists(os.path.join(a.out, f"{n}.json"))]
    done = [r if "error" in r else replan(r) for r in done]
    text = table(done)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
