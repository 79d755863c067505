"""Llama 3.1 405B pre-training at the paper's scale, with its batch ramp and six long-context stages to 131,072
tokens under context parallelism: 16,384 GPUs as fsdp 128 x context 16 x tensor 8.

    python -m llama.train --config experiments/llama31_405b.py --data '/data/corpus/*.array_record' --out RUN_DIR

"The Llama 3 Herd of Models" (arXiv 2407.21783):
- Batch ramp, section 3.4.1: 4M tokens per batch at 4,096 tokens per row, 8M at 8,192 after 252M tokens, 16M
  after 2.87T tokens. Here 1024 x 4096, then 1024 x 8192, then 2048 x 8192 rows (stages by token count).
- Long context, section 3.4.2: six stages from 8K to 128K over about 800B tokens, at the end of the 15.6T-token
  pre-training (before annealing). The paper does not give the stage lengths or their token counts; the choice
  here: 16K, 32K, 48K, 64K, 96K, 128K, about 133B tokens each (800B / 6), starting at 14.8T tokens, with rows
  kept near 16M tokens per batch (a multiple of the 128 data-parallel ranks: 1024, 512, 384, 256, 128, 128).
- Parallelism, section 3.3.2 and Table 4: TP 8, CP 16, PP 16, DP 8 at 131,072 tokens (Table 4 prints DP 4,
  but only DP 8 makes 16,384 GPUs and 16M tokens per batch add up). This project has no pipeline parallelism:
  fsdp 128 (ZeRO-3) takes PP 16 x DP 8's devices (`python -m sharding.plan --preset llama3.1-405b --mesh
  fsdp=-1,context=16,tensor=8 --devices 16384 --mode training --seq-len 131072 --batch 128 --remat full`:
  44.6 GB per GPU, fits 80 GB). The mesh is one for the whole run (a stage changes T and the batch, not the mesh),
  so CP 16 is on from step 0; at 4K-8K tokens it costs K/V all-gathers, no memory. Attention: cuDNN has no
  slot-offset masks, so under CP the blockwise "flash" kernel runs (llama/context_parallel.py).
- Optimizer: llama.optim.LLAMA3_405B (peak 8e-5, 8,000 warmup steps, cosine to 8e-7 over 1.2M steps); the
  run stops after the last stage's tokens.
RoPE: theta 500,000 with llama3 scaling throughout (the paper changes no RoPE setting for long context).
"""

import math

from llama.config import LLAMA31_405B
from llama.optim import LLAMA3_405B
from llama.train import DataConfig, Stage, TrainConfig, stage_schedule
from sharding.rules import MeshConfig

LONG_START = 14.8e12  # tokens: 15.6T pre-training minus ~800B of long-context stages (section 3.4.2)
LONG = [(16384, 1024), (32768, 512), (49152, 384), (65536, 256), (98304, 128), (131072, 128)]  # (T, rows)

CONFIG = TrainConfig(
    model=LLAMA31_405B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                               attention_impl="cudnn", max_seq_len=131072),
    optimizer=LLAMA3_405B,
    mesh=MeshConfig(data=1, fsdp=128, context=16, tensor=8),
    data=DataConfig(paths=None, format="array_record", tokenizer="llama3"),
    steps=LLAMA3_405B.warmup_steps + LLAMA3_405B.decay_steps, batch_size=1024, seq_len=4096, micro_batches=1,
    stages=(Stage(seq_len=8192, batch_size=1024, start_tokens=252e6),
            Stage(seq_len=8192, batch_size=2048, start_tokens=2.87e12),
            *(Stage(seq_len=T, batch_size=rows, start_tokens=LONG_START + i * 800e9 / len(LONG))
              for i, (T, rows) in enumerate(LONG))),
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
# The run ends when the last stage has had its ~133B tokens (step ~1.10M; the cosine's 1.2M-step horizon is
# the paper's, and annealing, section 3.4.3, follows as a separate run).
_last_start, _T, _rows = stage_schedule(CONFIG)[-1]
CONFIG = CONFIG.replace(steps=_last_start + math.ceil(800e9 / len(LONG) / (_T * _rows)))
