"""Llama 3.1 8B pre-training on a GPU pod: 64 GPUs (8 nodes x 8), ZeRO-3 (fsdp) over all of them.

    python -m llama.train --config experiments/llama31_8b.py --data '/data/corpus/*.array_record' --out RUN_DIR

Batch: 512 rows x 8192 tokens = 4.2M tokens per step (the Llama 3 paper's initial 405B batch, section 3.4.1;
Meta has not published the 8B's), 8 micro-batches of one row per GPU. bf16 compute, f32 master weights and
AdamW state (16 bytes/param: 8B x 16 B / 64 = 2 GB per GPU), full remat, cuDNN attention.
Optimizer: llama.optim.LLAMA3_8B (Llama 2 7B recipe, see its docstring). Tokenizer: Llama 3's 128K.
"""

from llama.config import LLAMA31_8B
from llama.optim import LLAMA3_8B
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

CONFIG = TrainConfig(
    model=LLAMA31_8B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                             attention_impl="cudnn", max_seq_len=8192),
    optimizer=LLAMA3_8B,
    mesh=MeshConfig(data=1, fsdp=64, tensor=1),
    data=DataConfig(paths=None, format="array_record", tokenizer="llama3"),
    steps=LLAMA3_8B.warmup_steps + LLAMA3_8B.decay_steps, batch_size=512, seq_len=8192, micro_batches=8,
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
