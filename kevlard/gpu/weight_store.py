"""The host weight store: the model's weights, loaded once into one shared-memory file.

The daemon reads the safetensors checkpoint tensor by tensor into
`/dev/shm/kevlard-<daemon pid>-<tag>-weights`, cast to the serving dtype, each tensor at a
64-byte-aligned offset, in checkpoint order (embeddings, layer 0, layer 1, ..., norm, lm_head) so
that a stage's bytes are contiguous. A worker maps the file with `attach_stage` and gets its
stage's tensors without a disk read: on CPU they ARE the shared pages (no copy); on CUDA the
mapping is pinned with cudaHostRegister and copied to the device. Any worker can therefore host
any stage at any time (rehost) while the others keep serving.

A plain file in /dev/shm, not multiprocessing.shared_memory, whose resource tracker unlinks
segments behind our back. `cleanup_stale_segments` removes files left by daemons that died.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kevlard.model_source import ModelSource, pid_alive, tensor_files

SHM_DIR = "/dev/shm"
ALIGNMENT = 64
_SEGMENT_RE = re.compile(r"^kevlard-(\d+)-.*$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_untagged = itertools.count()


@dataclass(frozen=True)
class TensorEntry:
    name: str  # the checkpoint's name, e.g. model.layers.3.self_attn.q_proj.weight
    offset: int  # bytes from the start of the file, a multiple of ALIGNMENT
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name without "torch.", e.g. "float32"

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * _torch_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class StageHandle:
    """What a worker needs to map one stage; picklable."""

    path: str
    total_bytes: int  # the whole file; entry offsets are absolute
    entries: tuple[TensorEntry, ...]
    # CPU: the stage's linear layers packed for oneDNN, in a second file (gpu/packed.py); their
    # plain weights are then not in `entries`
    packed_path: str = ""
    packed_bytes: int = 0
    packed: tuple = ()  # gpu.packed.PackedEntry


class HostWeightStore:
    """Owns the shared-memory file; only the process that created it may close it."""

    def __init__(self, path: Path, buffer: torch.Tensor, entries: dict[str, TensorEntry], source: ModelSource,
                 packed_path: Path | None = None, packed: tuple = ()):
        self._path = path
        self._buffer: torch.Tensor | None = buffer  # [nbytes] uint8, MAP_SHARED over the file
        self._entries = entries
        self._source = source
        self._packed_path = packed_path
        self._packed = packed

    @classmethod
    def create(cls, source: ModelSource, dtype: str, tag: str = "", shm_dir: str = SHM_DIR,
               packed_cache: Path | None | bool = False, log=lambda msg: None) -> "HostWeightStore":
        """Read `source`'s safetensors tensor by tensor into a new shared-memory file.

        `packed_cache` (CPU, float32): a directory, or None for no cache, to keep the linear layers
        packed for oneDNN in a second shared file (gpu/packed.py) instead of plain; False: all plain."""
        from safetensors import safe_open

        if dtype not in _DTYPES:
            raise ValueError(f"model.dtype: must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        files = source.tensor_files()
        names = _store_order(files, source.spec.num_layers, source.spec.tie_word_embeddings)
        units = []
        if packed_cache is not False:
            from kevlard.gpu import packed

            units = packed.linear_units(files, source.spec.num_layers, source.spec.tie_word_embeddings)
            in_packed = {n for _, parts in units for n in parts} - {"model.embed_tokens.weight"}
            names = [n for n in names if n not in in_packed]
        entries, offset = {}, 0
        for name in names:
            with safe_open(str(files[name]), framework="pt") as handle:
                sl = handle.get_slice(name)
                shape, raw_dtype = tuple(sl.get_shape()), sl.get_dtype()
            stored = dtype if raw_dtype in ("F32", "F16", "BF16", "F64") else _SAFETENSORS_DTYPES[raw_dtype]
            entries[name] = TensorEntry(name, offset, shape, stored)
            offset = _aligned(offset + entries[name].nbytes)
        total = max(offset, ALIGNMENT)

        path = Path(shm_dir) / f"kevlard-{os.getpid()}-{tag or next(_untagged)}-weights"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                # Reserve the pages now: a full tmpfs then fails here with ENOSPC instead of
                # SIGBUS-killing the daemon halfway through the copy.
                os.posix_fallocate(fd, 0, total)
            except OSError as error:
                raise MemoryError(
                    f"cannot reserve {total / 2**20:.0f} MiB in {shm_dir} for the weights: {error}"
                ) from error
        finally:
            os.close(fd)
        try:
            buffer = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
            by_file: dict[Path, list[str]] = {}
            for name in names:
                by_file.setdefault(files[name], []).append(name)
            for file, file_names in by_file.items():
                with safe_open(str(file), framework="pt") as handle:
                    for name in file_names:
                        _view(buffer, entries[name]).copy_(handle.get_tensor(name))
            packed_path, packed_entries = None, ()
            if units:
                packed_path = path.with_name(path.name.removesuffix("-weights") + "-packed")
                try:
                    packed_entries = packed.build(packed_path, files, source.spec.num_layers,
                                                  source.spec.tie_word_embeddings, _DTYPES[dtype], packed_cache,
                                                  sorted(set(files.values())), log)
                except BaseException:
                    packed_path.unlink(missing_ok=True)
                    raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return cls(path, buffer, entries, source, packed_path, packed_entries)

    def stage_handle(self, first_layer: int, last_layer: int, is_first: bool, is_last: bool) -> StageHandle:
        """Layers [first_layer, last_layer); the first stage adds the embeddings, the last the
        final norm and the output projection (the embeddings themselves when tied)."""
        num_layers = self._source.spec.num_layers
        if not 0 <= first_layer < last_layer <= num_layers:
            raise ValueError(f"stage layers [{first_layer}, {last_layer}) outside [0, {num_layers})")
        if self._buffer is None:
            raise ValueError(f"weight store {self._path} is closed")
        names = ["model.embed_tokens.weight"] if is_first else []
        prefixes = tuple(f"model.layers.{i}." for i in range(first_layer, last_layer))
        names += [name for name in self._entries if name.startswith(prefixes)]
        if is_last:
            names.append("model.norm.weight")
            head = "model.embed_tokens.weight" if self._source.spec.tie_word_embeddings else "lm_head.weight"
            if head not in names:
                names.append(head)
        names = [name for name in names if name in self._entries]  # a packed store keeps linears in its other file
        packed = ()
        if self._packed_path is not None:
            from kevlard.gpu.packed import stage_keys

            keys = set(stage_keys(first_layer, last_layer, is_last))
            packed = tuple(e for e in self._packed if e.key in keys)
        return StageHandle(str(self._path), self.nbytes, tuple(self._entries[name] for name in names),
                           str(self._packed_path or ""), self.packed_bytes, packed)

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor (a view of the shared file), for checks and the daemon's own use."""
        if self._buffer is None:
            raise ValueError(f"weight store {self._path} is closed")
        return _view(self._buffer, self._entries[name])

    @property
    def path(self) -> Path:
        return self._path

    @property
    def nbytes(self) -> int:
        return self._buffer.numel() if self._buffer is not None else 0

    @property
    def packed_bytes(self) -> int:
        try:
            return self._packed_path.stat().st_size if self._packed_path is not None else 0
        except FileNotFoundError:
            return 0

    @property
    def entries(self) -> dict[str, TensorEntry]:
        return dict(self._entries)

    def close(self) -> None:
        """Unmap and unlink the files; workers that mapped them keep their pages until they unmap."""
        self._buffer = None  # the mapping goes with the last tensor that views it
        self._path.unlink(missing_ok=True)
        if self._packed_path is not None:
            self._packed_path.unlink(missing_ok=True)

    def __enter__(self) -> "HostWeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach_stage(handle: StageHandle, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Map a stage in a worker. On CPU the tensors view the shared pages (no read, no copy; do
    not write to them). On CUDA the stage's bytes are pinned and copied to `device`."""
    buffer = torch.from_file(handle.path, shared=True, size=handle.total_bytes, dtype=torch.uint8)
    host = {entry.name: _view(buffer, entry) for entry in handle.entries}
    if not device.startswith("cuda"):
        return host
    start = min(entry.offset for entry in handle.entries) // 4096 * 4096
    end = max(entry.offset + entry.nbytes for entry in handle.entries)
    pointer, size = buffer.data_ptr() + start, end - start
    cudart = torch.cuda.cudart()
    registered = int(cudart.cudaHostRegister(pointer, size, 0)) == 0  # pageable copy if it fails
    try:
        on_device = {name: tensor.to(device, non_blocking=registered) for name, tensor in host.items()}
        torch.cuda.synchronize(device)
    finally:
        if registered:
            cudart.cudaHostUnregister(pointer)
    return on_device


def drop_mapped_pages(weights: dict[str, torch.Tensor]) -> None:
    """Unmap the pages a worker touched in the shared weights (madvise MADV_DONTNEED: on a shared
    mapping they stay in shared memory and fault back in on the next use). A CPU stage that packed
    its weights into its own layout reads only norms, biases and embedding rows from here later;
    fewer mapped pages make a killed worker's exit, and so its detection, faster."""
    import ctypes
    import mmap

    if not weights:
        return
    storage = next(iter(weights.values())).untyped_storage()
    if storage.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    size = storage.data_ptr() + storage.nbytes() - start
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), mmap.MADV_DONTNEED)


def cleanup_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove `kevlard-<pid>-*` files (and directories) whose daemon is gone; returns the names removed."""
    removed = []
    for entry in sorted(os.listdir(shm_dir)):
        match = _SEGMENT_RE.match(entry)
        if match and not pid_alive(int(match.group(1))):
            path = os.path.join(shm_dir, entry)
            try:
                if os.path.isdir(path):  # kevlard-<pid>-links: its links' rendezvous files
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(entry)
            except FileNotFoundError:
                pass  # another daemon cleaned it first
    return removed


def _store_order(files: dict, num_layers: int, tied: bool) -> list[str]:
    """The tensors a stage can ask for, embeddings first and layers in order."""
    def layer_of(name: str) -> int:
        return int(name.split(".")[2])

    layers = sorted(
        (name for name in files if name.startswith("model.layers.") and layer_of(name) < num_layers),
        key=lambda name: (layer_of(name), _FUSED_RANK.get(name.split(".", 3)[3], 99), name),
    )
    names = ["model.embed_tokens.weight", *layers, "model.norm.weight"]
    if not tied:
        names.append("lm_head.weight")
    missing = [name for name in names if name not in files]
    if missing:
        raise ValueError(f"checkpoint lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return names


# q, k, v (and gate, up) side by side, so a stage can use them as one fused matrix without a copy
_FUSED_RANK = {f"{proj}.{kind}": i for i, (kind, proj) in enumerate(
    (kind, proj) for kind in ("weight", "bias")
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))}

_SAFETENSORS_DTYPES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    return buffer[entry.offset : entry.offset + entry.nbytes].view(_torch_dtype(entry.dtype)).view(entry.shape)


def load_stage_from_disk(weights_dir: str, first_layer: int, last_layer: int, is_first: bool, is_last: bool,
                         dtype: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A stage's tensors read from the safetensors files themselves: what a restart does in the
    `recovery = "restart"` baseline, where nothing survives in host memory."""
    from safetensors import safe_open

    files = tensor_files(Path(weights_dir))
    prefixes = tuple(f"model.layers.{i}." for i in range(first_layer, last_layer))
    names = [n for n in files if n.startswith(prefixes)]
    if is_first:
        names.append("model.embed_tokens.weight")
    if is_last:
        names.append("model.norm.weight")
        names.append("lm_head.weight" if "lm_head.weight" in files else "model.embed_tokens.weight")
    # q/k/v and gate/up side by side, as in the host store, so the stage can fuse them without a copy
    names = sorted(set(names), key=lambda n: (_FUSED_RANK.get(n.split(".", 3)[-1], 99), n))
    out: dict[str, torch.Tensor] = {}
    target = _torch_dtype(dtype)
    for name in names:
        with safe_open(str(files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        out[name] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
    if is_last and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
