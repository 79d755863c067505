"""Back-of-the-envelope planner: per-device memory on a mesh, and training FLOPs and device-hours.

    python -m sharding.plan --preset llama3.1-405b --mesh data=1,fsdp=8,tensor=2 --dtype bfloat16 \\
        --mode inference --device-memory 80GB [--quantize int8] [--batch 1 --seq-len 8192]
    python -m sharding.plan --preset llama3.1-405b --mesh data=1,fsdp=-1,tensor=8 --devices 16384 \\
        --mode training --remat full --tokens 15.6e12 --mfu 0.38

Memory per device (bytes; every sharded dimension divided by the product of its mesh axes, from the SAME rules
table the code uses, so a parameter that does not divide is the same ShardingError here as at run time):
- parameters: the param specs at their dtype (int8: `llama.quant.quantized_specs`, q int8 + float32 scales,
  the embedding stays in --dtype); training keeps float32 master parameters (as `llama.train` does);
- optimizer state: AdamW's mu and nu, sharded and typed like the parameters (optax's default);
- gradients: float32, sharded like the parameters (`llama.train.compute_grads` accumulates in float32); and the
  update temporaries: the compute-dtype copy of the float32 weights that the matmuls read;
- activations: what the backward pass keeps, per layer and token, for the remat policy (below), times
  L x local batch x T, plus one layer's working set and the logits; inference: one layer's forward working set
  (`inference_bytes_per_token`) for one prefill chunk (`--prefill-chunk` tokens, llama.generate's default 4096)
  against the T-slot cache;
- attention (llama/attention.py): "xla" materialises the float32 scores and the probabilities, (4 + a)*N*S bytes
  per query token in bf16 (the mask fuses into the scores' fusion) and (8 + a)*N*S in float32 (S = T, the keys it
  attends to); "flash", "cudnn" and "splash" keep a float32 log-sum-exp per query head (4*N) and, per layer
  whatever T, a few float32 tiles [B, N, block_q, block_k] (scores and probabilities; in the backward the
  probabilities, dP and dS: 3 of them) plus the float32 [B, block_q, N, H] output accumulator; flash's backward adds a float32 dQ
  accumulator (4*N*H per token);
- KV cache (inference): [L, B, K, S, H] in --dtype (or --cache-dtype; int8: 1 + 4/H bytes per element), with
  the cache's fitted sharding (KV heads over tensor only where they divide, batch over data x fsdp only where it
  divides);
- FSDP gathers (fsdp > 1): the embedding table and one layer's weights made whole along D for use, and in
  training the layer's gradient before the reduction (both in the compute dtype); in a training step with the fused
  loss the tables are alive during the loss and the layer's weights during its backward, so each is counted with
  its own phase and only the larger phase counts (`fsdp_training_gathers`).

Saved bytes per token per layer (a = bytes of the compute dtype; t = tensor size; N, K heads, H head dim):
- remat "full" (`nothing_saveable`): the layer input, a*D;
- "save_matmuls" (`dots_with_no_batch_dims_saveable`): the input and every weight matmul's output:
  a*(D + (N + 2K)*H/t + D + 2F/t + D);
- "none": every intermediate the backward pass reads: a*(4D + (3N + 3K)*H/t + 4F/t) plus attention's own
  per-token bytes (above: ((4 or 8) + a)*N*T/t for xla, 4*N/t for the blockwise and fused paths).
Context parallelism (training, context = c > 1, llama/context_parallel.py): each device keeps T/c of every row's
tokens, so all of the above is per local token, T/c of them; attention adds one layer's all-gathered K and V
for the whole row, a*2*K*H/t per token of T, and their float32 gradients before the reduce-scatter. Parameters
are not sharded over `context` (the rules table shards them over fsdp and tensor only).
Plus, in every policy, one layer's "none" set as the backward pass's working set (the layer being
differentiated, recomputed if need be, and its gradients' temporaries) and the output layer: with whole logits
(loss_chunk 0) the logits and their gradient, 2a*V/t per token, beside it; with the fused output layer + loss
(llama/loss.py, the default) one chunk of about loss_chunk / (data x fsdp) tokens at (4 + a)*V/t bytes each, instead
of it when larger (the two are never alive together).
LoRA (`lora=`, `--lora RANK`): the base frozen in the compute dtype or int8, float32 adapters with float32
gradients and AdamW state (`llama.lora.adapter_specs`), the activations of full training.
This is an estimate of XLA's peak of live buffers (`peak_memory_in_bytes`, what XLA's TPU compiler holds to the
HBM; not `memory_analysis().temp_size_in_bytes`, which is larger in training steps), calibrated against XLA's TPU
compiler (`python -m sharding.compile`, docs/sharding.md);
`tests/test_plan.py` also compares it with the CPU compiler's `compiled.memory_analysis()`.

Training FLOPs (PaLM, Chowdhery et al. 2022, appendix B; `llama.metrics`, which the trainer's MFU uses too):
per token 6*P + 12*L*(N*H)*T, where P counts the
weights that take part in matmuls (every parameter but the embedding gather and the norm gains, plus the output
projection) and the second term is attention's QK^T and AV (forward 4*L*N*H*T, times 3 with the backward),
counted over the full T x T square as the xla path computes it. The Llama 3 paper's 3.8e25 for 405B on 15.6T
tokens is 6*P*D alone (3.78e25); the attention term adds 8% at T = 8192. Device-hours = FLOPs / (MFU * peak *
3600), peak = dense bf16 (H100 SXM: 989 TFLOP/s). LoRA (`lora=`): 4*P + 6*P_adapters + 12*L*(N*H)*T per token, the
frozen base's weight gradients skipped (`lora_train_flops_per_token`; Hu et al. 2021, section 4.2).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from typing import Mapping

import jax

from llama import cli, model
from llama.config import ATTENTION_IMPLS, ModelConfig, preset
from llama.generate import PREFILL_CHUNK
from llama.loss import LOSS_CHUNK
from llama.metrics import matmul_params  # noqa: F401  (one FLOPs formula for MFU logging and the planner)
from llama.metrics import lora_train_flops_per_token  # noqa: F401
from llama.metrics import train_flops_per_token as training_flops_per_token
from sharding import rules
from sharding.mesh import MeshConfig

H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s, NVIDIA H100 SXM datasheet (1979 TFLOP/s is with 2:4 sparsity)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Plan:
    preset: str
    mode: str
    mesh: dict
    n_devices: int
    batch: int
    seq_len: int
    remat: str
    params_bytes: float  # all per device
    optimizer_bytes: float
    grads_bytes: float
    activations_bytes: float
    kv_cache_bytes: float
    gathered_bytes: float  # FSDP: weights all-gathered for use (training: with their gradients, the peak phase's)
    device_memory: float
    flops_per_token: float = 0.0  # 6P + attention (LoRA: 4P + 6P_adapters + attention)
    flops_6p_per_token: float = 0.0  # the weights' term alone: 6P (the Llama 3 paper's convention); LoRA 4P + 6P_a
    tokens: float = 0.0
    mfu: float = 0.0
    peak_flops: float = H100_BF16_PEAK
    update_bytes: float = 0.0  # training: the compute-dtype copy of the float32 weights (LoRA on int8: one layer's)
    lora: bool = False  # training LoRA adapters on a frozen base (optimizer state and gradients: adapters only)
    peak_phase: str = ""  # training with the fused loss: "loss" or "backward", the phase whose terms are reported

    @property
    def total_bytes(self) -> float:
        return (self.params_bytes + self.optimizer_bytes + self.grads_bytes + self.activations_bytes
                + self.kv_cache_bytes + self.gathered_bytes + self.update_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_memory

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def device_hours(self) -> float:
        return device_hours(self.total_flops, self.mfu, self.peak_flops) if self.mfu else float("nan")


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '1.5TB', plain numbers are bytes; positive and finite."""
    m = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([KMGT]i?B)?\s*", str(text))
    if not m or not 0 < float(m.group(1)) < math.inf:
        raise ValueError(f"--device-memory {text!r}: expected a positive size, e.g. 80GB or 80GiB")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
             "TiB": 2**40}[unit]
    return float(m.group(1)) * scale


def _shard_factor(spec, sizes: Mapping[str, int]) -> int:
    return math.prod(math.prod(sizes[a] for a in (ax if isinstance(ax, tuple) else (ax,))) for ax in spec if ax)


class _SizesMesh:
    """Just enough of a Mesh (`.shape`) for `rules.check_divisible`, without devices."""

    def __init__(self, sizes):
        self.shape = dict(sizes)


def sharded_bytes(specs, sizes: Mapping[str, int], dtype_of) -> float:
    """Per-device bytes of a pytree of ParamSpecs under the strict rules. dtype_of(path, spec) -> bytes/element."""
    total = 0.0
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=model.is_spec)[0]:
        name = jax.tree_util.keystr(path)
        pspec = rules.logical_to_spec(spec.logical_axes)
        rules.check_divisible(name, spec.shape, pspec, _SizesMesh(sizes))
        total += math.prod(spec.shape) / _shard_factor(pspec, sizes) * dtype_of(path, spec)
    return total


def weights_bytes(cfg: ModelConfig, sizes: Mapping[str, int], a: int, quantize: str | None) -> float:
    """Per-device bytes of weights stored for use, not trained: in the compute dtype (a bytes), or with
    quantize="int8" q int8 + float32 scales (`llama.quant.quantized_specs`; the embedding stays at a)."""
    if quantize == "int8":
        from llama import quant

        kind = lambda path: jax.tree_util.keystr(path).rsplit(".", 1)[-1]  # noqa: E731  (q / scale / other)
        return sharded_bytes(quant.quantized_specs(cfg), sizes, lambda path, s: {"q": 1, "scale": 4}.get(kind(path), a))
    if quantize:
        raise ValueError(f"--quantize {quantize!r}: only int8 is implemented (llama.quant)")
    return sharded_bytes(model.param_specs(cfg), sizes, lambda p, s: a)


def device_hours(flops: float, mfu: float, peak_flops: float = H100_BF16_PEAK) -> float:
    return flops / (mfu * peak_flops * 3600.0)


def implied_mfu(flops: float, hours: float, peak_flops: float = H100_BF16_PEAK) -> float:
    return flops / (hours * 3600.0 * peak_flops)


def attention_bytes_per_token_layer(cfg: ModelConfig, seq_len: int, tensor: int, a: int) -> float:
    """Attention's own bytes per query token per layer, beyond q, k, v and the output (module docstring)."""
    N = cfg.n_heads / tensor
    if cfg.attention_impl == "xla":
        # The float32 scores [T, S] per head and the probabilities in the compute dtype. In bf16 the mask is applied
        # inside the fusion that writes the scores: with (8 + a) the planner over-estimated XLA's TPU temporaries by
        # 45-55% (Llama 3.2 1B and 3.1 8B train steps at 8K, sharding.compile, docs/sharding.md); with 4 + a it is
        # within 5%. In float32 the masked scores are a second float32 buffer (measured on the CPU compiler,
        # tests/test_plan.py; no float32 TPU compile was measured), so 8 + a stays there.
        return ((4 if a < 4 else 8) + a) * N * seq_len
    return 4 * N  # the float32 log-sum-exp the backward reuses


def attention_tile_bytes(cfg: ModelConfig, batch: float, seq_len: int, tensor: int, training: bool) -> float:
    """The blockwise path's temporaries per layer, independent of T beyond one block (0 for xla, whose are per
    token)."""
    if cfg.attention_impl == "xla":
        return 0.0
    from llama.attention import ACCELERATOR_BLOCKS  # the planner sizes accelerators (0 = the backend's default)

    bq, bk = cfg.attention_block_q or ACCELERATOR_BLOCKS[0], cfg.attention_block_k or ACCELERATOR_BLOCKS[1]
    N, bq, bk = cfg.n_heads / tensor, min(bq, seq_len), min(bk, seq_len)
    # float32 tiles alive at once: forward, the scores and the probabilities; backward (attention._flash_bwd), the
    # probabilities, dP and dS (the scores fuse into the probabilities' exp). Counting four in the backward
    # over-estimated XLA's CPU temporaries once the kernel took query slots (tests/test_plan.py, save_matmuls: 104.6
    # vs 80.3 MB); with three the three policies measure 0.85-1.20.
    return batch * (4 * (3 if training else 2) * N * bq * bk + 4 * N * bq * cfg.head_dim)


def activation_bytes_per_token_layer(cfg: ModelConfig, remat: str, seq_len: int, tensor: int, a: int) -> float:
    """Bytes the backward pass keeps per token per layer (module docstring)."""
    D, N, K, H, F, t = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, tensor
    kt = t if K % t == 0 else 1
    if remat == "full":
        return a * D
    if remat == "save_matmuls":
        return a * (3 * D + N * H / t + 2 * K * H / kt + 2 * F / t)
    scores = attention_bytes_per_token_layer(cfg, seq_len, t, a)
    return a * (4 * D + 3 * N * H / t + 3 * K * H / kt + 4 * F / t) + scores


def inference_bytes_per_token(cfg: ModelConfig, seq_len: int, tensor: int, a: int) -> float:
    """One layer's forward working set per token, without a backward pass to feed (prefill, decode): the larger of
    the attention phase (the layer input, q, k, v and, on the xla path, the float32 scores over seq_len keys; the
    mask, softmax and probabilities fuse into the ops that read them) and the MLP phase (input, normed input, gate
    and up). The training "none" set used before over-estimated XLA's TPU prefill temporaries by 2.5x (8B, 8K
    prompt, tensor=4: 5.9 GB vs 2.35 GB); this gives 2.24 GB (docs/sharding.md)."""
    D, N, K, H, F, t = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, tensor
    kt = t if K % t == 0 else 1
    scores = 4 * N * seq_len / t if cfg.attention_impl == "xla" else 0.0
    return max(a * (D + N * H / t + 2 * K * H / kt) + scores, a * (2 * D + 2 * F / t))


def fsdp_training_gathers(cfg: ModelConfig, sizes: Mapping[str, int], a: int) -> tuple[float, float]:
    """FSDP gathers of a training step with the fused output layer + loss, per phase: (the tables, one layer).
    Each gathered weight and its gradient are in the compute dtype (the float32 cast of the gradient comes after
    the reduction; (a + 4) over-estimated the 8B step's gathers by 1.5 GB, docs/sharding.md). The tables (the
    embedding, and the output layer when untied; XLA's TPU buffers of the 1B step hold bf16[V, D] tables) are
    gathered once, at a: the fused loss (llama/loss.py) takes the output table's gradient chunk by chunk into a
    float32 accumulator sharded like the parameter (f32[V/t, D/fsdp], counted in the gradients). One layer's
    weights are gathered with their gradient, 2a. The tables are used by the loss and the embedding, the layer's by
    that layer's backward: plan() counts each beside its own phase's working set, never both."""
    if sizes["fsdp"] == 1:
        return 0.0, 0.0
    t = sizes["tensor"]
    layer = (cfg.param_count() - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) - cfg.dim) / cfg.n_layers
    return cfg.vocab_size * cfg.dim / t * (1 if cfg.tie_embeddings else 2) * a, layer / t * 2 * a


def fsdp_gathered_bytes(cfg: ModelConfig, sizes: Mapping[str, int], a: int, quantize: str | None) -> float:
    """With fsdp > 1 each weight is all-gathered (D made whole) just before use: the embedding table (the model
    gathers it whole, `model.embed`) and one layer's weights at a time, at the compute dtype (int8 for int8
    weights), split over tensor only. Inference, and training with whole logits (`loss_chunk` 0, as measured on
    it); training with the fused loss: `fsdp_training_gathers`."""
    if sizes["fsdp"] == 1:
        return 0.0
    t = sizes["tensor"]
    layer = (cfg.param_count() - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) - cfg.dim) / cfg.n_layers
    emb, n = cfg.vocab_size * cfg.dim / t, layer / t
    # int8 weights are gathered as int8; the embedding only when it is the tied (quantized) output projection,
    # otherwise it stays in the compute dtype (llama.quant): counting it at 1 byte under-estimated the 405B int8
    # decode's gathers by 40% (v6e:4x4, fsdp=2 x tensor=8).
    w = 1 if quantize == "int8" else a
    return emb * (w if cfg.tie_embeddings else a) + n * w


def plan(cfg: ModelConfig, mesh: MeshConfig, n_devices: int, *, mode: str, dtype: str = "bfloat16",
         quantize: str | None = None, batch: int | None = None, seq_len: int = 8192, remat: str | None = None,
         device_memory: float = 80e9, tokens: float = 0.0, mfu: float = 0.0,
         peak_flops: float = H100_BF16_PEAK, param_dtype: str = "float32", attention: str | None = None,
         cache_dtype: str | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
         loss_chunk: int = LOSS_CHUNK, lora=None) -> Plan:
    """Per-device memory and training FLOPs (module docstring). attention: one of `ATTENTION_IMPLS` ("xla"
    materialises the float32 scores; the others are blockwise); default the config's. cache_dtype: the KV
    cache's (default `dtype`; int8 adds a float32 scale per H-vector, `model.init_cache`). prefill_chunk:
    inference prompt tokens per prefill pass (None: the whole prompt at once). loss_chunk: training tokens per chunk
    of the fused output layer + loss (`TrainConfig.loss_chunk`; 0: whole logits). lora: a `llama.lora.LoraConfig`
    (training only): the base is frozen in `dtype` (or int8 with quantize="int8") and only the adapters are
    trained."""
    if mode not in ("training", "inference"):
        raise ValueError(f"--mode {mode!r}: expected training or inference")
    cfg = cfg.replace(attention_impl=attention or cfg.attention_impl)
    sizes = mesh.shape(n_devices)
    dp, t, cp = sizes["data"] * sizes["fsdp"], sizes["tensor"], sizes.get("context", 1)
    remat = remat or cfg.remat
    local_t = seq_len / cp  # context parallelism: each device's share of a row's tokens
    kt = t if cfg.n_kv_heads % t == 0 else 1
    gathered_kv = 0.0 if cp == 1 else 2 * cfg.n_kv_heads * cfg.head_dim / kt * seq_len  # elements, one layer
    a = _BYTES[dtype]
    specs = model.param_specs(cfg)
    if batch is None:
        batch = dp if mode == "training" else 1
    b_local = batch / dp if batch % dp == 0 else batch  # a batch that does not divide is replicated (fitted)
    opt = grads = kv = update = 0.0
    peak_phase = ""
    gathered = fsdp_gathered_bytes(cfg, sizes, a, quantize)  # the fused-loss training step: per phase, below
    if lora is not None and mode != "training":
        raise ValueError("--lora applies to --mode training")
    if mode == "training" and lora is not None:
        # LoRA (llama/lora.py): the base weights are frozen, stored in the compute dtype (or int8, QLoRA-like),
        # with no float32 master copy, gradient or optimizer state; the adapters (`adapter_specs`, sharded like
        # the weights they adapt) are float32 with float32 gradients and AdamW mu and nu. The backward still
        # runs through every layer for the adapters' input gradients, so the activations below are those of
        # full training; only the base's weight gradients are not computed.
        from llama import lora as llama_lora

        adapters = sharded_bytes(llama_lora.adapter_specs(cfg, lora), sizes, lambda p, s: 4)
        params = weights_bytes(cfg, sizes, a, quantize) + adapters
        opt, grads = 2 * adapters, adapters
        if quantize == "int8":  # each layer's int8 weights are dequantized to the compute dtype for its matmuls
            update = sharded_bytes(specs["layers"], sizes, lambda p, s: a) / cfg.n_layers
    elif mode == "training":
        if quantize:
            raise ValueError("--quantize applies to inference, or to training with --lora (a frozen int8 base)")
        params = sharded_bytes(specs, sizes, lambda p, s: _BYTES[param_dtype])
        opt = 2 * params  # AdamW mu and nu, like the parameters
        grads = sharded_bytes(specs, sizes, lambda p, s: 4)
        # Besides the float32 gradients the step holds a compute-dtype copy of the float32 master weights, cast
        # for the forward and backward matmuls: a bytes per parameter (XLA's TPU buffers: `convert` to bf16
        # [L, ...] of every layer weight, 1B on v5p:2x2x1, 2026-12-04). Fitted on five TPU compiles (1B on 8 and
        # 4 chips, 8B on 8, 405B on 256 and 4096; docs/sharding.md): temp ratios 1.04 / 1.11 / 0.98 / 1.24 /
        # 1.15 with it, 1.05 / 1.21 / 1.05 / 1.32 / 1.16 without (against temp_size_in_bytes, before the planner
        # targeted the peak; the buffer itself is in the peak heap too).
        update = grads * a / 4
    if mode == "training":
        per_layer = activation_bytes_per_token_layer(cfg, remat, seq_len, t, a)
        working = activation_bytes_per_token_layer(cfg, "none", seq_len, t, a)  # one layer's backward
        if cfg.attention_impl == "flash":
            working += 4 * cfg.n_heads * cfg.head_dim / t  # its backward's float32 dQ accumulator
        vocab_local = cfg.vocab_size / (t if cfg.vocab_size % t == 0 else 1)
        saved = b_local * local_t * cfg.n_layers * per_layer  # what the layers keep for the backward
        tiles = attention_tile_bytes(cfg, b_local, local_t, t, training=True)
        if not loss_chunk:
            # The whole logits and their gradient, in the compute dtype per token (the float32 cast fuses into the
            # log-softmax that reads it; 2 x 4 bytes over-estimated XLA's TPU temporaries, 1B and 8B at 8K),
            # counted beside one layer's backward working set (measured so on the xla attention path).
            head = 2 * a * vocab_local * b_local * local_t
            acts = saved + b_local * (local_t * working + gathered_kv * (a + 4)) + head + tiles
        else:
            # The fused output layer + loss (llama/loss.py, `next_token_loss`): each row is cut into n chunks of c
            # positions with n = ceil(T / (loss_chunk // B)), B the (micro-)batch's global rows, so a device
            # holds its b_local rows' c positions at a time: about loss_chunk / (data x fsdp) tokens, not
            # loss_chunk (counting loss_chunk per device put the planner 68-74% over XLA on the 1B step with 4
            # devices). Per chunk: the float32 logits (exp fuses into them) and the logit gradient in the
            # compute dtype that the output layer's pullback reads (XLA's TPU buffers: f32 and bf16
            # [b_local, c, V/t]), 4 + a bytes per logit. The loss runs between the forward and the layers'
            # backward and keeps only the [B, T, D] hidden-state gradient, so its chunk and a layer's backward
            # working set are never alive together. The peak is in one of two phases (XLA's peak of live
            # buffers is what its TPU compiler holds to the HBM; docs/sharding.md, "Which XLA figure"): the loss,
            # with its chunk, the gathered tables (`fsdp_training_gathers`) and the output table's float32
            # gradient accumulator; or a layer's backward, with its working set, that layer's gathered weights and
            # gradient, and the float32 gradients of every layer (the backward loop's stacked output, which does not
            # exist during the loss). Summing both phases' gathers and all gradients beside the larger working set
            # put the planner 1.32x, 1.33x and 1.51x over XLA's peak temporaries of the 1B step (fsdp=8 at 8K;
            # fsdp=4, and fsdp=2 x tensor=2, at 2K) and 1.36x over the 8B step's (fsdp=8 at 8K); by phase XLA's are
            # 0.87-1.07 of the planner's in every training step measured (2026-12-04). The fields report the peak
            # phase's terms.
            n_chunks = -(-seq_len // max(1, loss_chunk // batch))
            head = (4 + a) * vocab_local * b_local * -(-seq_len // n_chunks) / cp
            tables, layer_gathers = fsdp_training_gathers(cfg, sizes, a)
            out_table = "embed" if cfg.tie_embeddings else "lm_head"  # model.param_specs: the output projection
            table_grad = (0.0 if lora is not None  # a frozen base has no table gradient
                          else sharded_bytes({out_table: specs[out_table]}, sizes, lambda p, s: 4))
            backward = grads + b_local * local_t * working + layer_gathers
            loss_phase = head + tables + table_grad
            if loss_phase > backward:  # only the output table's gradient exists yet
                peak_phase, grads, gathered, step_acts = "loss", table_grad, tables, head
            else:
                peak_phase, gathered, step_acts = "backward", layer_gathers, b_local * local_t * working
            acts = saved + step_acts + b_local * gathered_kv * (a + 4) + tiles
    else:
        params = weights_bytes(cfg, sizes, a, quantize)
        cache = jax.ShapeDtypeStruct(model.cache_shape(cfg, batch, seq_len), dtype)
        kv_spec = rules.fitted_spec(model.CACHE_AXES, cache.shape, sizes)
        kv_bytes = 1 + 4 / cfg.head_dim if cache_dtype == "int8" else _BYTES[cache_dtype or dtype]
        kv = 2 * math.prod(cache.shape) * kv_bytes / _shard_factor(kv_spec, sizes)
        chunk = min(seq_len, prefill_chunk or seq_len)  # one prefill pass at a time (llama.generate.prefill)
        acts = (b_local * chunk * inference_bytes_per_token(cfg, seq_len, t, a)
                + attention_tile_bytes(cfg, b_local, chunk, t, training=False) + b_local * 4 * cfg.vocab_size)
    if mode != "training":
        flops = weight_flops = 0.0
    elif lora is not None:  # no base weight gradients (lora_train_flops_per_token)
        flops = lora_train_flops_per_token(cfg, seq_len, lora)
        weight_flops = flops - 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    else:
        flops, weight_flops = training_flops_per_token(cfg, seq_len), 6.0 * matmul_params(cfg)
    return Plan(cfg.name, mode, sizes, n_devices, batch, seq_len, remat, params, opt, grads, acts, kv,
                gathered, device_memory,
                flops, weight_flops, tokens, mfu, peak_flops, update, lora is not None, peak_phase)


def format_plan(p: Plan) -> str:
    gb = lambda x: f"{x / 1e9:10.2f} GB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"{p.preset}  {p.mode}  mesh {mesh} ({p.n_devices} devices)  batch {p.batch} x {p.seq_len} tokens"
             + (f"  remat {p.remat}" if p.mode == "training" else ""),
             "per device:",
             f"  parameters      {gb(p.params_bytes)}" + ("  (frozen base + float32 adapters)" if p.lora else "")]
    if p.mode == "training":
        lines += [f"  optimizer state {gb(p.optimizer_bytes)}", f"  gradients       {gb(p.grads_bytes)}",
                  f"  update temps    {gb(p.update_bytes)}"]
    lines += [f"  activations     {gb(p.activations_bytes)}"]
    if p.gathered_bytes:
        lines += [f"  FSDP gathers    {gb(p.gathered_bytes)}"]
    if p.mode == "inference":
        lines += [f"  KV cache        {gb(p.kv_cache_bytes)}"]
    lines += [f"  total           {gb(p.total_bytes)}  of {p.device_memory / 1e9:.1f} GB: "
              + ("fits" if p.fits else f"does NOT fit (needs {p.total_bytes / p.device_memory:.2f}x)")]
    if p.peak_phase:
        phase = ("the layers' backward" if p.peak_phase == "backward"
                 else "the loss, before the layers' gradients exist")
        lines += [f"  (the terms at the step's peak: {phase})"]
    if p.mode == "training" and p.mesh.get("context", 1) > 1:
        lines += ["  (no pipeline parallelism in this project: Llama 3 trained 405B at 128K tokens with PP 16 as well "
                  "(paper Table 4); here fsdp takes its devices, so weights are all-gathered every layer instead)"]
    if p.mode == "training":
        weights = "4P + 6P_adapters" if p.lora else "6P"
        lines += [f"training FLOPs: {p.flops_per_token:.4g} per token ({weights} + 12 L N H T"
                  + ("; LoRA: no base weight gradients)" if p.lora else ")")]
        if p.tokens:
            lines += [f"  x {p.tokens:.4g} tokens = {p.total_flops:.4g} FLOPs "
                      f"({weights} alone: {p.flops_6p_per_token * p.tokens:.4g})"]
            if p.mfu:
                hours = p.device_hours
                lines += [f"  at MFU {p.mfu:.2f} of {p.peak_flops / 1e12:.0f} TFLOP/s: {hours:.4g} device-hours "
                          f"= {hours / p.n_devices / 24:.1f} days on {p.n_devices} devices "
                          f"({p.mfu * p.peak_flops / 1e12:.0f} TFLOP/s per device)"]
    return "\n".join(lines)


@cli.command  # expected errors (unknown preset, bad mesh, ...): one `error:` line, exit 2
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m sharding.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help="a llama.config preset, e.g. llama3.1-405b")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="e.g. data=1,fsdp=8,tensor=2")
    ap.add_argument("--devices", type=cli.number(1, integer=True), default=None,
                    help="device count (default: the mesh's product)")
    ap.add_argument("--mode", choices=("training", "inference"), default="inference")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="compute dtype (and the stored weights' dtype for inference)")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="training master parameters (llama.train keeps float32)")
    ap.add_argument("--quantize", choices=("int8",), default=None, help="inference: int8 weights")
    ap.add_argument("--cache-dtype", choices=("bfloat16", "float16", "float32", "int8"), default=None,
                    help="inference: KV cache dtype (default --dtype)")
    ap.add_argument("--batch", type=cli.number(1, integer=True), default=None,
                    help="global sequences (training: data*fsdp; inference: 1)")
    ap.add_argument("--seq-len", type=cli.number(1, integer=True), default=8192,
                    help="T (training) or the context length (inference)")
    ap.add_argument("--remat", choices=("none", "full", "save_matmuls"), default=None, help="default: the preset's")
    ap.add_argument("--device-memory", default="80GB")
    ap.add_argument("--tokens", type=cli.number(0, math.inf, hi_open=True), default=0.0, help="training token budget")
    ap.add_argument("--mfu", type=cli.number(0, 1, lo_open=True), default=None,
                    help="model FLOPs utilisation in (0, 1] for device-hours")
    ap.add_argument("--peak-tflops", type=cli.number(0, math.inf, lo_open=True, hi_open=True),
                    default=H100_BF16_PEAK / 1e12)
    ap.add_argument("--attention", choices=ATTENTION_IMPLS, default=None,
                    help="xla materialises the float32 scores; flash (blockwise), cudnn (GPU), splash (TPU) do not. "
                         "Default: the preset's")
    ap.add_argument("--prefill-chunk", type=cli.number(0, integer=True), default=PREFILL_CHUNK,
                    help=f"inference: prompt tokens per prefill pass (default {PREFILL_CHUNK}; 0: all at once)")
    ap.add_argument("--loss-chunk", type=cli.number(0, integer=True), default=LOSS_CHUNK,
                    help=f"training: tokens per chunk of the fused output layer + loss (default {LOSS_CHUNK}; 0: "
                         "whole logits)")
    ap.add_argument("--lora", type=cli.number(1, integer=True), default=None, metavar="RANK",
                    help="training: LoRA of this rank on a frozen base (--dtype, or int8 with --quantize int8)")
    ap.add_argument("--lora-targets", default=None,
                    help="comma-separated from wq,wk,wv,wo,w_gate,w_up,w_down (default: llama.lora.LoraConfig's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lora = None
    if args.lora_targets and not args.lora:
        ap.error("--lora-targets needs --lora RANK")
    if args.lora:
        from llama.config import ConfigError
        from llama.lora import LoraConfig

        try:
            lora = LoraConfig(rank=args.lora, **({"targets": tuple(args.lora_targets.split(","))}
                                                 if args.lora_targets else {}))
        except ConfigError as e:
            raise cli.UsageError(f"--lora-targets: {e}") from None
    mesh = MeshConfig.parse(args.mesh)
    fixed = [s for s in mesh.sizes.values() if s != -1]
    n = args.devices or (math.prod(fixed) if -1 not in mesh.sizes.values() else None)
    if n is None:
        ap.error("--mesh has a -1 axis: give --devices")
    try:
        cfg = preset(args.preset)
    except ValueError as e:
        raise cli.UsageError(f"--preset: {e}") from None
    p = plan(cfg, mesh, n, mode=args.mode, dtype=args.dtype, quantize=args.quantize,
             batch=args.batch, seq_len=args.seq_len, remat=args.remat,
             device_memory=parse_bytes(args.device_memory), tokens=args.tokens, mfu=args.mfu or 0.0,
             peak_flops=args.peak_tflops * 1e12, param_dtype=args.param_dtype, attention=args.attention,
             cache_dtype=args.cache_dtype, prefill_chunk=args.prefill_chunk or None, lora=lora,
             loss_chunk=args.loss_chunk)
    if args.json:
        print(json.dumps({**asdict(p), "total_bytes": p.total_bytes, "fits": p.fits, "total_flops": p.total_flops,
                          "device_hours": p.device_hours}, indent=2))
    else:
        print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
