"""Generation: against Hugging Face transformers greedy `generate` on the real stories260K model, against a
full forward at every decode step, across meshes, and the batch, stop, context and CLI contracts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama import generate as G
from llama import model as M
from llama.config import TINY, to_hf_config
from llama.sampling import GREEDY, SamplingConfig
from sharding.rules import MeshConfig, make_mesh
from tests.conftest import require_shared

# Decode-vs-forward tolerance: both sides are the same float32 arithmetic except the reduction length of
# the attention softmax (padded cache slots add exact zeros) and XLA's blocking of the matmuls, so they
# differ by float32 rounding only: ~1e-7 relative on logits of magnitude <~1.
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def stories():
    from llama.convert import load_llama2c

    cfg, params = load_llama2c(str(require_shared("assets", "llama2c_stories260K", "stories260K.bin")))
    return cfg, jax.device_put(params)


@pytest.fixture(scope="module")
def stories_tok():
    from llama.tokenizer import load_tokenizer

    return load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))


def hf_generate(cfg, params, prompt, n):
    """transformers float32 eager greedy generate with its KV cache, on the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llama.convert import params_to_hf

    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(params, cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_stories260k_greedy_200_tokens_match_transformers(stories, stories_tok):
    cfg, params = stories
    ours = G.generate(params, [[cfg.bos_id]], cfg=cfg, max_new_tokens=200, stop_ids=[]).tokens[0]
    assert len(ours) == 200
    assert ours == hf_generate(cfg, params, [cfg.bos_id], 200)
    story = stories_tok.decode(ours[:ours.index(2)] if 2 in ours else ours)
    assert story.startswith("Once upon a time") and "Lily" in story, story


def test_stories260k_batch_of_different_lengths_matches_transformers_row_by_row(stories, stories_tok):
    cfg, params = stories
    texts = ["Once upon a time", "The cat", "Tom and his friend went to the park. They saw a big"]
    prompts = [stories_tok.encode(t, bos=True) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    res = G.generate(params, prompts, cfg=cfg, max_new_tokens=40, stop_ids=[])
    for p, ids in zip(prompts, res.tokens):
        assert ids == hf_generate(cfg, params, p, 40)


def _drive(params, cfg, prompts, n_steps, sampling=GREEDY, chunk=None, cache_dtype=None):
    """Prefill (in chunks of `chunk` tokens) then n_steps decode steps, returning every step's logits [B, V] and
    the state."""
    B, T = len(prompts), max(len(p) for p in prompts)
    T = -(-T // chunk) * chunk if chunk else T
    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    stop = np.full((B, 1), -1, np.int32)
    logits, state = G._prefill_jit(params, tokens, lengths, np.full(B, n_steps + 1, np.int32), stop,
                                   jax.random.key(0), cfg=cfg, sampling=sampling, max_new=n_steps + 1,
                                   cache_len=T + n_steps + 5, chunk=chunk, cache_dtype=cache_dtype)
    out = [logits]
    step = jax.jit(G.decode_step, static_argnames=("cfg", "sampling"))
    for _ in range(n_steps):
        logits, state = step(params, state, cfg=cfg, sampling=sampling)
        out.append(logits)
    return out, state


def test_every_decode_step_equals_a_full_forward():
    """GQA 4:2, llama3 RoPE scaling whose smoothed band starts below position 64 (TINY); the 70-token prompt
    crosses it. Prompts of three lengths share one padded prefill. (Tied embeddings: the stories260K tests.)"""
    cfg = TINY
    params = M.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 70, 20)]
    n = 12
    logits, state = _drive(params, cfg, prompts, n)
    out = np.asarray(state.out)
    seqs = np.zeros((len(prompts), max(map(len, prompts)) + n + 1), np.int32)  # right padding: causal, harmless
    for b, p in enumerate(prompts):
        seqs[b, :len(p) + n + 1] = p + out[b].tolist()
    full = np.asarray(M.forward(params, jnp.asarray(seqs), cfg=cfg))
    for b, p in enumerate(prompts):
        for s in range(n + 1):
            np.testing.assert_allclose(np.asarray(logits[s][b]), full[b, len(p) - 1 + s], atol=ATOL, rtol=0,
                                       err_msg=f"row {b} step {s}")


def test_chunked_prefill_equals_one_pass_and_a_full_forward():
    """A 70-token prompt prefilled 32 tokens at a time (3 chunks, each attending to the cache written so far)
    beside shorter rows whose last token falls in the first chunk: the same logits as a full forward, at the
    prefill and at every decode step; with an int8 cache, the same tokens as a one-pass int8 prefill."""
    cfg = TINY.replace(attention_block_q=16, attention_block_k=16)
    params = M.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 70, 20)]
    n = 4
    logits, state = _drive(params, cfg, prompts, n, chunk=32)
    seqs = np.zeros((len(prompts), 70 + n + 1), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :len(p) + n + 1] = p + np.asarray(state.out)[b].tolist()
    full = np.asarray(M.forward(params, jnp.asarray(seqs), cfg=cfg))
    for b, p in enumerate(prompts):
        for s in range(n + 1):
            np.testing.assert_allclose(np.asarray(logits[s][b]), full[b, len(p) - 1 + s], atol=ATOL, rtol=0,
                                       err_msg=f"row {b} step {s}")
    one = G.generate(params, prompts, cfg=cfg, max_new_tokens=8, stop_ids=[], cache_dtype="int8", prefill_chunk=None)
    chunked = G.generate(params, prompts, cfg=cfg, max_new_tokens=8, stop_ids=[], cache_dtype="int8", prefill_chunk=16)
    assert chunked.tokens == one.tokens


SHARD_CFG = TINY.replace(n_heads=8, n_kv_heads=4)  # 8 query heads divide tensor=8; 4 KV heads fall back


@pytest.mark.parametrize("mesh_cfg,kv_spec", [(MeshConfig(data=1, fsdp=1, tensor=8), None),
                                              (MeshConfig(data=2, fsdp=1, tensor=4), "tensor")])
def test_greedy_identical_on_one_and_eight_devices(mesh_cfg, kv_spec):
    cfg = SHARD_CFG
    params = M.init_params(cfg, jax.random.key(5))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 17, 9, 30)]
    single = G.generate(params, prompts, cfg=cfg, max_new_tokens=24, stop_ids=[])
    mesh = make_mesh(mesh_cfg)
    sharded = G.shard_params(params, cfg, mesh)
    assert sharded["layers"]["wq"].sharding.spec[2] == "tensor"
    spec = G.cache_sharding(cfg, mesh, len(prompts)).spec  # [L, B, K, S, H]: batch over data x fsdp
    assert tuple(spec) == (None, ("data", "fsdp"), kv_spec, None, None), spec
    multi = G.generate(sharded, prompts, cfg=cfg, max_new_tokens=24, stop_ids=[], mesh=mesh)
    assert multi.tokens == single.tokens


def test_rows_stop_on_their_own_stop_ids_and_limits():
    cfg = TINY
    params = M.init_params(cfg, jax.random.key(7))
    prompts = [[1, 10, 11], [1, 12, 13, 14, 15], [1, 20]]
    free = G.generate(params, prompts, cfg=cfg, max_new_tokens=16, stop_ids=[]).tokens
    stop0 = free[0][4]
    res = G.generate(params, prompts, cfg=cfg, max_new_tokens=[16, 16, 6], stop_ids=[[stop0], [], []])
    assert res.tokens[0] == free[0][:free[0].index(stop0) + 1] and res.stop_reason[0] == "stop"
    assert res.tokens[1] == free[1] and res.stop_reason[1] == "length"
    assert res.tokens[2] == free[2][:6] and res.stop_reason[2] == "length"


def test_context_limit_error_or_truncation():
    cfg = TINY.replace(max_seq_len=32)
    params = M.init_params(cfg, jax.random.key(0))
    prompt = list(range(1, 31))
    with pytest.raises(G.ContextLimitError, match="exceed the context of 32"):
        G.generate(params, [prompt], cfg=cfg, max_new_tokens=5)
    res = G.generate(params, [prompt, [1, 2, 3]], cfg=cfg, max_new_tokens=5, stop_ids=[], truncate=True)
    assert [len(t) for t in res.tokens] == [2, 5] and res.stop_reason == ["context", "length"]
    with pytest.raises(G.ContextLimitError):
        G.generate(params, [list(range(32))], cfg=cfg, max_new_tokens=1, truncate=True)


def test_seeded_sampling_is_reproducible_and_stream_matches():
    cfg = TINY
    params = M.init_params(cfg, jax.random.key(2))
    prompts = [[1, 5, 6], [1, 7]]
    s = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50)
    a = G.generate(params, prompts, cfg=cfg, max_new_tokens=20, sampling=s, seed=11, stop_ids=[]).tokens
    b = G.generate(params, prompts, cfg=cfg, max_new_tokens=20, sampling=s, seed=11, stop_ids=[]).tokens
    c = G.generate(params, prompts, cfg=cfg, max_new_tokens=20, sampling=s, seed=12, stop_ids=[]).tokens
    assert a == b and a != c
    streamed = [t for chunk in G.stream(params, prompts[0], cfg=cfg, max_new_tokens=20, sampling=s, seed=11,
                                        stop_ids=[], chunk=3) for t in chunk]
    assert streamed == G.generate(params, prompts[:1], cfg=cfg, max_new_tokens=20, sampling=s, seed=11,
                                  stop_ids=[]).tokens[0]


def test_cli_json_ids_match_the_api_plain_and_int8_on_a_mesh(stories, tmp_path, capsys):
    from llama.checkpoint import save_model

    cfg, params = stories
    ckpt = save_model(str(tmp_path / "stories"), cfg, params)
    tok = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    base = ["--checkpoint", ckpt, "--tokenizer", tok, "--prompt", "Once upon a time", "--temperature", "0",
            "--max-new-tokens", "30", "--json-ids"]
    G.main(base + ["--report", str(tmp_path / "report")])
    captured = capsys.readouterr()
    row = json.loads(captured.out.strip().splitlines()[0])
    report = json.loads((tmp_path / "report" / "generations.json").read_text())
    assert report["generations"][0]["ids"] == row["ids"] and report["timing"]["decode_tokens_per_s"] > 0
    m = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert m["seeds"] == {"sampling": 0} and m["config"]["model"]["dim"] == cfg.dim
    from llama.tokenizer import load_tokenizer

    prompt = load_tokenizer(tok).encode("Once upon a time", bos=True)
    assert row["ids"] == G.generate(params, [prompt], cfg=cfg, max_new_tokens=30).tokens[0]
    assert "prefill:" in captured.err and "decode:" in captured.err
    # KV heads (4) and FFN (172) do not divide tensor=8: those parameter axes fall back to replication.
    G.main(base + ["--mesh", "data=1,fsdp=1,tensor=8", "--quantize", "int8"])
    q = json.loads(capsys.readouterr().out.strip().splitlines()[0])["ids"]
    from llama.quant import quantize_params

    assert q == G.generate(quantize_params(params), [prompt], cfg=cfg, max_new_tokens=30).tokens[0]
    # A saved int8 checkpoint serves the same ids, loaded onto the same mesh as it is.
    from llama.convert import convert

    convert("orbax-to-orbax", ckpt, str(tmp_path / "int8"), quantize="int8", progress=False)
    G.main([a if a != ckpt else str(tmp_path / "int8") for a in base] + ["--mesh", "data=1,fsdp=1,tensor=8"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[0])["ids"] == q
    G.main(base + ["--cache-dtype", "int8"])
    c8 = json.loads(capsys.readouterr().out.strip().splitlines()[0])["ids"]
    assert c8 == G.generate(params, [prompt], cfg=cfg, max_new_tokens=30, cache_dtype="int8").tokens[0]


def test_chat_streams_the_same_ids_as_generate_and_the_repl_runs(tmp_path):
    import io

    from llama import chat
    from llama.checkpoint import save_model
    from llama.tokenizer import encode_dialog, load_tokenizer

    tok_path = require_shared("assets", "llama3_tokenizer", "tokenizer.model")
    tok = load_tokenizer(tok_path)
    cfg = TINY.replace(vocab_size=128256, dim=32, tie_embeddings=True, bos_id=128000,
                       eos_ids=(128001, 128008, 128009))
    params = M.init_params(cfg, jax.random.key(9))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    s = SamplingConfig(temperature=1.0, top_p=0.95)
    pieces = []
    out = chat.reply(params, cfg, tok, messages, sampling=s, seed=4, max_new_tokens=12, write=pieces.append)
    ref = G.generate(params, [encode_dialog(tok, messages)], cfg=cfg, max_new_tokens=12, sampling=s, seed=4,
                     stop_ids=tok.stop_ids).tokens[0]
    assert out["ids"] == ref
    assert "".join(pieces) == out["content"] == tok.decode([t for t in ref if t not in tok.stop_ids])

    ckpt = save_model(str(tmp_path / "chat"), cfg, params)
    stdout = io.StringIO()
    chat.main(["--checkpoint", ckpt, "--tokenizer", str(tok_path), "--max-new-tokens", "5", "--temperature", "0"],
              stdin=io.StringIO("Hi there\n/reset\nAgain\n/exit\n"), stdout=stdout)
    assert stdout.getvalue().count(">>> ") == 4


def test_cpu_mesh_splits_the_heads_over_one_device_per_core(monkeypatch):
    from llama import host

    monkeypatch.setattr(host, "cpu_cores", lambda: 4)
    # the most devices (up to the cores) that divide KV heads, query heads, FFN and vocabulary: TINY's 2 KV heads
    assert dict(G.cpu_mesh(TINY).shape) == {"data": 1, "fsdp": 1, "tensor": 2, "context": 1}
    assert G.cpu_mesh(TINY.replace(n_kv_heads=4, n_heads=8, ffn_dim=192)).shape["tensor"] == 4
    assert G.cpu_mesh(TINY.replace(ffn_dim=190)).shape["tensor"] == 2
    assert G.cpu_mesh(TINY.replace(n_kv_heads=1, n_heads=3, head_dim=16)) is None  # nothing divides: one device
    assert G.cpu_mesh(TINY, devices=jax.devices()[:1]) is None
    monkeypatch.setattr(host, "cpu_cores", lambda: 1)
    assert G.cpu_mesh(TINY) is None


def test_cli_splits_the_cpu_for_a_long_prompt_and_generates_the_same_ids(tmp_path, capsys, monkeypatch):
    """`--mesh auto` (the default): a prompt of CPU_SPLIT_TOKENS+ tokens runs tensor parallel over one CPU device
    per core (`cpu_mesh`), a shorter one on one device; the ids equal one device's (float32, greedy: the split
    changes only the order of the partial sums' addition, ~1e-7 relative)."""
    from llama import host
    from llama.checkpoint import save_model
    from llama.tokenizer import load_tokenizer

    monkeypatch.setattr(host, "cpu_cores", lambda: 2)  # the tests see 8 simulated devices whatever the machine
    cfg = TINY.replace(vocab_size=512, max_seq_len=G.CPU_SPLIT_TOKENS + 128)
    params = M.init_params(cfg, jax.random.key(3))
    ckpt = save_model(str(tmp_path / "tiny"), cfg, params)
    tok_path = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    tok = load_tokenizer(tok_path)
    long_text = "the cat sat. " * 690  # 6 tokens each
    n = len(tok.encode(long_text, bos=True))
    assert G.CPU_SPLIT_TOKENS <= n <= cfg.max_seq_len - 16, n
    for text, mesh_arg, split in [(long_text, [], True), ("Once upon a time", [], False),
                                  (long_text, ["--mesh", "one"], False)]:
        report = tmp_path / f"report-{split}-{len(mesh_arg)}"
        G.main(["--checkpoint", ckpt, "--tokenizer", tok_path, "--prompt", text, "--temperature", "0",
                "--max-new-tokens", "8", "--json-ids", "--report", str(report), *mesh_arg])
        ids = json.loads(capsys.readouterr().out.strip().splitlines()[0])["ids"]
        mesh = json.loads((report / "manifest.json").read_text())["mesh"]
        assert (mesh is not None and mesh["shape"]["tensor"] == 2) == split, mesh
        assert ids == G.generate(params, [tok.encode(text, bos=True)], cfg=cfg, max_new_tokens=8).tokens[0]
