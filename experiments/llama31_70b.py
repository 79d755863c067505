"""Llama 3.1 70B pre-training on a GPU pod: 256 GPUs (32 nodes x 8), tensor parallel 8 within a node, fsdp 32
across nodes.

    python -m llama.train --config experiments/llama31_70b.py --data '/data/corpus/*.array_record' --out RUN_DIR

Batch: 512 rows x 8192 tokens = 4.2M tokens per step, 16 micro-batches of one row per fsdp shard. bf16
compute, f32 master weights and AdamW state (70B x 16 B / 256 = 4.4 GB per GPU), full remat.
Optimizer: llama.optim.LLAMA3_70B (Llama 2 70B recipe, see its docstring). Tokenizer: Llama 3's 128K.
"""

from llama.config import LLAMA31_70B
from llama.optim import LLAMA3_70B
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

CONFIG = TrainConfig(
    model=LLAMA31_70B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                              attention_impl="cudnn", max_seq_len=8192),
    optimizer=LLAMA3_70B,
    mesh=MeshConfig(data=1, fsdp=32, tensor=8),
    data=DataConfig(paths=None, format="array_record", tokenizer="llama3"),
    steps=LLAMA3_70B.warmup_steps + LLAMA3_70B.decay_steps, batch_size=512, seq_len=8192, micro_batches=16,
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
