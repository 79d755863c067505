"""Hostile Meta `consolidated.NN.pth` files (issue 19, security): the reader must refuse every tensor whose
offset, shape and strides reach outside its storage, every storage whose size disagrees with the pickle, and
every pickle that names anything but tensors, before any byte is viewed; the converter exits 2 naming the
file and the tensor and leaves no staging directory.

The files are made with torch.save and then corrupted: a storage cut short in the zip, or the pickle
rewritten (by a pickler that emits torch's own opcodes) with another numel, offset or stride.
"""

import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llama.convert import TABLE, hf_names, main as convert_main, torch_shape  # noqa: E402
from llama.config import from_meta_params  # noqa: E402
from llama.tensor_files import TensorFileError, read_torch_zip  # noqa: E402
from tests.bad_inputs_util import run_cli, tree_digest  # noqa: E402

PARAMS = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


def write_meta(directory) -> str:
    """A one-shard Meta checkpoint of random bf16 weights (output.weight is (512, 64) bf16, as in the issue)."""
    cfg = from_meta_params(PARAMS)
    rng = np.random.default_rng(0)
    sd = {}
    for t in TABLE:
        for i, _ in enumerate(hf_names(t, cfg)):
            sd[t.meta.format(i)] = torch.from_numpy(rng.standard_normal(torch_shape(t, cfg)).astype(np.float32)
                                                    ).to(torch.bfloat16)
    os.makedirs(directory)
    torch.save(sd, os.path.join(directory, "consolidated.00.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(PARAMS, f)
    return os.path.join(directory, "consolidated.00.pth")


def rewrite_zip(path, replace: dict[str, bytes]):
    """The same zip with some members' bytes replaced (the pickle, or a storage)."""
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, replace.get(info.filename, data))


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel)
        return None


def repickle(path, name: str, *, numel=None, offset=None, shape=None, stride=None):
    """Rewrites data.pkl with one tensor's storage numel / offset / shape / stride changed; the storages keep
    their bytes. Emits the opcodes torch.save does (GLOBAL torch._utils _rebuild_tensor_v2, BINPERSID)."""
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    _, state = read_torch_zip(path)
    out = {}
    for k, t in state.items():
        st = t.storage
        s = _Storage(st.member.rsplit("/", 1)[1], st.numel if (k != name or numel is None) else numel)
        if k == name:
            out[k] = _Tensor(s, t.offset if offset is None else offset, t.shape if shape is None else shape,
                             t.stride if stride is None else stride)
        else:
            out[k] = _Tensor(s, t.offset, t.shape, t.stride)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(out)
    rewrite_zip(path, {pkl: buf.getvalue()})


def storage_member(path, name):
    _, state = read_torch_zip(path)
    return state[name].storage.member


def run_convert(src, dst, capsys):
    code, _, err = run_cli(convert_main, ["meta-to-orbax", str(src), str(dst)], capsys)
    return code, err


def assert_refused(tmp_path, capsys, match: str):
    before = tree_digest(tmp_path)
    code, err = run_convert(tmp_path / "meta", tmp_path / "out", capsys)
    assert code == 2, err
    assert "consolidated.00.pth" in err and "output.weight" in err and match in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert tree_digest(tmp_path) == before  # nothing written: no DST, no staging directory beside it


def test_valid_file_converts(tmp_path, capsys):
    write_meta(tmp_path / "meta")
    code, err = run_convert(tmp_path / "meta", tmp_path / "out", capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["meta", "out"]


def test_storage_cut_to_two_bytes(tmp_path, capsys):
    """The issue's file: output.weight's storage cut to 2 bytes, the pickle still saying (512, 64) bf16."""
    path = write_meta(tmp_path / "meta")
    rewrite_zip(path, {storage_member(path, "output.weight"): b"\0\0"})
    with pytest.raises(TensorFileError, match=r"'output.weight': its storage .* holds 2 bytes, but the pickle "
                                              r"says 32768 elements of bfloat16"):
        read_torch_zip(path)
    assert_refused(tmp_path, capsys, "holds 2 bytes")


def test_storage_and_numel_cut_together(tmp_path, capsys):
    """A consistent storage of 1 element under a (512, 64) tensor: the extent check refuses it."""
    path = write_meta(tmp_path / "meta")
    member = storage_member(path, "output.weight")
    repickle(path, "output.weight", numel=1)
    rewrite_zip(path, {member: b"\0\0"})
    assert_refused(tmp_path, capsys, "storage of 1 elements")


@pytest.mark.parametrize("edit, match", [
    ({"stride": (1 << 40, 1)}, "reaches element"),          # a huge stride (segfaulted the converter before)
    ({"offset": 32768 - 10}, "reaches element"),           # an offset near the end
    ({"offset": -64}, "non-negative"),                     # negative offset
    ({"stride": (-64, 1)}, "non-negative"),                # negative stride
    ({"shape": (1024, 64)}, "reaches element"),            # more rows than stored
    ({"shape": (512, 64, 1)}, "matching rank"),            # rank differs from the strides
    ({"stride": (0, 0), "shape": (1 << 30, 64)}, "reaches element"),  # broadcast view: more elements than stored
])
def test_extent_outside_the_storage(tmp_path, capsys, edit, match):
    path = write_meta(tmp_path / "meta")
    repickle(path, "output.weight", **edit)
    assert_refused(tmp_path, capsys, match)


def _payload(module: str, name: str, arg: str) -> bytes:
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00X" + len(arg).to_bytes(4, "little") \
        + arg.encode() + b"\x85R."


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"), ("subprocess", "check_output"),
                                          ("posix", "system")])
def test_code_execution_payloads_refused(tmp_path, capsys, module, name):
    path = write_meta(tmp_path / "meta")
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    rewrite_zip(path, {pkl: _payload(module, name, f"touch {marker}")})
    with pytest.raises(TensorFileError, match=f"refusing to unpickle {module}.{name}"):
        read_torch_zip(path)
    code, err = run_convert(tmp_path / "meta", tmp_path / "out", capsys)
    assert code == 2 and "refusing to unpickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_pickle(tmp_path, capsys):
    path = write_meta(tmp_path / "meta")
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        data = z.read(pkl)
    rewrite_zip(path, {pkl: data[: len(data) // 2]})
    code, err = run_convert(tmp_path / "meta", tmp_path / "out", capsys)
    assert code == 2 and "consolidated.00.pth" in err and "not a readable state dict" in err, err
