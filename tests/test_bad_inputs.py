"""Bad and hostile inputs to every command line (issue 19): each ends with exit status 2 and one `error:` line
that names the file, flag or field, and leaves every pre-existing byte as it was (the tree under tmp_path is
hashed before and after). The CLIs run in-process (main(argv)); only the read-only / full-disk cases run in a
subprocess, inside a private mount namespace. The hostile Meta files are in test_bad_inputs_meta.py.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from input_pipeline import prepare
from llama import checkpoint, cli, compare, config, convert, generate, chat, model, sweep, train
from llama.config import TINY, ConfigError, ModelConfig
from sharding import plan
from tests.bad_inputs_util import run_cli, tree_digest
from tests.conftest import require_shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model checkpoint and the same weights as a Hugging Face directory, made once."""
    d = tmp_path_factory.mktemp("assets")
    checkpoint.save_model(str(d / "ckpt"), TINY, model.init_params(TINY, jax.random.key(0)))
    assert convert.main(["orbax-to-hf", str(d / "ckpt"), str(d / "hf")]) == 0
    return d


@pytest.fixture
def work(tmp_path, assets):
    """tmp_path with copies of the assets (tests may aim commands at them)."""
    shutil.copytree(assets / "ckpt", tmp_path / "ckpt")
    shutil.copytree(assets / "hf", tmp_path / "hf")
    return tmp_path


def refused(main, argv, capsys, root, *names: str) -> str:
    """Runs main(argv): exit 2, one stderr line starting `error:` containing every name, tree under root
    unchanged. Returns the message."""
    before = tree_digest(root)
    code, _, err = run_cli(main, [str(a) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert tree_digest(root) == before, "pre-existing data changed"
    return lines[0]


def fake_run_dir(path):
    """A training run's directory as llama.train leaves it (manifest, metrics, a checkpoint step)."""
    os.makedirs(path / "checkpoints" / "10" / "params")
    (path / "manifest.json").write_text(json.dumps({"extra": {"tool": "llama.train", "seeds": [0]}}))
    (path / "metrics.jsonl").write_text('{"step": 10, "loss": 3.2}\n')
    (path / "checkpoints" / "10" / "params" / "data").write_bytes(b"\1\2\3")
    return path


# ------------------------------------------------------------------------------------------ llama.convert
def test_convert_refuses_any_overlap_of_source_and_destination(work, capsys):
    """`--overwrite` with DST equal to SRC, a parent of it, or inside it deleted the source before."""
    for dst in (work / "ckpt", work, work / "ckpt" / "sub"):
        refused(convert.main, ["orbax-to-hf", work / "ckpt", dst, "--overwrite"], capsys, work, "DST", dst)
    refused(convert.main, ["hf-to-orbax", work / "hf", work / "hf", "--overwrite"], capsys, work, "same path")


def test_convert_overwrite_replaces_only_a_checkpoint(work, capsys):
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("keep me")
    refused(convert.main, ["orbax-to-hf", work / "ckpt", work / "mine", "--overwrite"], capsys, work,
            work / "mine", "not a model checkpoint")
    (work / "file").write_text("x")
    refused(convert.main, ["orbax-to-hf", work / "ckpt", work / "file", "--overwrite"], capsys, work, work / "file")
    assert convert.main(["orbax-to-hf", str(work / "ckpt"), str(work / "hf"), "--overwrite"]) == 0  # replaced


@pytest.mark.parametrize("size", ["-5GB", "0", "nan", "inf", "5XB", ""])
def test_convert_shard_size_is_a_positive_size(work, capsys, size):
    refused(convert.main, ["orbax-to-hf", work / "ckpt", work / "out", "--shard-size", size], capsys, work,
            "--shard-size")


def test_convert_cleans_its_own_orphaned_staging_only(work, capsys):
    """A killed conversion leaves `.DST.tmp-HOST-PID-*`; the next run removes it (its PID is gone), keeps a
    live process's and anything of another name, and restores a DST moved aside between the two renames."""
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = work / f".out.tmp-{host}-{dead.pid}-abcdefgh"
    live = work / f".out.tmp-{host}-{os.getpid()}-livelive"
    other = work / ".out.tmp-not-ours"
    legacy = work / ".out.tmp-k2j3h4g5"  # before staging names carried a pid: removed after an hour
    for d in (orphan, live, other, legacy):
        d.mkdir()
        (d / "part").write_bytes(b"x" * 10)
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    code, _, err = run_cli(convert.main, ["orbax-to-hf", str(work / "ckpt"), str(work / "out")], capsys)
    assert code == 0, err
    assert not orphan.exists() and not legacy.exists() and live.exists() and other.exists()
    assert f"removed {orphan}" in err
    # A kill between "move the old DST aside" and "rename the new one in": the old one comes back.
    shutil.move(str(work / "out"), str(work / "aside"))
    old = work / f".out.old-{host}-{dead.pid}-qwertyui"
    old.mkdir()
    shutil.move(str(work / "aside"), str(old / "x"))
    from llama import manifest

    assert manifest.clean_stale_staging(str(work / "out")) == [f"restored {work / 'out'} from {old}", f"removed {old}"]
    assert (work / "out" / "config.json").is_file() and not old.exists()


def test_convert_config_errors_name_the_file_and_field(work, capsys):
    cfg = json.loads((work / "hf" / "config.json").read_text())
    (work / "hf" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "false"}))
    msg = refused(convert.main, ["hf-to-orbax", work / "hf", work / "o"], capsys, work, "config.json",
                  "tie_word_embeddings")
    assert "JSON bool" in msg and "set tie_word_embeddings=false" not in msg
    (work / "ckpt" / "config.json").write_text('{"vocab_size": 256, "dim"')  # truncated
    refused(convert.main, ["orbax-to-hf", work / "ckpt", work / "o"], capsys, work,
            work / "ckpt" / "config.json", "not valid JSON")


# ------------------------------------------------------------------------------------------ llama.compare
def test_compare_run_replaces_only_a_report(work, capsys):
    """`run --out P` deleted whatever was at P: a training run, the checkpoint itself, any directory, a file."""
    run = fake_run_dir(work / "run")
    (work / "plain.txt").write_text("data")
    (work / "dir").mkdir()
    (work / "dir" / "x").write_text("y")
    base = ["run", "--checkpoint", work / "ckpt", "--seq-len", "16", "--gen-len", "0", "--train-steps", "0"]
    for out in (run, work / "plain.txt", work / "dir"):
        refused(compare.main, [*base, "--out", out], capsys, work, "--out", out)
    refused(compare.main, [*base, "--out", work / "ckpt"], capsys, work, "--out", "same path")
    refused(compare.main, ["run", "--checkpoint", run, "--out", run], capsys, work, "--out", run)
    with pytest.raises(ValueError, match="not a comparison report"):  # the library refuses it too
        compare.write_report(str(run), {}, {})


@pytest.mark.parametrize("flag, value", [("--seq-len", "1"), ("--batch", "0"), ("--train-lr", "nan"),
                                         ("--gen-len", "-3"), ("--top-k", "x")])
def test_compare_probe_numbers_are_ranges(work, capsys, flag, value):
    refused(compare.main, ["run", "--init", "tiny", "--out", work / "r", flag, value], capsys, work, flag)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("reports")
    args = ["--seq-len", "16", "--gen-len", "0", "--train-steps", "0", "--batch", "1"]  # one small compile
    assert compare.main(["run", "--init", "tiny", "--out", str(d / "a"), *args]) == 0
    return d


def test_compare_diff_of_different_checkpoints_warns_and_names_both(reports, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(reports / "a", a)
    shutil.copytree(reports / "a", b)
    rb = json.loads((b / "report.json").read_text())
    (b / "report.json").write_text(json.dumps({**rb, "checkpoint": "/elsewhere/other-ckpt"}))
    code, out, err = run_cli(compare.main, ["diff", str(a), str(b), "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert "warning: A and B probed different checkpoints" in err and "/elsewhere/other-ckpt" in err
    md = (tmp_path / "d" / "diff.md").read_text()
    dj = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert "/elsewhere/other-ckpt" in md and rb["checkpoint"] in md and "Warning" in md
    assert dj["checkpoint_b"] == "/elsewhere/other-ckpt" and dj["checkpoint_a"] == rb["checkpoint"]
    # The same checkpoint: no warning.
    code, _, err = run_cli(compare.main, ["diff", str(a), str(a / ".." / "a"), "--out", str(tmp_path / "e")], capsys)
    assert code == 0 and "warning" not in err


def test_compare_diff_of_damaged_reports_names_the_file(reports, tmp_path, capsys):
    a = tmp_path / "a"
    shutil.copytree(reports / "a", a)
    good = tmp_path / "good"
    shutil.copytree(reports / "a", good)
    text = (a / "report.json").read_text()
    (a / "report.json").write_text(text[: len(text) // 2])
    refused(compare.main, ["diff", a, good, "--out", tmp_path / "d"], capsys, tmp_path, a / "report.json",
            "not valid JSON")
    (a / "report.json").write_text(text)
    (a / "probe.npz").write_bytes((a / "probe.npz").read_bytes()[:100])
    refused(compare.main, ["diff", a, good, "--out", tmp_path / "d"], capsys, tmp_path, a / "probe.npz")
    refused(compare.main, ["diff", good, good, "--out", good], capsys, tmp_path, "--out", good)


def test_checkpoint_with_a_params_file_deleted_is_one_error(work, capsys):
    """Was a 133-line Orbax traceback."""
    data = [os.path.join(r, f) for r, _, fs in os.walk(work / "ckpt" / "params") for f in fs
            if os.sep + "d" + os.sep in os.path.join(r, f)]
    biggest = max(data, key=os.path.getsize)
    os.remove(biggest)
    refused(compare.main, ["run", "--checkpoint", work / "ckpt", "--out", work / "r", "--seq-len", "16",
                           "--gen-len", "0", "--train-steps", "0"], capsys, work, work / "ckpt" / "params",
            "incomplete or damaged")
    os.remove(work / "ckpt" / "params" / "_METADATA")
    refused(compare.main, ["run", "--checkpoint", work / "ckpt", "--out", work / "r"], capsys, work,
            work / "ckpt" / "params", "incomplete or damaged")


# ----------------------------------------------------------------------------------- llama.generate, chat
@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
                                         ("--top-k", "-1"), ("--max-new-tokens", "0"), ("--seed", "-1")])
def test_generate_and_chat_numbers_are_ranges(work, capsys, flag, value):
    """`--temperature nan` emitted token 0 forever."""
    for main in (generate.main, chat.main):
        extra = ["--prompt", "x"] if main is generate.main else []
        refused(main, ["--checkpoint", work / "ckpt", *extra, flag, value], capsys, work, flag)


def test_generate_report_never_replaces_another_commands_manifest(work, capsys):
    run = fake_run_dir(work / "run")
    base = ["--checkpoint", work / "ckpt", "--prompt", "x", "--max-new-tokens", "1"]
    refused(generate.main, [*base, "--report", run], capsys, work, "--report", run)
    refused(generate.main, [*base, "--report", work / "ckpt"], capsys, work, "--report", "same path")
    refused(generate.main, [*base, "--report", work / "ckpt" / "report"], capsys, work, "--report", "inside")


def test_tokenizer_larger_than_the_model_vocab_is_refused_at_load(work, capsys):
    """A 512-piece tokenizer on a 256-row embedding produced garbage with exit 0."""
    tok = require_shared("assets", "llama2c_stories260K", "tok512.model")
    for main in (generate.main, chat.main):
        extra = ["--prompt", "x"] if main is generate.main else []
        refused(main, ["--checkpoint", work / "ckpt", "--tokenizer", tok, *extra], capsys, work,
                "--checkpoint", str(tok), "512 ids", "vocab_size is 256")


def test_prompt_file_that_is_not_text(work, capsys):
    (work / "prompts.bin").write_bytes(b"\xff\xfe\x00\x81binary")
    refused(generate.main, ["--checkpoint", work / "ckpt", "--prompt-file", work / "prompts.bin"], capsys, work,
            "--prompt-file", work / "prompts.bin", "UTF-8")
    refused(generate.main, ["--checkpoint", work / "ckpt", "--prompt-file", work / "none.txt"], capsys, work,
            work / "none.txt")


def test_embedding_of_an_out_of_range_id_is_nan_not_a_clamped_row():
    """Under jit nothing can raise on data: an id outside [0, V) (or negative) gathers NaN, which reaches the
    logits and the trainer's finite-loss check, instead of silently reusing row V-1 (or wrapping)."""
    cfg = TINY
    params = model.init_params(cfg, jax.random.key(0))
    tokens = np.array([[1, 5, cfg.vocab_size, -1, 7]], np.int32)
    x = np.asarray(jax.jit(model.embed, static_argnums=2)(params, tokens, cfg))
    assert np.isfinite(x[0, [0, 1, 4]]).all() and np.isnan(x[0, [2, 3]]).all()
    np.testing.assert_array_equal(x[0, 1], np.asarray(params["embed"])[5])  # in range: the row itself
    from llama import quant

    q = quant.quantize_params(params) if cfg.tie_embeddings else {**params, "embed": quant.quantize(params["embed"], (1,))}
    xq = np.asarray(model.embed(q, tokens, cfg))
    assert np.isfinite(xq[0, [0, 1, 4]]).all() and np.isnan(xq[0, [2, 3]]).all()


# -------------------------------------------------------------------------------------------- llama.train
def _train(argv):
    return cli.command(train.main)(argv)  # as `python -m llama.train` runs it


def test_train_out_must_be_a_run_directory(work, capsys):
    """Training into a model checkpoint replaced its manifest and paired its weights with a new tokenizer."""
    exp = os.path.join(REPO, "experiments", "cpu_small.py")
    refused(_train, ["--config", exp, "--out", work / "ckpt"], capsys, work, "--out", work / "ckpt",
            "model checkpoint")
    (work / "dir").mkdir()
    (work / "dir" / "thesis.tex").write_text("years of work")
    refused(_train, ["--config", exp, "--out", work / "dir"], capsys, work, "--out", work / "dir")


@pytest.mark.parametrize("setting, names", [
    (["--set", "model.eos_ids=5"], ["model.eos_ids", "expected a list"]),
    (["--set", "model.tie_embeddings=maybe"], ["model.tie_embeddings"]),
    (["--set", "mesh.fsdp=3"], ["fsdp"]),
    (["--data", "/nonexistent/*.txt"], ["/nonexistent/*.txt"]),
    (["--set", "data.tokenizer=/nonexistent/tok.model"], ["/nonexistent/tok.model"]),
    (["--set", "data.format=csv", "data.paths=x"], ["csv"]),
    (["--set", "data.format=prepared", "data.tokenizer=llama3", "data.paths=PREPARED"], ["index.json", "not valid JSON"]),
])
def test_train_validates_before_creating_out(work, capsys, setting, names):
    """A failed run left a half-made --out (tokenizer, corpus, manifest, empty metrics) before."""
    exp = os.path.join(REPO, "experiments", "cpu_small.py")
    (work / "prepared").mkdir()
    (work / "prepared" / "index.json").write_text('{"format": "llama-jax-prepared-tokens", "vers')  # truncated
    setting = [a.replace("PREPARED", str(work / "prepared")) for a in setting]
    refused(_train, ["--config", exp, "--out", work / "new", *setting], capsys, work, *names)
    assert not (work / "new").exists()


# -------------------------------------------------------------------------------------------- llama.sweep
def test_sweep_out_must_be_a_sweep_directory(work, capsys):
    base = ["--base", "experiments/ablation_remat_lr.py", "--grid", "model.remat=none,full", "--mode", "print"]
    for out in (work / "ckpt", fake_run_dir(work / "run")):
        refused(sweep.main, [*base, "--out", out], capsys, work, "--out", out)


# ---------------------------------------------------------------------------------------- sharding.plan
@pytest.mark.parametrize("args, names", [
    (["--batch", "-1"], ["--batch"]), (["--seq-len", "0"], ["--seq-len"]), (["--mfu", "1.5"], ["--mfu"]),
    (["--mfu", "-0.3"], ["--mfu"]), (["--mfu", "nan"], ["--mfu"]), (["--device-memory", "-5GB"], ["--device-memory"]),
    (["--device-memory", "nanGB"], ["--device-memory"]), (["--tokens", "inf"], ["--tokens"]),
    (["--devices", "0"], ["--devices"]), (["--preset", "llama9"], ["llama9", "known presets"]),
    (["--mesh", "data=x"], ["data=x"]), (["--mesh", "dp=2"], ["dp=2"]),
])
def test_plan_numbers_presets_and_meshes(tmp_path, capsys, args, names):
    """`--batch -3` printed "total -3040 GB: fits"; an unknown preset was a traceback."""
    argv = ["--preset", "llama3.1-8b", "--mesh", "data=1,fsdp=8,tensor=1", "--mode", "training", *args]
    refused(plan.main, argv, capsys, tmp_path, *names)


# ---------------------------------------------------------------------------------- input_pipeline.prepare
@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"document {i} " * 20)
    return d


def test_prepare_refuses_overlap_and_foreign_destinations(corpus, tmp_path, capsys):
    tok = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    glob_ = str(corpus / "*.txt")
    refused(prepare.main, [corpus, glob_, "--tokenizer", tok, "--overwrite"], capsys, tmp_path, "OUT_DIR", "contains")
    refused(prepare.main, [tmp_path, glob_, "--tokenizer", tok, "--overwrite"], capsys, tmp_path, "OUT_DIR")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a").write_text("b")
    refused(prepare.main, [tmp_path / "mine", glob_, "--tokenizer", tok, "--overwrite"], capsys, tmp_path,
            tmp_path / "mine", "prepared corpus")
    refused(prepare.main, [tmp_path / "p", glob_, "--tokenizer", tok, "--shards", "0"], capsys, tmp_path, "--shards")
    refused(prepare.main, [tmp_path / "p", glob_, "--tokenizer", corpus / "0.txt"], capsys, tmp_path,
            corpus / "0.txt")


def test_prepare_cleans_an_orphaned_visible_staging_dir(corpus, tmp_path, capsys):
    """prepare used to stage in a visible `OUT.tmp-*` sibling, left behind by a kill."""
    tok = str(require_shared("assets", "llama2c_stories260K", "tok512.model"))
    orphan = tmp_path / "p.tmp-a1b2c3d4"
    orphan.mkdir()
    (orphan / "tokens-00000-of-00001.array_record").write_bytes(b"half")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    code, _, err = run_cli(prepare.main, [str(tmp_path / "p"), str(corpus / "*.txt"), "--tokenizer", tok], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["p", "texts"]
    assert prepare.main([str(tmp_path / "p"), str(corpus / "*.txt"), "--tokenizer", tok, "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------------ config
def test_config_values_are_type_checked_when_built(tmp_path):
    with pytest.raises(ConfigError, match=r"ModelConfig.eos_ids=5: expected a non-empty list"):
        TINY.replace(eos_ids=5)
    with pytest.raises(ConfigError, match=r"ModelConfig.tie_embeddings='false' \(str\): expected true or false"):
        ModelConfig.from_dict({**TINY.to_dict(), "tie_embeddings": "false"})
    with pytest.raises(ConfigError, match=r"ModelConfig.dim='64'"):
        TINY.replace(dim="64")
    with pytest.raises(ConfigError, match=r"norm_eps=nan"):
        TINY.replace(norm_eps=float("nan"))
    path = tmp_path / "x.json"
    path.write_text(json.dumps({**config.to_hf_config(TINY), "tie_word_embeddings": "false"}))
    with pytest.raises(ConfigError, match=r"x.json: tie_word_embeddings='false': expected true or false"):
        config.from_hf_config(str(path))
    with pytest.raises(ConfigError, match="unknown model preset 'llama9'"):
        config.preset("llama9")


# ------------------------------------------------------------------------ read-only and full destinations
def _in_namespace(mount: str, script: str) -> subprocess.CompletedProcess:
    """`mount && script` (sh) in a private mount namespace (root only): mounts there vanish with the process.
    Skips, saying why, where the namespace or the mount is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"no private mount namespace here (unshare -m: {probe.stderr.decode().strip()}); needs root")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"{{ {mount}; }} || exit 77; {script}"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=300)
    if r.returncode == 77:
        pytest.skip(f"mount not allowed in a private namespace here: {r.stderr.strip()[:200]}")
    return r


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_read_only_destination(work):
    (work / "ro").mkdir()
    (work / "ro" / "old").write_text("kept")
    before = tree_digest(work)
    r = _in_namespace(f"mount --bind {work / 'ro'} {work / 'ro'} && mount -o remount,bind,ro {work / 'ro'}",
                      f"{sys.executable} -m llama.convert orbax-to-hf {work / 'ckpt'} {work / 'ro' / 'hf'}")
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and str(work / "ro") in lines[0] and "the file system is read-only" in lines[0], r.stderr
    assert tree_digest(work) == before


def test_full_disk(work):
    """A 64 KiB tmpfs: the conversion runs out of space part-way; no staging directory is left."""
    (work / "full").mkdir()
    r = _in_namespace(f"mount -t tmpfs -o size=64k tmpfs {work / 'full'}",
                      f"{sys.executable} -m llama.convert orbax-to-hf {work / 'ckpt'} {work / 'full' / 'hf'}; "
                      f"rc=$?; ls -A {work / 'full'}; exit $rc")
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "no space left on the device" in lines[0] and str(work / "full") in lines[0], r.stderr
    assert r.stdout.strip() == "", f"left behind in the full file system: {r.stdout}"
