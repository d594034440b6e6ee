"""The paged KV cache of one stage: one allocation per worker, sliced per layer and block."""
from __future__ import annotations

import math
import mmap
import os

import torch


def attention_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache and attention run one precision above the model's float32: chunked prefill and
    token-by-token decoding then give bitwise-equal float32 results once rounded back (measured on
    SmolLM2: all 120 rows of 30 layers), so a request recomputed after a failover continues exactly
    as it would have. Half-precision models keep float32."""
    return torch.float64 if model_dtype == torch.float32 else torch.float32


class KVMemory:
    """Memory for a KV cache, allocated before the cache is: a warm spare allocates its own and
    its replica pool's while it stands by (`PrepareKV`), for the largest stage, so that a rehost
    after a failure does not spend a few tenths of a second of a busy host's CPU faulting pages in
    (measured: 0.05-0.44 s of a rehost's 0.6-1.0 s). A cache with fewer layers takes its prefix."""

    def __init__(self, numel: int, dtype: torch.dtype, device: str | torch.device = "cpu", shared: bool = False):
        self.dtype = dtype
        self.numel = numel
        self.shm_fd: int | None = None
        # Its pages are allocated here, while the stage is hosted (or the spare stands by): left to
        # be first touched by the steps and the replica receiver while serving, their page faults
        # cost 10 % of throughput and a third more p99 latency with replication on (measured,
        # kevlard bench --replication on,off). On CPU the kernel hands them over zeroed, in huge
        # pages where it can.
        if shared and torch.device(device).type == "cpu":
            self.shm_fd = os.memfd_create("kevlard-kv", os.MFD_CLOEXEC)
            os.ftruncate(self.shm_fd, numel * dtype.itemsize)
            # not zeroed here: `allocate_shared_pages` allocates them without mapping them into
            # this process (untouched pages of a memfd read as zeros)
            self.flat = torch.from_file(f"/proc/self/fd/{self.shm_fd}", shared=True, size=numel, dtype=dtype)
        elif torch.device(device).type == "cpu":
            self.flat = _zeroed_private(numel, dtype)
        else:
            self.flat = torch.zeros(numel, dtype=dtype, device=device)

    def fits(self, numel: int, dtype: torch.dtype, device: str | torch.device, shared: bool) -> bool:
        device = torch.device(device)  # a virtual CPU device ("cpu:3") is the one CPU: tensors say "cpu"
        same_device = self.flat.device.type == device.type and (device.type == "cpu" or self.flat.device == device)
        return numel <= self.numel and dtype == self.dtype and same_device and shared == (self.shm_fd is not None)

    def allocate_shared_pages(self) -> None:
        if self.shm_fd is not None:
            try:
                os.posix_fallocate(self.shm_fd, 0, self.numel * self.dtype.itemsize)
            except OSError:
                pass  # out of memory now: the pages come when first written, or not at all

    def close(self) -> None:
        if self.shm_fd is not None:
            os.close(self.shm_fd)
            self.shm_fd = None


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu", shared: bool = False,
                 memory: KVMemory | None = None):
        """`shared` (CPU only): the memory is an anonymous shared file (memfd) that another process
        of the same user can map through `share_info()`: a replica pool its source writes straight into.
        `memory`: allocated beforehand (it must fit); this cache owns it from now on."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [2, L, num_blocks * block_size, kvh, hd]: one tensor, so a block of every layer is one slice.
        shape = (2, num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        numel = math.prod(shape)
        if memory is None or not memory.fits(numel, dtype, device, shared):
            memory = KVMemory(numel, dtype, device, shared)
        self.memory = memory
        self.shm_fd = memory.shm_fd
        self.data = memory.flat[:numel].view(shape)

    def allocate_shared_pages(self) -> None:
        """Allocate a shared pool's pages now (contents untouched), without mapping them here: the
        source that writes into the pool maps them, this worker reads them only after a failover.
        Left to the source's first writes, or to a background thread after hosting, the allocation
        ran while serving: replication's p99 overhead went from ~5 % to 13 % (make bench)."""
        self.memory.allocate_shared_pages()

    def share_info(self) -> tuple[int, int, int]:
        """(pid, fd, number of elements) to map this cache from another process; fd -1 if not shared.
        The file may be longer (memory prepared for a larger stage): the cache is its start."""
        return (os.getpid(), self.shm_fd, self.data.numel()) if self.shm_fd is not None else (0, -1, 0)

    def close(self) -> None:
        """Release the shared file's descriptor: the memory goes once no process maps it any more."""
        self.memory.close()
        self.shm_fd = None

    def slots(self, block_table: tuple[int, ...], start: int, end: int) -> torch.Tensor:
        """Flat slot index of positions [start, end) of a sequence with this block table."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.data.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.data[0, layer].index_copy_(0, slots, k.to(self.data.dtype))  # k: [T, kvh, hd]
        self.data[1, layer].index_copy_(0, slots, v.to(self.data.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[0, layer].index_select(0, slots), self.data[1, layer].index_select(0, slots)

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Every layer's K and V at `slots`: [2, L, n, kvh, hd], for replication and hand-back."""
        return self.data.index_select(2, slots)

    def scatter(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        self.data.index_copy_(2, slots, values.to(device=self.data.device, dtype=self.data.dtype))

    def block_slots(self, block_ids: tuple[int, ...] | list[int]) -> torch.Tensor:
        blocks = torch.tensor(list(block_ids), dtype=torch.long)
        return (blocks[:, None] * self.block_size + torch.arange(self.block_size)).reshape(-1).to(self.data.device)

    @property
    def slot_shape(self) -> tuple[int, ...]:
        """Shape of the KV of n slots, without n: (2, L, kvh, hd)."""
        d = self.data.shape
        return (d[0], d[1], d[3], d[4])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _zeroed_private(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """numel zeros in private memory whose pages are allocated now, as huge pages where the kernel
    allows it (Linux madvise; 4 workers at once: 0.03-0.46 s for 250 MB each, torch.zeros 0.1-0.6 s)."""
    nbytes = max(1, numel * dtype.itemsize)
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError):
        return torch.zeros(numel, dtype=dtype)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    data = torch.frombuffer(m, dtype=dtype, count=numel)  # keeps the mapping alive
    if not _populate(data.data_ptr(), nbytes):
        data.zero_()  # already zeros: writing them allocates the pages
    return data


def _populate(address: int, nbytes: int) -> bool:
    """Fault every page of a private mapping in now (Linux 5.14+: MADV_POPULATE_WRITE), through
    ctypes, which lets go of the interpreter lock meanwhile: `mmap.madvise` holds it, and a spare
    allocating its KV at a low priority on a busy host then held its heartbeat thread off past the
    heartbeat timeout (seen: fenced as hung)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(address, nbytes, getattr(mmap, "MADV_POPULATE_WRITE", 23)) == 0
    except (OSError, AttributeError):
        return False


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype_size: int) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_size


def map_shared(pid: int, fd: int, numel: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Another process's shared KV cache (`KVCache.share_info`), or None when it cannot be mapped
    (gone, not shared, or not the size expected)."""
    if fd < 0 or numel != math.prod(shape):
        return None
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if os.stat(path).st_size < numel * dtype.itemsize:  # (longer: prepared for a larger stage)
            return None
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    except (OSError, RuntimeError):
        return None
