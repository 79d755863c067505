"""Llama 3.1 8B supervised fine-tuning (SFT) as in the Llama 3 paper, section 4.1.3, on 64 GPUs (fsdp).

    python -m llama.train --config experiments/llama31_8b_sft.py --set init_from=BASE_CKPT_OR_HF_DIR \
        data.paths='/data/sft/*.jsonl' --out RUN_DIR

Data: chat JSONL rows {"messages": [...]} (input_pipeline/chat.py), rendered in the Llama 3.1 chat format with
Llama 3's tokenizer; the loss covers the assistant content and each assistant turn's <|eot_id|> (the paper:
"masking loss on prompt tokens"); rows are packed whole with document masks. data.paths is a placeholder.

From the paper (section 4.1.3): "a learning rate of 10^-5 over the course of 8.5K to 9K steps" (stated for the
largest models; used here for 8B too). The paper is silent on the rest; choices here:
- batch: 64 rows x 8192 tokens (0.5M tokens per step, packed), one row per GPU;
- schedule: 100 linear warmup steps, then cosine to 10% of peak (the pre-training schedule's shape);
- weight decay 0 (TRL's and torchtune's SFT default; the paper does not say);
- over-long conversations are an error (data.overlong=drop to drop and count them instead).
"""

from llama.config import LLAMA31_8B
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

STEPS = 9000  # paper: 8.5K-9K
CONFIG = TrainConfig(
    model=LLAMA31_8B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                             attention_impl="cudnn", max_seq_len=8192),
    optimizer=OptimizerConfig(peak_lr=1e-5, end_lr=1e-6, warmup_steps=100, decay_steps=STEPS - 100,
                              weight_decay=0.0),
    mesh=MeshConfig(data=1, fsdp=64, tensor=1),
    data=DataConfig(paths="data/sft/*.jsonl", format="chat", tokenizer="llama3"),
    objective="sft",
    steps=STEPS, batch_size=64, seq_len=8192, micro_batches=1,
    log_every=10, checkpoint_every=500, keep_checkpoints=3, sample_tokens=0,
)
