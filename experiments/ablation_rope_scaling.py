"""Ablation example: Llama 3.1 RoPE frequency scaling on vs off, at a context longer than the scaling's
original_max_position_embeddings (shrunk to 128 here so that a CPU-sized run reaches the scaled band).

    python -m llama.sweep --base experiments/ablation_rope_scaling.py --out runs/ablation_rope_scaling

Frequency scaling only changes the low-frequency RoPE components (wavelengths beyond
original_max_position_embeddings / low_freq_factor; facts sheet 3.2), so from-scratch training at these
lengths is expected to differ little; the sweep shows by how much.
"""

from llama.config import ModelConfig, RopeScaling
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

SCALING = RopeScaling(factor=8.0, original_max_position_embeddings=128)

CONFIG = TrainConfig(
    model=ModelConfig(
        name="ablation-rope", vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
        rope_theta=500000.0, rope_scaling=SCALING, max_seq_len=512, bos_id=1, eos_ids=(2,),
    ),
    optimizer=OptimizerConfig(peak_lr=2e-3, end_lr=2e-4, warmup_steps=10, decay_steps=90, weight_decay=0.1),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),  # all devices; batch_size 8 divides over 1, 2, 4 or 8
    data=DataConfig(paths=None, tokenizer=None),
    steps=100, batch_size=8, seq_len=256, log_every=5, checkpoint_every=100, keep_checkpoints=1,
    sample_tokens=0,
)

GRID = {"model.rope_scaling": (None, SCALING)}
