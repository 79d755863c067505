"""Ahead-of-time compilation for TPU topologies on this CPU machine (`python -m sharding.compile`): the real train
step and generate's decode loop compile for v5e and v5p slices through libtpu's compile-only client, XLA's
memory analysis is parsed and set against the planner, and meshes a topology cannot hold are clear errors.

Reference: XLA's TPU compiler itself (libtpu); the planner is this project's estimate being checked."""

import json
import os

import jax
import pytest

from llama.config import LLAMA32_1B, TINY
from sharding import compile as C
from sharding.mesh import MeshConfig

needs_libtpu = pytest.mark.skipif(not C.libtpu_available(),
                                  reason=f"libtpu is not installed (compile-only TPU devices); {C.INSTALL_HINT}")


def _compile(cfg, topology, mesh_text, mode, *, batch, seq_len, remat="full", hlo_path=None):
    devices = C.topology_devices(topology)
    mesh_cfg = MeshConfig.parse(mesh_text)
    mesh = C.make_topology_mesh(mesh_cfg, topology, devices)
    if mode == "training":
        cfg = cfg.replace(param_dtype="float32", compute_dtype="bfloat16", remat=remat)
        tcfg = C.train_config(None, dict(model=cfg, seq_len=seq_len, sample_tokens=0, batch_size=batch,
                                         micro_batches=1), mesh_cfg, len(devices))
        return C.compile_case(cfg, mesh_cfg, mesh, C.Case(mode, batch, seq_len), topology=topology, train_cfg=tcfg,
                              hlo_path=hlo_path)
    cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    return C.compile_case(cfg, mesh_cfg, mesh, C.Case(mode, batch, seq_len), topology=topology)


def _check_memory_parsed(r, chips, kind):
    x = r["xla"]
    assert r["chips"] == chips and kind in r["device_kind"]
    assert x["argument"] > 0 and x["output"] > 0 and x["temp"] >= 0
    # total is XLA's peak of live buffers, what its TPU compiler holds to the HBM; memory_analysis's temp_size is
    # reported beside it (in big training steps it is larger; in tiny programs it can be smaller, even 0 with
    # tensor=4: docs/sharding.md, "Which XLA figure")
    assert x["peak"] > 0 and x["total"] == x["peak"] == x["argument"] + x["output"] - x["alias"] + x["heap"]
    assert x["heap"] > 0 and x["temp_total"] == x["argument"] + x["output"] - x["alias"] + x["temp"]
    assert r["fits"] == (x["total"] <= r["hbm_bytes"])
    # The state (training) or the KV cache (decode) is donated: every output byte but the small metrics / per-row
    # fields is written over an argument.
    assert x["alias"] >= 0.9 * x["output"]


@needs_libtpu
@pytest.mark.parametrize("topology,mesh,chips,kind", [("v5e:2x2", "fsdp=4", 4, "v5 lite"),
                                                       ("v5p:2x2x1", "fsdp=2,tensor=2", 4, "TPU v5")])
def test_tiny_train_step_and_decode_compile_for_tpu(topology, mesh, chips, kind):
    """Tiny arrays are padded to the TPU's (8, 128) tiles, so sizes are not compared with the planner here
    (the 1B test below does); the structure is: memory parsed, donation aliased, FSDP's collectives present."""
    train = _compile(TINY, topology, mesh, "training", batch=4, seq_len=128)
    _check_memory_parsed(train, chips, kind)
    assert train["collectives"]["all-gather"] > 0  # FSDP gathers weights for use
    assert train["collectives"]["all-reduce"] + train["collectives"]["reduce-scatter"] > 0  # and reduces grads
    decode = _compile(TINY, topology, mesh, "decode", batch=4, seq_len=128)
    _check_memory_parsed(decode, chips, kind)
    if "tensor=2" in mesh:  # Megatron: each attention and MLP output is summed over the tensor axis
        assert decode["collectives"]["all-reduce"] > 0


@needs_libtpu
def test_tiny_with_tensor_4_compiles_for_tpu_training_and_decode():
    """Megatron over all 4 chips of a v5e:2x2 (tensor=4, the grid's 1B and 8B inference mesh): tiny's 2 KV heads
    cannot be split 4 ways (the error test below), so 4 KV heads (multi-head attention, N = K = 4). Each chip holds
    one KV head and a quarter of the MLP; every attention and MLP output is summed over the 4 chips (all-reduce)."""
    cfg = TINY.replace(n_kv_heads=4)
    train = _compile(cfg, "v5e:2x2", "tensor=4", "training", batch=4, seq_len=128)
    _check_memory_parsed(train, 4, "v5 lite")
    assert train["mesh"]["tensor"] == 4 and train["collectives"]["all-reduce"] > 0
    decode = _compile(cfg, "v5e:2x2", "tensor=4", "decode", batch=4, seq_len=128)
    _check_memory_parsed(decode, 4, "v5 lite")
    assert decode["mesh"]["tensor"] == 4 and decode["collectives"]["all-reduce"] > 0


@needs_libtpu
def test_tiny_train_step_with_splash_attention_compiles_for_a_sharded_tpu_mesh(tmp_path):
    """The TPU splash kernel (Pallas/Mosaic) inside the trainer's sharded step: GSPMD cannot partition a Mosaic
    custom call ("Mosaic kernels cannot be automatically partitioned"), so llama/attention.py runs it in a
    shard_map over the rows (fsdp) and heads (tensor). The kernel must see one device's shard: tiny's 4 rows over
    fsdp=2 and 2 KV heads over tensor=2 leave 2 rows x 1 KV head x 2 query heads, [2, 2, 128, 16] per call."""
    hlo_path = str(tmp_path / "hlo.txt")
    # Mosaic rejects a bf16 dot asked for float32 precision; tests/test_convert.py and test_lora.py set "highest"
    # process-wide when pytest imports them, and the kernel's dots are lowered at compile time, so say "default".
    with jax.default_matmul_precision("default"):
        r = _compile(TINY.replace(attention_impl="splash"), "v5e:2x2", "fsdp=2,tensor=2", "training", batch=4,
                     seq_len=128, hlo_path=hlo_path)
    _check_memory_parsed(r, 4, "v5 lite")
    assert r["attention_impl"] == "splash"
    kernels = [line for line in open(hlo_path) if 'custom_call_target="tpu_custom_call"' in line]
    assert kernels  # the Mosaic kernel is in the TPU program (forward and backward)
    assert all("bf16[2,2,128,16]" in line for line in kernels if "splash_mqa_fwd" in line)


def test_splash_under_a_mesh_equals_the_reference_per_shard():
    """The shard_map around splash is exact: the kernel run by the Pallas interpreter on the 8 simulated CPU
    devices, rows over fsdp and heads over tensor, equals the dense reference on packed rows (the same tolerance
    as the unsharded interpreter test in tests/test_attention.py: float32 inputs, 1e-5)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama import attention as A
    from sharding.mesh import make_mesh

    B, T, N, K, H = 4, 200, 4, 2, 128
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, H), jnp.float32) for i, n in enumerate((N, K, K)))
    seg = jnp.asarray([[1] * 70 + [2] * 100 + [3] * 30] * 2 + [[1] * 200] * 2, jnp.int32)
    mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: A._splash(*a, 128, 128, interpret=True))(q, k, v, seg)
    ref = A.attention(q, (k, v), segment_ids=seg, impl="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology,mesh,chips,kind", [("v5e:2x2", "fsdp=4", 4, "v5 lite"),
                                                       ("v5p:2x2x1", "fsdp=2,tensor=2", 4, "TPU v5")])
def test_1b_train_step_and_decode_compile_for_tpu_and_match_the_planner(topology, mesh, chips, kind):
    """Llama 3.2 1B, training (float32 params + AdamW, bf16 compute, remat full, 4 x 2048 tokens) and decode
    (bf16, a 2048-slot cache, batch 4). Arguments are exact sums of array shards, so XLA must agree with the
    planner to within the batch and padding (2%); the temporaries alive at XLA's peak, and the peak itself (what
    XLA's TPU compiler holds to the HBM), are the planner's estimate, within the 15% the project holds it to
    (docs/sharding.md, "Which XLA figure"). With today's defaults (flash attention, the fused output layer + loss)
    XLA's peak temporaries measured 2.74 GB (v5e:2x2) and 2.26 GB (v5p:2x2x1) against the planner's 2.55 and 2.60 GB
    (2026-12-04; 3.65 and 3.40 before it counted the loss phase and a layer's backward apart). memory_analysis's
    temp_size, 3.39 and 2.99 GB, is not compared."""
    train = _compile(LLAMA32_1B, topology, mesh, "training", batch=4, seq_len=2048)
    _check_memory_parsed(train, chips, kind)
    x, p = train["xla"], train["planner"]
    print(f"{topology} {mesh}: XLA peak temp {x['heap'] / 1e9:.2f} GB (temp_size {x['temp'] / 1e9:.2f}), "
          f"planner {p['temp'] / 1e9:.2f} GB")
    assert x["argument"] == pytest.approx(p["argument"], rel=0.02)
    assert x["heap"] == pytest.approx(p["temp"], rel=0.15)  # the planner estimates XLA's peak (docs/sharding.md)
    assert x["total"] == pytest.approx(p["total"], rel=0.15)
    decode = _compile(LLAMA32_1B, topology, mesh, "decode", batch=4, seq_len=2048)
    _check_memory_parsed(decode, chips, kind)
    assert decode["xla"]["argument"] == pytest.approx(decode["planner"]["argument"], rel=0.02)


@needs_libtpu
def test_cli_json_and_manifest(tmp_path, capsys):
    assert C.main(["--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "tensor=2,fsdp=2", "--mode", "prefill",
                   "--seq-len", "128", "--batch", "2", "--json", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "prefill" and r["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 2} and r["chip"] == "v5e"
    assert r["hbm_bytes"] == 16 * 2**30 and set(r["collectives"]) == set(C.COLLECTIVES)
    (out,) = os.listdir(tmp_path)
    saved = json.load(open(tmp_path / out / "results.json"))
    assert saved["xla"] == r["xla"]
    assert json.load(open(tmp_path / out / "manifest.json"))["extra"]["benchmark"] == out.rsplit("-", 1)[0]


@needs_libtpu
@pytest.mark.parametrize("mesh,match", [
    ("fsdp=8", r"--mesh fsdp=8 does not fit --topology v5e:2x2 \(4 chips\).*product must be 4"),  # too many
    ("fsdp=-1,tensor=3", r"--mesh fsdp=-1,tensor=3 does not fit --topology v5e:2x2 \(4 chips\)"),  # does not divide
])
def test_mesh_the_topology_cannot_hold_is_a_clear_error(mesh, match, capsys):
    assert C.main(["--preset", "tiny", "--topology", "v5e:2x2", "--mesh", mesh, "--seq-len", "128"]) == 2
    assert "error: --mesh" in capsys.readouterr().err
    with pytest.raises(C.CompileError, match=match):
        C.make_topology_mesh(MeshConfig.parse(mesh), "v5e:2x2", C.topology_devices("v5e:2x2"))


@needs_libtpu
def test_parameters_the_mesh_does_not_divide_and_unknown_topologies_are_clear_errors(capsys):
    # tiny has 2 KV heads: tensor=4 cannot split them (parameters are strict, sharding/rules.py)
    assert C.main(["--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "tensor=4", "--seq-len", "128"]) == 2
    assert "['layers']['wk']" in capsys.readouterr().err
    with pytest.raises(C.CompileError, match=r"--topology 'v5e:2x'.*expected CHIP:SHAPE"):
        C.topology_devices("v5e:2x")
    with pytest.raises(C.CompileError, match=r"--topology 'v9z:2x2': libtpu cannot build this topology"):
        C.topology_devices("v9z:2x2")


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(C, "libtpu_available", lambda: False)
    with pytest.raises(C.CompileError, match=r"needs libtpu.*pip install -r requirements-tpu.txt"):
        C.topology_devices("v5e:2x2")


def test_collective_counting_on_hlo_text():
    hlo = ("%all-gather.1 = bf16[8,128] all-gather(%p), dimensions={0}\n"
           "%ars = (f32[4], f32[4]) all-reduce-start(%x), to_apply=%add\n%ard = f32[4] all-reduce-done(%ars)\n"
           "%rs = f32[2] reduce-scatter(%y), dimensions={0}\n%cp = f32[2] collective-permute(%z)\n"
           "%fusion = f32[2] fusion(%all-gather.1), calls=%fused_computation.all-reduce\n")
    assert C.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                                        "collective-permute": 1}


def test_local_devices_compile_without_libtpu(capsys, tmp_path):
    """--topology local compiles for this machine's devices (the 8 simulated CPUs here; one GPU on a GPU
    machine, whose XLA client needs the CUDA driver: GPU AOT without a GPU is out of reach)."""
    assert C.main(["--preset", "tiny", "--topology", "local", "--mesh", "fsdp=4,tensor=2", "--mode", "decode",
                   "--seq-len", "64", "--batch", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "topology local (8 x cpu)" in out and "device memory unknown" in out and "all-reduce" in out


@needs_libtpu
@pytest.mark.slow
def test_a_program_that_cannot_fit_is_reported_with_xlas_figures(capsys, tmp_path):
    """XLA's TPU compiler refuses a program whose buffers exceed the chip's HBM: tiny at 64K tokens on the xla
    reference attention path (flash, the default, fits) materialises
    4 heads x 64K x 64K float32 attention scores per row (64 GiB), far beyond a v5e's 16 GiB."""
    assert C.main(["--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=4", "--seq-len", "65536",
                   "--batch", "4", "--attention-impl", "xla", "--json", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is False and r["xla"] is None
    oom = r["xla_out_of_memory"]
    assert oom["what"] == "HLO temporaries" and oom["required_bytes"] > 64 * 2**30
    assert oom["available_bytes"] == pytest.approx(15.75 * 2**30, rel=0.01)



@needs_libtpu
@pytest.mark.slow
def test_xlas_hbm_check_is_its_peak_not_memory_analysis_temp_size(capsys, tmp_path):
    """Which XLA figure decides whether a program fits: its TPU compiler refuses a program whose "HLO temporaries"
    exceed the HBM, and that requirement is the peak of live buffers (`peak_memory_in_bytes`, arguments included),
    not arguments + `temp_size_in_bytes`. Tiny on the xla attention path at 8K tokens grows linearly in rows: 4 and 8
    rows compile (peak 4.47 and 8.94 GB; temp_size 5.63 and 11.11 GB, 2026-12-04); 16 rows are refused for 16.67
    GiB, the peak extrapolated (16.64 GiB, 0.2% off: the batch's own arguments), while the temp_size total would
    be 20.6 GiB. The same holds for the 405B step on v5p:4x4x8 (docs/sharding.md, "Which XLA figure")."""
    def run(rows):
        assert C.main(["--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=4", "--seq-len", "8192",
                       "--batch", str(rows), "--attention-impl", "xla", "--json", "--out", str(tmp_path)]) == 0
        return json.loads(capsys.readouterr().out)

    x4, x8 = run(4)["xla"], run(8)["xla"]
    refused = run(16)
    assert refused["xla"] is None and refused["fits"] is False
    need = refused["xla_out_of_memory"]["required_bytes"]
    assert need == pytest.approx(x8["peak"] + 2 * (x8["peak"] - x4["peak"]), rel=0.01)
    assert need < 0.9 * (x8["temp_total"] + 2 * (x8["temp_total"] - x4["temp_total"]))


@pytest.mark.parametrize("seq_len,chunk,prompt", [(8192, 4096, 8192), (4096, None, 4096), (5000, 2560, 5120)])
def test_prefill_is_compiled_in_generates_passes(seq_len, chunk, prompt):
    """The prefill compiled is the one `llama.generate` runs by default: passes of at most PREFILL_CHUNK tokens,
    equal and rounded up to its BUCKET, the prompt padded to a whole number of them (generate._prepare's rule).
    Compiling one whole-prompt pass instead put XLA's 8B prefill temp at 2.55x the planner's, which plans the
    passes (docs/sharding.md)."""
    from llama import generate

    mesh = jax.make_mesh((1, 1, 8), ("data", "fsdp", "tensor"))
    args, static = C._prefill_inputs(TINY.replace(max_seq_len=8192), mesh, C.Case("prefill", 1, seq_len))
    assert static["chunk"] == chunk and args[1].shape == (1, prompt)
    assert static["cache_len"] >= prompt and (chunk is None or prompt % chunk == 0)
    assert chunk is None or chunk <= generate.PREFILL_CHUNK
