"""The optimizer: AdamW with linear warmup then cosine decay, global-norm clipping, and the Llama recipes.

    tx = make_optimizer(OptimizerConfig(...))    # an optax GradientTransformation
    lr = learning_rate(opt_cfg, step)             # the schedule, for logging

Weight decay skips the norm gains and the token embedding unless configured (`decay_norms`,
`decay_embeddings`): decaying a gain pulls it towards 0, not towards its init of 1, and decaying the
embedding shrinks rare tokens' rows that get few gradient updates (the usual GPT-2/nanoGPT/Levanter choice;
the Llama papers do not say).

Recipe sources:
- Llama 3 405B: "The Llama 3 Herd of Models" (arXiv 2407.21783) section 3.4.1: AdamW, "a cosine learning
  rate schedule, with a peak learning rate of 8e-5, a linear warm up of 8,000 steps, and a decay to 8e-7
  over 1,200,000 training steps".
- Llama 3 8B and 70B: Meta has not published them. The presets take the Llama 2 recipe for the nearest
  sizes (arXiv 2307.09288 section 2.2 and Table 1: AdamW beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1,
  clip 1.0, 2,000 warmup steps, cosine to 10% of peak; peak 3e-4 for 7B, 1.5e-4 for 70B) with the 405B
  horizon of 1.2M steps. eps stays 1e-8 (the optax/PyTorch default the issue asks for).
- Gradient clipping 1.0: Llama 2 section 2.2 (the Llama 3 paper does not state it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 3e-4
    end_lr: float = 3e-5  # the cosine ends here, at step warmup_steps + decay_steps, and stays
    warmup_steps: int = 100  # linear from 0 to peak_lr
    decay_steps: int = 1000  # cosine length after warmup
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW), multiplied by the learning rate as in PyTorch/optax
    decay_norms: bool = False
    decay_embeddings: bool = False
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    # The step the schedule counts from: 0 for a run's schedule; a stage's own schedule (train.Stage.optimizer)
    # starts at the stage's first step (set by train.stage_at).
    start_step: int = 0

    def __post_init__(self):
        for name in ("peak_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OptimizerConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("end_lr", "weight_decay", "grad_clip", "warmup_steps", "decay_steps", "start_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"OptimizerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"OptimizerConfig betas must lie in [0, 1), got b1={self.b1}, b2={self.b2}")

    def replace(self, **changes) -> "OptimizerConfig":
        return dataclasses.replace(self, **changes)


# Llama 3 405B, paper section 3.4.1 (see the module docstring).
LLAMA3_405B = OptimizerConfig(peak_lr=8e-5, end_lr=8e-7, warmup_steps=8000, decay_steps=1_200_000 - 8000)
# Llama 2 7B / 70B values (Llama 2 paper Table 1), Llama 3 horizon; Meta has not published Llama 3's.
LLAMA3_8B = OptimizerConfig(peak_lr=3e-4, end_lr=3e-5, warmup_steps=2000, decay_steps=1_200_000 - 2000)
LLAMA3_70B = OptimizerConfig(peak_lr=1.5e-4, end_lr=1.5e-5, warmup_steps=2000, decay_steps=1_200_000 - 2000)


SCHEDULE_FIELDS = ("peak_lr", "end_lr", "warmup_steps", "decay_steps")  # a stage may change these (train.Stage)


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine peak -> end_lr over decay_steps, then end_lr; all
    counted from start_step (the optimizer's update count is the global step)."""
    s = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + cfg.decay_steps, end_value=cfg.end_lr)
    return s if cfg.start_step == 0 else (lambda count: s(count - cfg.start_step))


def learning_rate(cfg: OptimizerConfig, step) -> jax.Array:
    return schedule(cfg)(step)


def decay_mask(cfg: OptimizerConfig, params):
    """True where weight decay applies: matrices, minus the embedding and 1-D norm gains unless configured."""

    def one(path, _):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return cfg.decay_norms
        if name == "['embed']":
            return cfg.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule). Its state mirrors the params (mu, nu) plus scalar counts, so
    the trainer shards it like the params (`optax.tree_map_params`)."""
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda p: decay_mask(cfg, p))
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


PRESETS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "llama3-405b": LLAMA3_405B}

__all__ = ["OptimizerConfig", "LLAMA3_8B", "LLAMA3_70B", "LLAMA3_405B", "PRESETS", "schedule", "learning_rate",
           "decay_mask", "make_optimizer", "global_norm"]
