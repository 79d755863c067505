"""The main job: pre-train a small Llama 3.1-architecture model on this machine's CPU in a few minutes.

    python -m llama.train --config experiments/cpu_small.py [--data 'my/texts/*.txt'] [--out runs/cpu_small]

Corpus: the CPython documentation topics that ship with Python (`pydoc_data.topics`, ~0.46 MB), or your own
files with --data. Tokenizer: a 4096-piece SentencePiece BPE trained on that text in a few seconds (a
128K-vocabulary Llama 3 tokenizer would spend most of a small model's FLOPs and parameters on the output
layer; see docs/benchmarks.md "Training step"). Architecture: Llama 3.1's (GQA 4:1, SwiGLU, RMSNorm,
RoPE theta 500000 with llama3 scaling, untied head), just narrower and shallower.
"""

from llama.config import ModelConfig, RopeScaling
from llama.optim import OptimizerConfig
from llama.train import DataConfig, TrainConfig
from sharding.rules import MeshConfig

MODEL = ModelConfig(
    name="llama3.1-cpu-small", vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768,
    rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
    max_seq_len=1024, bos_id=1, eos_ids=(2,),  # SentencePiece ids (Llama 2 layout: unk 0, bos 1, eos 2)
)

CONFIG = TrainConfig(
    model=MODEL,
    # Small models tolerate a high peak LR; the cosine ends at 10% of peak (Llama 2's ratio).
    optimizer=OptimizerConfig(peak_lr=2e-3, end_lr=2e-4, warmup_steps=20, decay_steps=230, weight_decay=0.1),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    # A fifth of the documents (by a stable hash of each; 11% of the text) is held out: the validation curve
    # in loss.png, on 4 batches (8,192 tokens) of them every 50 steps.
    data=DataConfig(paths=None, tokenizer=None, eval_share=0.2),
    steps=250, batch_size=8, seq_len=256, micro_batches=1,
    log_every=5, checkpoint_every=100, keep_checkpoints=2, eval_every=50, eval_batches=4,
    sample_tokens=80, sample_prompt='The "if" statement is used for',
)
