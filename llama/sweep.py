"""Ablation sweeps: a base experiment, a small grid of overrides, one training run per variant, one table.

    python -m llama.sweep --base experiments/ablation_remat_lr.py \
        --grid 'model.remat=none,full' --grid 'optimizer.peak_lr=1e-3,3e-3' [--set steps=50 ...] --out runs/sweep

Each variant is the cross product of the grids (here 4), applied on top of `--set` (common overrides) with
the trainer's own override mechanism (`llama.train.apply_overrides`: every variant's config is built and
checked before anything runs). Without --grid, the base file's `GRID = {"field": (values, ...)}` is used.

--mode run      (default) trains the variants one after the other here, each as `python -m llama.train
                --config BASE --set ... --out OUT/variants/NAME` in a subprocess (log in NAME/train.log; a
                rerun resumes unfinished variants from their checkpoints and skips finished ones), then collects.
--mode print    prints one command per variant (and writes OUT/commands.sh): one cluster job per line.
--mode collect  only builds the table from OUT/variants/*, e.g. after the cluster jobs finished.

Outputs in OUT: results.csv, results.md (one row per variant: the overrides, status, final and best loss,
throughput, wall time, a link to the variant's manifest) and loss.png (all loss curves). Each variant
directory holds sweep_manifest.json (llama.manifest: the resolved config, the overrides, the command, the
environment and a data fingerprint) beside whatever the trainer writes (metrics.jsonl, checkpoints/...,
and its own manifest.json, which the table links to when present).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from llama import cli, manifest


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
    """A bad grid, base experiment or sweep directory."""


@dataclass(frozen=True)
class Variant:
    name: str  # directory name: the varied fields' last components and values, e.g. "remat=full__peak_lr=3e-3"
    overrides: tuple[str, ...]  # the grid's FIELD=VALUE items (after the common ones)


def split_values(text: str) -> list[str]:
    """'a,b,{"x": 1, "y": 2}' -> ['a', 'b', '{"x": 1, "y": 2}']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    if depth or quote or any(v == "" for v in out):
        raise SweepError(f"--grid values {text!r}: unbalanced brackets/quotes or an empty value")
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--grid {item!r}: expected FIELD=VALUE1,VALUE2 (e.g. model.remat=none,full)")
        if key.strip() in grid:
            raise SweepError(f"--grid {key.strip()}: given twice")
        grid[key.strip()] = split_values(values)
    return grid


def set_text(value: Any) -> str:
    """A Python value from a base file's GRID as the text `--set` parses (llama.train._parse_value)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if dataclasses.is_dataclass(value):
        return repr(dataclasses.asdict(value))
    return value if isinstance(value, str) else repr(value)


def variants(grid: dict[str, list[str]]) -> list[Variant]:
    """The cross product, in grid order. Names use each field's last component (unique ones only)."""
    keys = list(grid)
    short = [k.split(".")[-1] for k in keys]
    if len(set(short)) < len(short):
        short = keys
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "__".join(f"{s}={_safe(v)}" for s, v in zip(short, combo)) or "base"
        out.append(Variant(name, tuple(f"{k}={v}" for k, v in zip(keys, combo))))
    if len({v.name for v in out}) < len(out):
        raise SweepError("two variants map to one directory name; make the grid values more distinct")
    return out


def _safe(value: str) -> str:
    """A directory-name-safe rendering of a value (dict/dataclass values are shortened to a hash)."""
    if re.fullmatch(r"[\w.+\-]+", value):
        return value
    import hashlib

    kind = {"{": "dict", "(": "tuple", "[": "list"}.get(value[:1], re.sub(r"[^\w.+\-]+", "_", value)[:16])
    return f"{kind}-{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def resolve(base: str, common: Sequence[str], variant: Variant):
    """The variant's TrainConfig, built by the trainer's own loader and override parser."""
    from llama import train

    return train.apply_overrides(train.load_experiment(base), [*common, *variant.overrides])


def command(base: str, common: Sequence[str], variant: Variant, out_dir: str, python: str = sys.executable) -> list[str]:
    overrides = [*common, *variant.overrides]
    return [python, "-m", "llama.train", "--config", base, *(["--set", *overrides] if overrides else []),
            "--out", out_dir]


# -------------------------------------------------------------------------------------------- results
def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row  # a resumed run logs a step again: the last row wins
    return [by_step[s] for s in sorted(by_step)]


def summarize(out: str, vs: list[Variant]) -> list[dict]:
    rows = []
    for v in vs:
        vdir = os.path.join(out, "variants", v.name)
        status_path = os.path.join(vdir, "sweep_manifest.json")
        sm = manifest.read_manifest(status_path) if os.path.exists(status_path) else {}
        metrics = read_metrics(vdir)
        losses = [r["loss"] for r in metrics if r.get("loss") is not None]
        # Throughput: the median logged step, without the first (compilation) step.
        tps = sorted(r["tokens_per_s"] for r in metrics if r.get("tokens_per_s") and not r.get("first_step"))
        link = "manifest.json" if os.path.exists(os.path.join(vdir, "manifest.json")) else "sweep_manifest.json"
        row = {"variant": v.name}
        row.update({k: val for k, val in (o.split("=", 1) for o in v.overrides)})
        row.update(
            status=sm.get("extra", {}).get("status", "not run"),
            steps=metrics[-1]["step"] if metrics else 0,
            final_loss=losses[-1] if losses else None,
            best_loss=min(losses) if losses else None,
            tokens_per_s=tps[len(tps) // 2] if tps else None,
            wall_s=sm.get("extra", {}).get("wall_s"),
            manifest=os.path.relpath(os.path.join(vdir, link), out),
        )
        rows.append(row)
    return rows


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def write_tables(out: str, rows: list[dict], title: str) -> None:
    cols = list(rows[0]) if rows else ["variant"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    manifest.atomic_write(os.path.join(out, "results.csv"), buf.getvalue())
    md = [f"# {title}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"[{r[c]}]({r[c]})" if c == "manifest" else _fmt(r[c]) for c in cols]
        md.append("| " + " | ".join(cells) + " |")
    md.append("\n![loss curves](loss.png)\n")
    manifest.atomic_write(os.path.join(out, "results.md"), "\n".join(md))


def plot_losses(out: str, vs: list[Variant]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for v in vs:
        m = [r for r in read_metrics(os.path.join(out, "variants", v.name)) if r.get("loss") is not None]
        if m:
            ax.plot([r["step"] for r in m], [r["loss"] for r in m], label=v.name, lw=1.2)
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="sweep: loss per variant")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return manifest.save_figure(fig, os.path.join(out, "loss.png"))


# ------------------------------------------------------------------------------------------------ run
def _data_files(cfg, vdir: str) -> list[str]:
    import glob

    files = sorted(glob.glob(cfg.data.paths)) if cfg.data.paths else [os.path.join(vdir, "corpus")]
    tok = cfg.data.tokenizer or os.path.join(vdir, "tokenizer.model")
    return files + [tok]


def run_variant(base: str, common: Sequence[str], v: Variant, out: str, cfg) -> dict:
    """Trains one variant in a subprocess; writes its sweep_manifest.json (status, rc, wall time)."""
    vdir = os.path.join(out, "variants", v.name)
    os.makedirs(vdir, exist_ok=True)
    cmd = command(os.path.abspath(base), common, v, vdir)
    t0 = time.time()
    with open(os.path.join(vdir, "train.log"), "a") as log:
        # From the repository root, so `-m llama.train` imports this checkout whatever the caller's cwd.
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    wall = time.time() - t0
    extra = {"sweep": os.path.abspath(out), "variant": v.name, "overrides": list(v.overrides),
             "common_overrides": list(common), "base": os.path.abspath(base), "command": shlex.join(cmd),
             "returncode": rc, "status": "ok" if rc == 0 else f"failed (rc {rc}, see train.log)", "wall_s": wall}
    manifest.write_manifest(vdir, filename="sweep_manifest.json", config=cfg, seeds={"train": cfg.seed},
                            data_files=_data_files(cfg, vdir), extra=extra)
    return extra


def _is_done(vdir: str, steps: int) -> bool:
    path = os.path.join(vdir, "sweep_manifest.json")
    if not os.path.exists(path):
        return False
    m = read_metrics(vdir)
    return manifest.read_manifest(path)["extra"].get("returncode") == 0 and bool(m) and m[-1]["step"] >= steps


def load_base_grid(base: str) -> dict[str, list[str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_base", base)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = getattr(module, "GRID", None)
    if not grid:
        raise SweepError(f"{base}: no --grid given and the file defines no GRID = {{'field': (values, ...)}}")
    return {k: [set_text(x) for x in vals] for k, vals in grid.items()}


def is_sweep_dir(d: str) -> bool:
    """A directory this command wrote (its variants/, tables or commands), which a rerun adds to."""
    return bool({"variants", "results.csv", "results.md", "commands.sh"} & set(os.listdir(d)))


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m llama.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="experiment file defining CONFIG (and optionally GRID)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="one varied field; repeat for a cross product (default: the base file's GRID)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="overrides common to every variant (before the grid's)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--mode", choices=("run", "print", "collect"), default="run")
    p.add_argument("--keep-going", action="store_true", help="continue after a variant fails (exit 1 at the end)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.base):
        raise SweepError(f"--base {args.base}: file not found")
    grid = parse_grid(args.grid) if args.grid else load_base_grid(args.base)
    vs = variants(grid)
    cfgs = {v.name: resolve(args.base, args.set, v) for v in vs}  # every variant builds, or nothing runs
    # The sweep writes its tables and variants/ into OUT: a new or empty directory, or an earlier sweep's.
    manifest.check_replaceable(args.out, "--out", is_sweep_dir, "a sweep directory (variants/, results.*)")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"sweep of {len(vs)} variants over {list(grid)} -> {out}")

    if args.mode == "print":
        lines = [shlex.join(command(args.base, args.set, v, os.path.join(out, "variants", v.name), "python"))
                 for v in vs]
        manifest.atomic_write(os.path.join(out, "commands.sh"), "#!/bin/sh\n# one job per line\n"
                              + "\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"then: python -m llama.sweep --base {args.base} {' '.join('--grid ' + shlex.quote(g) for g in args.grid)}"
              f" --out {args.out} --mode collect")
        return 0

    failed = []
    if args.mode == "run":
        for i, v in enumerate(vs):
            vdir = os.path.join(out, "variants", v.name)
            if _is_done(vdir, cfgs[v.name].steps):
                print(f"[{i + 1}/{len(vs)}] {v.name}: already finished, skipped")
                continue
            print(f"[{i + 1}/{len(vs)}] {v.name}: training ...", flush=True)
            res = run_variant(args.base, args.set, v, out, cfgs[v.name])
            print(f"[{i + 1}/{len(vs)}] {v.name}: {res['status']} in {res['wall_s']:.0f}s", flush=True)
            if res["returncode"]:
                failed.append(v.name)
                if not args.keep_going:
                    break
    rows = summarize(out, vs)
    write_tables(out, rows, f"Sweep of {os.path.basename(args.base)} over {', '.join(grid)}")
    plot_losses(out, vs)
    with open(os.path.join(out, "results.md")) as f:
        print(f.read())
    print(f"wrote {out}/results.csv, results.md, loss.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
