"""Llama 3.1 8B Direct Preference Optimization (DPO) as in the Llama 3 paper, section 4.1.4, on 64 GPUs (fsdp).

    python -m llama.train --config experiments/llama31_8b_dpo.py --set init_from=SFT_RUN_OR_CKPT \
        data.paths='/data/dpo/*.jsonl' --out RUN_DIR

Data: preference JSONL rows {"prompt": [...], "chosen": ..., "rejected": ...} (input_pipeline/chat.py); chosen and
rejected sit side by side in a row as two segments sharing the prompt. data.paths is a placeholder.

From the paper (section 4.1.4): "a learning rate of 10^-5 and set the beta hyper-parameter to be 0.1"; "we mask
out special formatting tokens including header and termination tokens ... from both chosen and rejected
responses in the loss" (dpo.mask_special=True); "an additional negative log-likelihood (NLL) loss term with a
scaling coefficient of 0.2 on the chosen sequences" (dpo.nll_coef, the mean per-token NLL, TRL's "sft" term).
The reference is the starting policy (init_from, normally the SFT model): a frozen float32 copy, 32 GB for 8B,
0.5 GB per GPU over 64, plus one forward pass per step (docs/post_training.md).

The paper is silent on the rest; choices here: 64 rows x 8192 tokens per step (each row several pairs), 2000
steps, 50 warmup steps then cosine to 10% of peak, weight decay 0, no label smoothing.
"""

from llama.config import LLAMA31_8B
from llama.optim import OptimizerConfig
from llama.train import DataConfig, DpoConfig, TrainConfig
from sharding.rules import MeshConfig

STEPS = 2000
CONFIG = TrainConfig(
    model=LLAMA31_8B.replace(param_dtype="float32", compute_dtype="bfloat16", remat="full",
                             attention_impl="cudnn", max_seq_len=8192),
    optimizer=OptimizerConfig(peak_lr=1e-5, end_lr=1e-6, warmup_steps=50, decay_steps=STEPS - 50,
                              weight_decay=0.0),
    mesh=MeshConfig(data=1, fsdp=64, tensor=1),
    data=DataConfig(paths="data/dpo/*.jsonl", format="preference", tokenizer="llama3"),
    objective="dpo",
    dpo=DpoConfig(beta=0.1, nll_coef=0.2, mask_special=True, label_smoothing=0.0, reference=None),
    steps=STEPS, batch_size=64, seq_len=8192, micro_batches=1,
    log_every=10, checkpoint_every=250, keep_checkpoints=3, sample_tokens=0,
)
