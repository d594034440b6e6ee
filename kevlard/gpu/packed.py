"""CPU linear weights packed once for oneDNN, shared by every worker, cached on disk.

A CPU stage runs its linear layers on weights reordered into oneDNN's blocked layout (2-2.5x
faster at decode sizes, gpu/stage.py). Reordering the whole SmolLM2 takes 1.6 s of one core, and
each worker used to do it for its own stage, at every start and on every rehost, into private
memory. Here the daemon does it once per checkpoint, keeps the packed bytes in a cache file next to
the GGUF conversion, and copies them at start into one shared-memory file
(`/dev/shm/kevlard-<pid>-<tag>-packed`) that workers map: a worker wraps the bytes as oneDNN
tensors without a copy (`attach_packed`), so hosting a stage no longer packs anything.

oneDNN tensors are opaque to Python; their bytes and layout descriptor come from
`torch.ops.mkldnn.data_ptr` / `_get_mkldnn_serialized_md`, and a tensor is made over existing
memory with the C function torch's AOT Inductor uses for the same purpose
(`aoti_torch_create_tensor_from_blob_v2`). Where any of that is missing, `supported()` is false and
workers pack their own weights as before. The cache is keyed by the checkpoint files, torch's
version and the CPU's flags, and checked against a fresh packing of each shape before use.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kevlard.gpu.stage import LAYER_LINEARS

FORMAT = "kevlard-packed-v1"
PAGE = 4096


@dataclass(frozen=True)
class PackedEntry:
    key: str  # "model.layers.3.qkv", ".o", ".gate_up", ".down", or "head"
    offset: int  # bytes from the start of the file, a multiple of PAGE
    nbytes: int
    shape: tuple[int, int]  # the plain weight's [out, in]
    md: bytes  # oneDNN's serialized memory descriptor


def linear_units(names, num_layers: int, tied: bool) -> list[tuple[str, list[str]]]:
    """Each linear layer a stage runs, as (key, the checkpoint weights fused into it, in order)."""
    units = [(f"model.layers.{i}.{key}", [f"model.layers.{i}.{part}.weight" for part in parts])
             for i in range(num_layers) for key, parts in LAYER_LINEARS]
    units.append(("head", ["model.embed_tokens.weight" if tied else "lm_head.weight"]))
    missing = [n for _, parts in units for n in parts if n not in names]
    if missing:
        raise ValueError(f"checkpoint lacks {', '.join(missing[:5])}")
    return units


def stage_keys(first_layer: int, last_layer: int, is_last: bool) -> list[str]:
    keys = [f"model.layers.{i}.{key}" for i in range(first_layer, last_layer) for key, _ in LAYER_LINEARS]
    return keys + (["head"] if is_last else [])


# ------------------------------------------------------------------ oneDNN tensors over raw bytes

_shim = None


def _load_shim():
    global _shim
    if _shim is None:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        for name in ("aoti_torch_dtype_float32", "aoti_torch_device_type_cpu", "aoti_torch_layout__mkldnn"):
            getattr(lib, name).restype = ctypes.c_int32
        fn = lib.aoti_torch_create_tensor_from_blob_v2
        fn.restype = ctypes.c_int32
        i64p = ctypes.POINTER(ctypes.c_int64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, i64p, i64p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                       ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p,
                       ctypes.c_int64]
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype = ctypes.py_object
        capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        _shim = (lib, fn, capsule)
    return _shim


def supported() -> bool:
    """Whether this torch can pack, export and re-wrap oneDNN linear weights (checked for real)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16) / 100
        packed = pack(w)
        buf = torch.empty(torch.ops.mkldnn._nbytes(packed), dtype=torch.uint8)
        ctypes.memmove(buf.data_ptr(), torch.ops.mkldnn.data_ptr(packed), buf.numel())
        again = wrap(buf.data_ptr(), tuple(w.shape), layout_md(packed))
        x = torch.ones(8, 16)
        ok = torch.equal(_linear(x, packed), _linear(x, again))
        del again
        return ok
    except Exception:
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def layout_md(packed: torch.Tensor) -> bytes:
    return bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).tolist())


def wrap(address: int, shape: tuple[int, int], md: bytes) -> torch.Tensor:
    """A oneDNN tensor over memory at `address` that the caller keeps alive (no copy, no ownership)."""
    lib, fn, capsule = _load_shim()
    sizes = (ctypes.c_int64 * 2)(*shape)
    strides = (ctypes.c_int64 * 2)(shape[1], 1)
    handle = ctypes.c_void_p()
    rc = fn(address, 2, sizes, strides, 0, lib.aoti_torch_dtype_float32(), lib.aoti_torch_device_type_cpu(), 0,
            ctypes.byref(handle), lib.aoti_torch_layout__mkldnn(), md, len(md))
    if rc != 0 or not handle.value:
        raise RuntimeError("torch could not wrap packed weights")
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule(handle.value, None, None))


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# ------------------------------------------------------------------ building the shared file

def build(path: Path, tensor_files: dict, num_layers: int, tied: bool, dtype: torch.dtype, cache_dir: Path | None,
          key_files: list[Path], log: Callable[[str], object] = lambda m: None) -> tuple[PackedEntry, ...]:
    """Write every linear layer's packed bytes to the new file `path` (from the cache when it is
    valid, else by packing the checkpoint's weights and then filling the cache)."""
    digest = _digest(key_files, dtype)
    entries = _from_cache(cache_dir, digest, path) if cache_dir is not None else None
    if entries is not None:
        log(f"packed weights: {len(entries)} linear layers from the cache {cache_dir}")
        return entries
    units = linear_units(tensor_files, num_layers, tied)
    entries = _pack_into(path, tensor_files, units, dtype)
    if cache_dir is not None:
        try:
            _write_cache(cache_dir, digest, path, entries)
            log(f"packed weights: {len(entries)} linear layers packed, cached in {cache_dir}")
        except OSError as error:
            log(f"packed weights: {len(entries)} linear layers packed; not cached ({error})")
    return entries


def _pack_into(path: Path, tensor_files: dict, units, dtype: torch.dtype) -> tuple[PackedEntry, ...]:
    from safetensors import safe_open

    def packed_unit(unit):
        key, names = unit
        parts = []
        for name in names:
            with safe_open(str(tensor_files[name]), framework="pt") as handle:
                parts.append(handle.get_tensor(name).to(dtype))
        weight = parts[0] if len(parts) == 1 else torch.cat(parts)
        return key, tuple(weight.shape), pack(weight)

    entries, offset = [], 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with ThreadPoolExecutor(2) as pool:  # the reorders release the GIL
            for start in range(0, len(units), 8):
                for key, shape, packed in pool.map(packed_unit, units[start:start + 8]):
                    nbytes = torch.ops.mkldnn._nbytes(packed)
                    view = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
                    written = os.pwrite(fd, memoryview(view), offset)
                    if written != nbytes:
                        raise OSError(f"short write to {path}")
                    entries.append(PackedEntry(key, offset, nbytes, shape, layout_md(packed)))
                    offset = -(-(offset + nbytes) // PAGE) * PAGE
        os.ftruncate(fd, max(offset, PAGE))
    finally:
        os.close(fd)
    return tuple(entries)


def _digest(key_files: list[Path], dtype: torch.dtype) -> str:
    h = hashlib.sha256(f"{FORMAT}\0{torch.__version__}\0{dtype}\0{_cpu_flags()}".encode())
    for f in sorted(key_files):
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _from_cache(cache_dir: Path, digest: str, path: Path) -> tuple[PackedEntry, ...] | None:
    try:
        index = json.loads((cache_dir / "index.json").read_text())
        if index.get("digest") != digest:
            return None
        entries = tuple(PackedEntry(e["key"], e["offset"], e["nbytes"], tuple(e["shape"]), bytes.fromhex(e["md"]))
                        for e in index["entries"])
        # the layout oneDNN picks now for each shape must be the one cached
        fresh = {}
        for shape in {e.shape for e in entries}:
            p = pack(torch.zeros(shape))
            fresh[shape] = (layout_md(p), torch.ops.mkldnn._nbytes(p))
        if any(fresh[e.shape] != (e.md, e.nbytes) for e in entries):
            return None
        data = cache_dir / "linears.bin"
        if data.stat().st_size != index["size"]:
            return None
        shutil.copyfile(data, path)  # the kernel copies; the file is new (its name has our pid)
        os.chmod(path, 0o600)  # the weights are the owner's, as the weight store's segment is
        return entries
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache_dir: Path, digest: str, path: Path, entries: tuple[PackedEntry, ...]) -> None:
    from kevlard.model_source import pid_alive

    cache_dir.mkdir(parents=True, exist_ok=True)
    for tmp in cache_dir.glob("*.tmp-*"):  # left by a daemon killed while it wrote the cache
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
    tmp = cache_dir / f"linears.bin.tmp-{os.getpid()}"
    try:
        shutil.copyfile(path, tmp)
        os.replace(tmp, cache_dir / "linears.bin")
    finally:
        tmp.unlink(missing_ok=True)
    index = {"format": FORMAT, "digest": digest, "size": path.stat().st_size,
             "entries": [{"key": e.key, "offset": e.offset, "nbytes": e.nbytes, "shape": list(e.shape),
                          "md": e.md.hex()} for e in entries]}
    tmp_index = cache_dir / f"index.json.tmp-{os.getpid()}"
    tmp_index.write_text(json.dumps(index))
    os.replace(tmp_index, cache_dir / "index.json")


def attach_packed(path: str, size: int, entries, keys: list[str]) -> dict[str, torch.Tensor]:
    """Map the packed file in a worker and wrap the stage's linear layers (`keys`) without a copy.
    Each tensor keeps the mapping alive through an attribute."""
    buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    by_key = {e.key: e for e in entries}
    out = {}
    for key in keys:
        e = by_key[key]
        t = wrap(buffer.data_ptr() + e.offset, e.shape, e.md)
        t.kevlard_mapping = buffer  # the oneDNN tensor does not own its bytes
        out[key] = t
    return out
