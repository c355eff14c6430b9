"""Read and write PyTorch state dicts (`torch.save` zips) and safetensors files without importing torch.

A `torch.save` file (PyTorch ≥ 1.6) is a zip archive whose members are stored uncompressed:

    <prefix>/data.pkl      a pickle of the object; every tensor is `torch._utils._rebuild_tensor_v2(storage,
                           offset, size, stride, requires_grad, hooks)` and every storage a persistent id
                           ('storage', torch.FloatStorage, key, location, numel)
    <prefix>/data/<key>    the raw little-endian bytes of storage <key>
    <prefix>/byteorder     "little"            <prefix>/version   "3"

`read_state_dict` unpickles data.pkl with an unpickler that resolves only the handful of names a state dict
of tensors needs (anything else is refused: a pickle can otherwise run arbitrary code) and returns lazy
`TensorRef`s: nothing is read until asked for, then either as a memory-mapped view (`view()`) or copied
straight from the file into a fresh array (`read()`, one copy, no page-cache mapping kept alive), so a 6 GB
checkpoint can be converted tensor by tensor without holding it twice.

`save_state_dict` writes torch.save's layout: the same protocol-2 pickle (GLOBAL names, memo and persistent
ids as torch's pickler emits them), storages numbered in order, stored members whose data is aligned to 64
bytes with an "FB" zip extra field, `byteorder` and `version` records (newer torch also writes
`.data/serialization_id`, which readers do not need). Only names `torch.load(weights_only=True)` allows appear.
safetensors (`read_safetensors`, `save_safetensors`): an 8-byte header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the data.

(Over 400 lines on purpose: the reader and the writer of two formats side by side, so that each stays the other's
inverse (tests round-trip every dtype through both).)
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# torch storage class name → element dtype (the storages a float state dict can hold, and common integer ones).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "HalfStorage": np.dtype(np.float16), "BFloat16Storage": BFLOAT16,
    "DoubleStorage": np.dtype(np.float64), "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BFLOAT16,
                      "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                      "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
                      "BOOL": np.dtype(np.bool_)}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
ALIGNMENT = 64   # torch.save aligns every storage's data to 64 bytes in the file


class FormatError(ValueError):
  """A file that is not a readable state dict (truncated, corrupt, or holding something other than tensors)."""


# Lazy tensors ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Storage:
  """A run of `numel` elements of `dtype` at byte `offset` of `path` (`data` instead for in-memory bytes)."""
  path: str
  offset: int
  numel: int
  dtype: np.dtype
  data: bytes | None = None   # a compressed zip member, decompressed (never the case for torch.save files)


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor in a file, read on demand: `shape`, `dtype`, `view()` (memory-mapped) or `read()` (a copy)."""
  name: str
  storage: Storage
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  storage_offset: int = 0

  @property
  def dtype(self) -> np.dtype:
    return self.storage.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def _extent(self) -> int:
    """Elements of the storage this tensor spans, from its offset."""
    if any(s == 0 for s in self.shape):
      return 0
    return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

  def check(self) -> None:
    if any(s < 0 for s in self.stride) or self.storage_offset < 0:
      raise FormatError(f"tensor {self.name}: negative stride or offset")
    if self.storage_offset + self._extent() > self.storage.numel:
      raise FormatError(f"tensor {self.name}: shape {self.shape} at offset {self.storage_offset} runs past its "
                        f"storage of {self.storage.numel} elements; the file is corrupt")

  def _contiguous(self) -> bool:
    expected = 1
    for n, s in reversed(list(zip(self.shape, self.stride))):
      if n != 1 and s != expected:
        return False
      expected *= n
    return True

  def _span(self, storage_array: np.ndarray) -> np.ndarray:
    item = self.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage_array, shape=self.shape,
                                           strides=tuple(s * item for s in self.stride), writeable=False)

  def view(self) -> np.ndarray:
    """A read-only view, memory-mapped from the file (nothing read until touched)."""
    st = self.storage
    if st.data is not None:
      flat = np.frombuffer(st.data, st.dtype, count=st.numel)
    elif st.numel == 0:
      flat = np.zeros((0,), st.dtype)
    else:
      flat = np.memmap(st.path, dtype=st.dtype, mode="r", offset=st.offset, shape=(st.numel,))
    return self._span(flat[self.storage_offset:])

  def read(self, out: np.ndarray | None = None, rows: slice | None = None) -> np.ndarray:
    """A C-contiguous copy (of `rows` of the leading axis, default all), read from the file with one copy
    (into `out`, C-contiguous and of the result's shape, when given)."""
    st = self.storage
    start, stop, _ = (rows or slice(None)).indices(self.shape[0] if self.shape else 1)
    shape = (stop - start, *self.shape[1:]) if self.shape else ()
    if out is not None and (out.shape != shape or out.dtype != st.dtype or not out.flags.c_contiguous):
      raise ValueError(f"tensor {self.name}: out must be a C-contiguous {st.dtype}{list(shape)}")
    if st.data is not None or not self._contiguous():
      part = self.view()[start:stop] if self.shape else self.view()
      if out is None:
        return np.array(part, copy=True, order="C")
      out[...] = part
      return out
    out = np.empty(shape, st.dtype) if out is None else out
    if out.nbytes == 0:
      return out
    row_elements = math.prod(self.shape[1:]) if self.shape else 1
    with open(st.path, "rb") as f:
      f.seek(st.offset + (self.storage_offset + start * row_elements) * st.dtype.itemsize)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != out.nbytes:
      raise FormatError(f"tensor {self.name}: the file ends after {got} of its {out.nbytes} bytes; it is truncated")
    return out


# Reading torch.save zips ---------------------------------------------------------------------------------
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return TensorRef("", storage, tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Resolves only the names a state dict of tensors needs; storages come from the zip as lazy references."""

  def __init__(self, data: bytes, path: str, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._path, self._archive, self._prefix = path, archive, prefix
    self._storages: dict[str, Storage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise FormatError(f"{self._path}: its pickle refers to {module}.{name}, which a state dict of tensors never "
                      "needs; refusing to load it (only plain tensors in an OrderedDict are read)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise FormatError(f"{self._path}: unexpected persistent id {pid!r} in its pickle")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      self._storages[key] = _zip_storage(self._path, self._archive, f"{self._prefix}data/{key}",
                                         storage_type.dtype, int(numel))
    return self._storages[key]


def _data_offset(path: str, info: zipfile.ZipInfo) -> int:
  """Where a member's bytes start: after its local header, whose extra field may differ from the directory's."""
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise FormatError(f"{path}: member {info.filename} has a broken local header; the file is corrupt")
  name_length, extra_length = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_length + extra_length


def _zip_storage(path: str, archive: zipfile.ZipFile, member: str, dtype: np.dtype, numel: int) -> Storage:
  try:
    info = archive.getinfo(member)
  except KeyError:
    raise FormatError(f"{path}: its pickle names storage {member}, which the zip does not hold; "
                      "the file is corrupt") from None
  if info.file_size < numel * dtype.itemsize:
    raise FormatError(f"{path}: {member} holds {info.file_size} bytes, fewer than its {numel} elements need")
  if info.compress_type != zipfile.ZIP_STORED:   # not written by torch.save; decompress it into memory
    return Storage(path, 0, numel, dtype, archive.read(member))
  offset = _data_offset(path, info)
  if offset + numel * dtype.itemsize > os.path.getsize(path):
    raise FormatError(f"{path}: {member} runs past the end of the file; it is truncated")
  return Storage(path, offset, numel, dtype)


def _pickle_member(path: str, archive: zipfile.ZipFile) -> str:
  names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(names) != 1:
    raise FormatError(f"{path}: a torch.save zip holds exactly one <prefix>/data.pkl; this one holds "
                      f"{len(names)}")
  return names[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, TensorRef]:
  """name → TensorRef of every tensor in a `torch.save` file of a (flat) state dict, in the file's order."""
  path = os.fspath(path)
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, OSError, ValueError) as e:
    with open(path, "rb") as f:
      magic = f.read(2)
    if magic == b"\x80\x02":
      raise FormatError(f"{path}: a legacy (pre-1.6) torch.save file; re-save it with a current torch") from None
    raise FormatError(f"{path}: not a complete torch.save zip ({e}); the file is truncated or corrupt, "
                      "download it again") from None
  with archive:
    member = _pickle_member(path, archive)
    prefix = member[: -len("data.pkl")]
    try:
      data = archive.read(member)
      obj = _StateDictUnpickler(data, path, archive, prefix).load()
    except FormatError:
      raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
      raise FormatError(f"{path}: its data.pkl does not unpickle ({type(e).__name__}: {e}); the file is "
                        "corrupt") from None
  if not isinstance(obj, dict):
    raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
  tensors = {}
  for name, value in obj.items():
    if not isinstance(value, TensorRef):
      raise FormatError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    ref = dataclasses.replace(value, name=name)
    ref.check()
    tensors[name] = ref
  return tensors


# Writing torch.save zips ---------------------------------------------------------------------------------
class _Global:
  """Stands for a torch callable or class in the pickle stream (written as GLOBAL module name)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):   # pickle's save_reduce insists that the reduce function be callable
    raise TypeError("a stand-in for pickling only")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", name) for dtype, name in STORAGE_NAMES.items()}


@dataclasses.dataclass(eq=False)
class _OutStorage:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(eq=False)
class _OutTensor:
  storage: _OutStorage
  shape: tuple[int, ...]


class _StateDictPickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
  dispatch = pickle._Pickler.dispatch.copy()

  def _save_global(self, obj: _Global):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _OutStorage):
      return ("storage", _STORAGE_GLOBALS[obj.dtype], obj.key, "cpu", obj.numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _OutTensor):
      stride = tuple(math.prod(obj.shape[i + 1:]) for i in range(len(obj.shape)))
      return _REBUILD_TENSOR, (obj.storage, 0, obj.shape, stride, False, collections.OrderedDict())
    return NotImplemented


def state_dict_pickle(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  """data.pkl of an OrderedDict of contiguous tensors, storage i for the i-th tensor (what torch.save writes)."""
  state = collections.OrderedDict()
  for i, (name, shape, dtype) in enumerate(tensors):
    dtype = np.dtype(dtype)
    if dtype not in STORAGE_NAMES:
      raise FormatError(f"tensor {name}: dtype {dtype} has no torch storage type")
    state[name] = _OutTensor(_OutStorage(str(i), dtype, math.prod(shape)), tuple(int(s) for s in shape))
  buffer = io.BytesIO()
  _StateDictPickler(buffer, protocol=2).dump(state)
  return buffer.getvalue()


def _aligned_info(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
  """A stored member whose data starts at a multiple of ALIGNMENT, padded with an extra field as torch does."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = size
  zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0   # zipfile then puts a zip64 extra before ours
  start = archive.fp.tell() + 30 + len(name.encode("utf-8")) + zip64
  padding = (-(start + 4)) % ALIGNMENT
  info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding   # header id "FB", as torch's writer
  return info


def _write_member(archive: zipfile.ZipFile, name: str, data) -> None:
  view = memoryview(data).cast("B")
  with archive.open(_aligned_info(archive, name, view.nbytes), "w") as out:
    for start in range(0, view.nbytes, 1 << 26):
      out.write(view[start:start + (1 << 26)])


class LazyArray:
  """A tensor to be written, produced only when its turn comes: `shape`, `dtype` and `produce()`."""

  def __init__(self, shape, dtype, produce):
    self.shape, self.dtype, self.produce = tuple(int(s) for s in shape), np.dtype(dtype), produce


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, np.ndarray | LazyArray], *,
                    prefix: str = "archive") -> None:
  """Write an OrderedDict of tensors as `torch.save` would, so that `torch.load(path)` reads it back.

  Members in torch.save's order: data.pkl, byteorder, data/<key> for the keys sorted as strings, version.
  A `LazyArray` value is produced when its data is written and dropped right after, so a model larger than
  memory can be written one tensor at a time.
  """
  path = os.fspath(path)
  names = list(tensors)
  header = [(name, tuple(tensors[name].shape), np.dtype(tensors[name].dtype)) for name in names]
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
    _write_member(archive, f"{prefix}/data.pkl", state_dict_pickle(header))
    _write_member(archive, f"{prefix}/byteorder", b"little")
    for key in sorted(str(i) for i in range(len(names))):
      name, shape, dtype = header[int(key)]
      value = tensors[name]
      array = np.asarray(value.produce() if isinstance(value, LazyArray) else value)
      if array.shape != shape or array.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise FormatError(f"tensor {name}: produced {array.dtype}{list(array.shape)}, announced {dtype}{list(shape)}")
      array = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
      _write_member(archive, f"{prefix}/data/{key}", array.reshape(-1).view(np.uint8))
      del array, value
    _write_member(archive, f"{prefix}/version", b"3\n")


# safetensors ---------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> dict[str, TensorRef]:
  """name → TensorRef of a .safetensors file, in the header's order of data offsets."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise FormatError(f"{path}: too short for a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise FormatError(f"{path}: its header claims {length} bytes but the file has {size}; it is truncated")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise FormatError(f"{path}: its safetensors header is not JSON ({e})") from None
  header.pop("__metadata__", None)
  base = 8 + length
  tensors = {}
  for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    if entry.get("dtype") not in SAFETENSORS_DTYPES:
      raise FormatError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape = tuple(int(s) for s in entry["shape"])
    begin, end = (int(x) for x in entry["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
      raise FormatError(f"{path}: tensor {name}'s data ({begin}..{end}) does not fit its shape {shape} or the "
                        "file; it is corrupt or truncated")
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    tensors[name] = TensorRef(name, Storage(path, base + begin, math.prod(shape), dtype), shape, stride)
  return tensors


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  header, offset = {}, 0
  arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
  for name, a in arrays.items():
    header[name] = {"dtype": SAFETENSORS_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for a in arrays.values():
      f.write(memoryview(a.reshape(-1).view(np.uint8)))


def read_tensors(path: str | os.PathLike) -> dict[str, TensorRef]:
  """A `.safetensors` file or a `torch.save` file (`.bin`, `.pt`, `.pth`), chosen by its first bytes."""
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic[:2] == b"PK":
    return read_state_dict(path)
  if os.fspath(path).endswith(".safetensors"):
    return read_safetensors(path)
  if magic[:2] == b"\x80\x02":
    raise FormatError(f"{path}: a legacy (pre-1.6) torch.save file; re-save it with a current torch")
  raise FormatError(f"{path}: neither a torch.save zip nor a .safetensors file (it starts with {magic!r}); "
                    "it is truncated or corrupt")
