"""Ablation example: remat policy x peak learning rate on a tiny Llama 3.1-architecture model (CPU, minutes).

    python -m llama.sweep --base experiments/ablation_remat_lr.py --out runs/ablation_remat_lr
    python -m llama.sweep --base experiments/ablation_remat_lr.py --out runs/ablation_remat_lr --mode print

The sweep takes GRID below unless --grid is given. Remat changes memory and speed but not the maths, so the
two remat variants of one learning rate should have the same loss curve (to float rounding) and differ in
step time; the learning rates differ in loss.
"""

from llama.config import ModelConfig, RopeScaling
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

MODEL = ModelConfig(
    name="ablation-tiny", vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
    rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
    max_seq_len=512, bos_id=1, eos_ids=(2,),  # SentencePiece ids (Llama 2 layout: unk 0, bos 1, eos 2)
)

CONFIG = TrainConfig(
    model=MODEL,
    optimizer=OptimizerConfig(peak_lr=2e-3, end_lr=2e-4, warmup_steps=10, decay_steps=90, weight_decay=0.1),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),  # all devices; batch_size 8 divides over 1, 2, 4 or 8
    data=DataConfig(paths=None, tokenizer=None),  # the CPython docs topics, a 512-piece BPE trained on them
    steps=100, batch_size=8, seq_len=128, log_every=5, checkpoint_every=100, keep_checkpoints=1,
    sample_tokens=0,
)

GRID = {"model.remat": ("none", "full"), "optimizer.peak_lr": (1e-3, 3e-3)}
