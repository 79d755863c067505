"""The two foreign tensor containers that checkpoints arrive in, read and written without torch: safetensors
(Hugging Face) and the torch.save zip (Meta's `consolidated.NN.pth`). Each tensor is read on its own, when it is
asked for, so a conversion holds one parameter at a time; a corrupt file's error names the file and the tensor.
What the tensors mean (names, layouts) is llama/convert.py's business.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Iterator

import ml_dtypes
import numpy as np


class TensorFileError(ValueError):
    """A safetensors or torch zip file that cannot be read (the message names the file and the tensor)."""


# ------------------------------------------------------------------------------------------ safetensors
# Format (facts sheet 4.3): u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian data. Read and written
# here directly so that each tensor is read on its own (np.fromfile at its offset) and a file is written
# as the tensors arrive, and so that a corrupt file's error names the file and the tensor.
ST_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
             "F64": np.dtype("<f8"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "I16": np.dtype("<i2"),
             "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "BOOL": np.dtype("?")}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one safetensors tensor's bytes are."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in bytes


def read_safetensors_header(path: str) -> dict[str, TensorEntry]:
    """name -> where its bytes are; validates the header against the file size before anything is read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise TensorFileError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or "
                                   "not a safetensors file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise TensorFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TensorFileError(f"{path}: corrupt safetensors header ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = ST_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{path}: tensor {name!r} has a corrupt header entry {info!r}") from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise TensorFileError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} do not fit shape {shape} "
                               f"of {info['dtype']}")
        if 8 + n + end > size:
            raise TensorFileError(f"{path}: tensor {name!r} ends at byte {8 + n + end}, past the end of the file "
                               f"({size} bytes): the file is truncated")
        out[name] = TensorEntry(path, dtype, shape, 8 + n + begin)
    return out


def read_entry(e: TensorEntry) -> np.ndarray:
    """The tensor's bytes, read now (np.fromfile at its offset)."""
    count = int(np.prod(e.shape))
    x = np.fromfile(e.file, dtype=e.dtype, count=count, offset=e.offset)
    return x.reshape(e.shape)


def write_safetensors_shards(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
                             plan: list[tuple[str, tuple[int, ...], np.dtype]], shard_bytes: int,
                             progress=None) -> list[str]:
    """Writes `tensors` (arriving in `plan` order) into shards of at most `shard_bytes` each (a tensor
    larger than that gets a shard of its own) as they arrive, plus the index when there are several.
    HF names: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = int(np.prod(entry[1])) * entry[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    tensors = iter(tensors)
    for fn, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fn
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(directory, fn), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape, dtype in shard:
                got_name, x = next(tensors)
                if got_name != name or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
                    raise TensorFileError(f"internal: expected {name} {shape} {dtype}, got {got_name} {x.shape} {x.dtype}")
                # Little-endian hosts only (x86, ARM), as torch assumes. f.write, unlike ndarray.tofile, reports a
                # full disk as ENOSPC; the uint8 view is not a copy.
                f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
                if progress:
                    progress(name, x)
        total += offset
    if n > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


# ------------------------------------------------------------------------------ Meta consolidated.NN.pth
# A torch.save file is a zip: <archive>/data.pkl pickles the state dict, whose tensors refer (pickle
# persistent ids) to raw storages stored as <archive>/data/<key>. An unpickler that allows only these
# few classes reads it without torch, and without executing anything else from the file.
_TORCH_STORAGES = {"BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "HalfStorage": np.dtype("<f2"),
                   "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "LongStorage": np.dtype("<i8"),
                   "IntStorage": np.dtype("<i4"), "ByteStorage": np.dtype("u1"), "CharStorage": np.dtype("i1"),
                   "BoolStorage": np.dtype("?")}


@dataclass(frozen=True)
class _Storage:
    zip_path: str
    member: str
    dtype: np.dtype
    numel: int  # elements, from the persistent id
    nbytes: int | None  # the zip member's size (None: absent); LazyTensor.check compares the two


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a torch zip; its bytes are read by `load`. `name` is its state-dict key (for messages)."""

    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    name: str = "?"

    @property
    def dtype(self):
        return self.storage.dtype

    def check(self) -> None:
        """The view lies inside its storage: offset, shape and strides are non-negative integers, the last
        element it reaches is inside the storage's numel, and it has no more elements than the storage (no
        overlapping views, which a checkpoint never needs). Checked before any view is made: `as_strided`
        trusts its arguments and would otherwise read whatever memory follows the buffer."""
        where = f"{self.storage.zip_path}: tensor {self.name!r}"
        st = self.storage
        if st.nbytes is None:
            raise TensorFileError(f"{where}: its storage {st.member} is named in the pickle but absent from the "
                                  "zip: the file is corrupt or truncated")
        if st.nbytes != st.numel * st.dtype.itemsize:
            raise TensorFileError(f"{where}: its storage {st.member} holds {st.nbytes} bytes, but the pickle says "
                                  f"{st.numel} elements of {st.dtype} ({st.numel * st.dtype.itemsize} bytes): the "
                                  "file is corrupt or truncated")
        if not (_is_count(self.offset) and all(map(_is_count, self.shape)) and all(map(_is_count, self.stride))
                and len(self.shape) == len(self.stride)):
            raise TensorFileError(f"{where}: storage offset {self.offset!r}, shape {self.shape!r} and strides "
                                  f"{self.stride!r} must be non-negative integers of matching rank")
        n = int(np.prod(self.shape, dtype=object))
        if n == 0:
            return
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        if last >= self.storage.numel or n > self.storage.numel:
            raise TensorFileError(f"{where}: shape {self.shape} with strides {self.stride} at offset {self.offset} "
                                  f"reaches element {last} of a storage of {self.storage.numel} elements "
                                  f"({self.storage.member}): the file is corrupt or truncated")

    def load(self, zf: zipfile.ZipFile) -> np.ndarray:
        self.check()
        where = f"{self.storage.zip_path}: tensor {self.name!r}"
        try:
            data = zf.read(self.storage.member)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise TensorFileError(f"{where}: cannot read its storage {self.storage.member} ({e})") from None
        if len(data) != self.storage.numel * self.storage.dtype.itemsize:
            raise TensorFileError(f"{where}: storage {self.storage.member} holds {len(data)} bytes, but its "
                                  f"header says {self.storage.numel} x {self.storage.dtype} "
                                  f"({self.storage.numel * self.storage.dtype.itemsize} bytes)")
        buf = np.frombuffer(data, self.storage.dtype)
        item = buf.itemsize
        view = np.lib.stride_tricks.as_strided(buf[self.offset:], self.shape, [s * item for s in self.stride])
        return np.array(view)  # own the memory (the storage buffer is released)


def _rebuild_tensor(storage, offset, shape, stride, *_):
    if not isinstance(storage, _Storage) or not isinstance(shape, tuple) or not isinstance(stride, tuple):
        raise TensorFileError(f"_rebuild_tensor_v2 called with ({type(storage).__name__}, {type(shape).__name__}, "
                              f"{type(stride).__name__}); expected (storage, offset, shape, stride)")
    return LazyTensor(storage, offset, shape, stride)


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, zip_path: str, prefix: str):
        super().__init__(f)
        self.zf, self.zip_path, self.prefix = zf, zip_path, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in ("bfloat16", "float16", "float32"):
            return name
        raise TensorFileError(f"{self.zip_path}: refusing to unpickle {module}.{name}: a Meta checkpoint holds "
                           "only a dict of tensors")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel); torch >= 2 writes typed legacy storage classes.
        # The numel is checked against the zip member's size by LazyTensor.check, which names the tensor.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TensorFileError(f"{self.zip_path}: unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        if not isinstance(dtype, np.dtype):
            raise TensorFileError(f"{self.zip_path}: unsupported storage type {dtype!r}")
        if not isinstance(key, str) or not _is_count(numel):
            raise TensorFileError(f"{self.zip_path}: corrupt storage id {pid!r} (expected a key and an element count)")
        member = f"{self.prefix}/data/{key}"
        try:
            nbytes = self.zf.getinfo(member).file_size
        except KeyError:
            nbytes = None
        return _Storage(self.zip_path, member, dtype, numel, nbytes)


def read_torch_zip(path: str) -> tuple[zipfile.ZipFile, dict[str, LazyTensor]]:
    """The state dict of a torch.save zip file, lazily: tensor bytes are read on `.load`. Every tensor's
    extent is checked against its storage here, before anything is read."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise TensorFileError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError):
        raise TensorFileError(f"{path}: not a torch zip checkpoint (legacy non-zip torch.save files are not "
                           "supported; re-save with torch >= 1.6)") from None
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise TensorFileError(f"{path}: expected one */data.pkl in the zip, found {pkl}")
    try:
        with zf.open(pkl[0]) as f:
            state = _TorchUnpickler(f, zf, path, pkl[0][: -len("/data.pkl")]).load()
    except TensorFileError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, RecursionError) as e:
        raise TensorFileError(f"{path}: {pkl[0]} is not a readable state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise TensorFileError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
    state = {k: dataclasses.replace(v, name=str(k)) if isinstance(v, LazyTensor) else v for k, v in state.items()}
    for v in state.values():
        if isinstance(v, LazyTensor):
            v.check()
    return zf, state


__all__ = ["TensorFileError", "ST_DTYPES", "ST_NAMES", "TensorEntry", "read_safetensors_header", "read_entry",
           "write_safetensors_shards", "LazyTensor", "read_torch_zip"]
