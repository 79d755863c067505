"""Llama 3.1 8B with its long-context continuation: pre-training at 8,192 tokens, then six stages to 131,072
tokens under context parallelism, on 64 GPUs (8 nodes x 8) as fsdp 8 x context 8.

    python -m llama.train --config experiments/llama31_8b_long.py --data '/data/corpus/*.array_record' --out RUN_DIR

The 8K part is experiments/llama31_8b.py's (512 rows x 8192 tokens, 8 micro-batches, llama.optim.LLAMA3_8B).
The continuation follows the Llama 3 paper's section 3.4.2 (six stages from 8K to 128K, ~800B tokens, at the
end of pre-training; described for 405B, the recipe the 8B also followed per the model card's 128K context).
Not given by the paper, chosen here: stage lengths 16K, 32K, 48K, 64K, 96K, 128K, ~133B tokens each,
starting 800B tokens before the end of llama31_8b.py's horizon (1.2M steps x 4.2M tokens = 5.0T; Meta's 8B saw
~15T), and 64 rows per step in every long stage (the smallest multiple of 8 micro-batches x 8 data-parallel
ranks: one 128K row per micro-batch per rank, 8.4M tokens per step at 128K). A run made with this
file continues into its long stages by itself, and resumes across them exactly (tests/test_stages.py). Per GPU
at 128K: 16,384 tokens of one row (`python -m sharding.plan --preset llama3.1-8b --mesh fsdp=8,context=8
--mode training --seq-len 131072 --batch 8 --remat full`). RoPE: theta 500,000, llama3 scaling, unchanged.
"""

import math

from llama.config import LLAMA31_8B
from llama.optim import LLAMA3_8B
from llama.train import DataConfig, Stage, TrainConfig, stage_schedule
from sharding.rules import MeshConfig

_HORIZON = (LLAMA3_8B.warmup_steps + LLAMA3_8B.decay_steps) * 512 * 8192  # llama31_8b.py's tokens, 5.0T
LONG_START = _HORIZON - 800e9
LONG = (16384, 32768, 49152, 65536, 98304, 131072)

CONFIG = TrainConfig(
    model=LLAMA31_8B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                             attention_impl="cudnn", max_seq_len=131072),
    optimizer=LLAMA3_8B,
    mesh=MeshConfig(data=1, fsdp=8, context=8, tensor=1),
    data=DataConfig(paths=None, format="array_record", tokenizer="llama3"),
    steps=LLAMA3_8B.warmup_steps + LLAMA3_8B.decay_steps, batch_size=512, seq_len=8192, micro_batches=8,
    stages=tuple(Stage(seq_len=T, batch_size=64, start_tokens=LONG_START + i * 800e9 / len(LONG))
                 for i, T in enumerate(LONG)),
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
_last_start, _T, _rows = stage_schedule(CONFIG)[-1]  # stop after the last stage's ~133B tokens
CONFIG = CONFIG.replace(steps=_last_start + math.ceil(800e9 / len(LONG) / (_T * _rows)))
