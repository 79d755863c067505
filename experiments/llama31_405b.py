"""Llama 3.1 405B pre-training at the paper's scale: 16,384 GPUs as data 16 x fsdp 128 x tensor 8.

    python -m llama.train --config experiments/llama31_405b.py --data '/data/corpus/*.array_record' --out RUN_DIR

The Llama 3 paper (arXiv 2407.21783) section 3.3.2 trains 405B on 16K H100s with tensor parallel 8 inside a
node and pipeline/context/data parallelism across; this project has no pipeline stages, so fsdp (ZeRO-3)
takes their place. Batch: 2048 rows x 8192 tokens = 16.8M tokens, the paper's final batch (section 3.4.1:
4M -> 8M -> 16M tokens; start smaller with --set batch_size=512). Optimizer: llama.optim.LLAMA3_405B (peak
8e-5, 8,000 warmup steps, cosine to 8e-7 over 1.2M steps). 405B x 16 B / 2048-way sharding = 3.2 GB of
master weights and AdamW state per GPU.
"""

from llama.config import LLAMA31_405B
from llama.optim import LLAMA3_405B
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

CONFIG = TrainConfig(
    model=LLAMA31_405B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                               attention_impl="cudnn", max_seq_len=8192),
    optimizer=LLAMA3_405B,
    mesh=MeshConfig(data=16, fsdp=128, tensor=8),
    data=DataConfig(paths=None, format="array_record", tokenizer="llama3"),
    steps=LLAMA3_405B.warmup_steps + LLAMA3_405B.decay_steps, batch_size=2048, seq_len=8192, micro_batches=1,
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
