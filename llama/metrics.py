"""Training metrics: the FLOPs count behind MFU, the peak FLOP/s table, and the writers (TensorBoard event
files, JSONL, and a PNG loss plot at the end).

FLOPs per trained token (PaLM, arXiv 2204.02311, appendix B; the convention MaxText and Levanter report):

    6 * P_matmul + 12 * L * N * H * T

- 6 * P_matmul: each weight matrix costs 2 FLOPs per parameter per token forward and 4 backward.
  P_matmul = L * (D*N*H + 2*D*K*H + N*H*D + 3*D*F) + D*V: every projection plus the output head (the tied
  embedding counts once, as the head); the embedding lookup is a gather and costs nothing.
- 12 * L * N * H * T: attention scores QK^T and the weighted sum PV, 2 * 2 * T * N * H FLOPs per token per
  layer forward, times 3 for forward + backward. Counted for the full T x T square, as PaLM does, although a
  causal (and document) mask makes half of it (or more) dead work.
Rematerialised recomputation is not counted: MFU measures useful model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax

from llama import manifest
from llama.config import ModelConfig

# Dense bfloat16 peak per chip, from the vendors' datasheets. Matched by substring of jax's device_kind,
# first match wins (so "H100 PCIe" is listed before "H100").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # H100 SXM5 datasheet
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # Trillium / v6e
    ("TPU v6e", 918e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    L, D, N, K, H, F, V = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    return L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token of a length-`seq_len` row (formula in the module docstring)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def lora_train_flops_per_token(cfg: ModelConfig, seq_len: int, lora) -> float:
    """Model FLOPs to train LoRA adapters (`llama.lora.LoraConfig`) on one token: 4*P + 6*P_a + 12*L*N*H*T.

    A matmul with W of P weights costs 2P per token forward, 2P backward for its input gradient and 2P backward
    for its weight gradient (PaLM appendix B's 6P). The base is frozen, so its weight gradients are never formed
    (jax.grad is taken with respect to the adapters only, llama/lora.py): 2P + 2P for every base weight, the output
    layer included (the hidden-state gradient still flows through it). Each adapter (x A B, P_a = its A and B
    elements) is trained, so 6 P_a. Attention's QK^T and AV have no weights: their backward is unchanged (the 12
    L N H T term). Hu et al. 2021 (LoRA, section 4.2, "Practical Benefits"): "we do not need to calculate the
    gradient for the vast majority of the parameters", a 25% measured speedup on GPT-3 175B (4P/6P = 0.67 of the
    FLOPs). Not subtracted: the input gradient of the first layer's projections (the embedding is frozen, so XLA
    may drop it: at most 2 x (N + 2K) H D of 4P per token, 1/L of the attention projections)."""
    from llama import lora as llama_lora
    from llama import model

    adapters = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(
        llama_lora.adapter_specs(cfg, lora), is_leaf=model.is_spec))
    return (4.0 * matmul_params(cfg) + 6.0 * adapters
            + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len)


def peak_flops(device: jax.Device | None = None, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else the table by device kind, else None (CPUs)."""
    if override:
        return float(override)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in kind.lower():
            return flops
    return None


def memory_in_use(device: jax.Device | None = None) -> int | None:
    """Bytes in use on one device, where the backend reports it (GPU/TPU; the CPU backend does not)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator stats raise rather than return None
        return None
    return None if not stats else stats.get("bytes_in_use")


class MetricsWriter:
    """Appends one JSON object per logged step to OUT/metrics.jsonl and mirrors scalars into TensorBoard
    event files under OUT/tensorboard. Appending keeps the history of a resumed run in one file."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self._jsonl = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(out_dir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a")
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: (None if v is None else float(v)) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            if v is not None:
                self._tb.add_scalar(f"train/{k}", float(v), int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(jsonl_path: str, png_path: str, title: str = "training loss") -> str:
    """Loss against step from metrics.jsonl (the last row wins for a step logged twice across a resume), with
    the held-out `eval_loss` rows (llama/eval.py) as a second curve, written to a temp file and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    by_step = {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}
    held_out = {r["step"]: r["eval_loss"] for r in rows if r.get("eval_loss") is not None}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [by_step[s] for s in steps], lw=1.2, label="train")
    if held_out:
        ax.plot(sorted(held_out), [held_out[s] for s in sorted(held_out)], "o-", lw=1.2, ms=3, label="eval (held-out)")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return manifest.save_figure(fig, png_path)


__all__ = ["PEAK_BF16_FLOPS", "matmul_params", "train_flops_per_token", "peak_flops", "memory_in_use",
           "MetricsWriter", "read_jsonl", "plot_loss"]
