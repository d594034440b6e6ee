"""One pipeline stage's batched forward: our own Llama/Qwen2 decoder layers over a paged KV cache.

Batch invariance: every row's result must not depend on which other rows share the batch, so
that a greedy answer is the same whatever else is in flight (and after a failover regroups the
batches). Linear layers therefore run on fixed tiles of TILE rows (padded), norms and activations
are row-wise, and attention runs per request.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kevlard.gpu.kv_cache import KVCache

TILE = 16  # rows per tile for torch.mm (MKL on CPU, cuBLAS)
# A decoder layer's linear units and the checkpoint projections fused (stacked by rows) into each:
# the stage runs them, and gpu/packed.py packs them, under these keys
LAYER_LINEARS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("o", ("self_attn.o_proj",)),
                 ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                 ("down", ("mlp.down_proj",)))
PACKED_TILE = 8  # rows per tile for oneDNN on packed weights (bitwise invariant at 8, tests/gpu)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) with the rows padded to a multiple of TILE, so each row's result is
    batch-invariant: a GEMM's row result depends on the row count's tiling, and a fixed multiple
    of TILE keeps the reduction identical (checked bitwise in tests/gpu/test_stage.py)."""
    rows = x.shape[0]  # x: [M, K], weight: [N, K]
    padded = -(-rows // TILE) * TILE
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    out = torch.mm(x, weight.t())  # [M16, N]
    if bias is not None:
        out += bias
    return out[:rows]


def _onednn_packs(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear:
    """x @ weight.T (+ bias) on fixed tiles of rows, like `tiled_linear`.

    On CPU the weight is reordered once into oneDNN's blocked layout (a private copy, made when
    the stage is hosted): at decode batch sizes oneDNN on packed weights is 2-2.5x faster than
    MKL's sgemm on the row-major ones (16 rows x 40 weights of 3072x576, one thread: 16.8 vs
    42.2 ms), and a row's result is just as independent of the rows around it (tests/gpu)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None):
        """`packed`: the weight already packed (gpu/packed.py), then `weight` is not needed."""
        self.bias = bias
        if packed is None and _onednn_packs(weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.packed = packed
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return tiled_linear(x, self.weight, self.bias)
        rows = x.shape[0]
        padded = -(-rows // PACKED_TILE) * PACKED_TILE
        if padded != rows:
            x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return out[:rows]


def fuse_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack matrices (or vectors) along dim 0; a view when they already lie back to back in
    memory (the host weight store lays q/k/v and gate/up out that way), else a copy."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    shape = (rows, *first.shape[1:])
    expected = first.data_ptr()
    contiguous = True
    for p in parts:
        if not p.is_contiguous() or p.data_ptr() != expected or p.dtype != first.dtype:
            contiguous = False
            break
        expected += p.numel() * p.element_size()
    if contiguous and first.storage_offset() * first.element_size() + (expected - first.data_ptr()) \
            <= first.untyped_storage().nbytes():
        return torch.as_strided(first, shape, first.stride())
    return torch.cat(parts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class ChunkView:
    """Where one request's chunk sits in the flat batch, and where its KV lives."""
    offset: int  # first row in the batch
    num_tokens: int
    start: int  # position of the first token
    slots_new: torch.Tensor  # [num_tokens] cache slots written by this chunk
    slots_all: torch.Tensor  # [start + num_tokens] cache slots attended to


class StageModel:
    """Layers [first_layer, last_layer) of the model, plus the embedding and/or head at the ends."""

    def __init__(self, weights: dict[str, torch.Tensor], spec, first_layer: int, last_layer: int,
                 is_first: bool, is_last: bool, kv: KVCache, device: torch.device | str = "cpu",
                 packed: dict[str, torch.Tensor] | None = None):
        """`packed`: the linear layers already packed for oneDNN, by key (gpu/packed.stage_keys);
        their plain weights are then absent from `weights`."""
        self.w = weights
        self.spec = spec
        self.layers = range(first_layer, last_layer)
        self.is_first = is_first
        self.is_last = is_last
        self.kv = kv
        self.device = torch.device(device)
        self.dtype = next(iter(weights.values())).dtype
        self.inv_freq = torch.tensor(spec.rope_inv_freq, dtype=torch.float32, device=self.device)
        self.lm_head: Linear | None = None
        self.linears: dict[str, Linear] = {}
        packed = packed or {}

        def linear(key: str, names: list[str], bias_names: list[str]) -> Linear:
            biases = [weights.get(n) for n in bias_names]
            bias = fuse_rows(biases) if biases and all(b is not None for b in biases) else None
            if key in packed:
                return Linear(None, bias, packed=packed[key])
            return Linear(fuse_rows([weights[n] for n in names]), bias)

        for layer in self.layers:
            p = f"model.layers.{layer}."
            for key, parts in LAYER_LINEARS:
                self.linears[p + key] = linear(p + key, [p + n + ".weight" for n in parts],
                                               [p + n + ".bias" for n in parts])
        if is_last:
            head = "lm_head.weight" if "lm_head.weight" in weights or "head" in packed else "model.embed_tokens.weight"
            self.lm_head = linear("head", [head], [])

    # ---------------------------------------------------------------- pieces

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"].index_select(0, token_ids)  # [T, H]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.spec.rope_attention_scaling
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def _attention(self, kv: KVCache, li: int, q: torch.Tensor, chunks: list[ChunkView]) -> torch.Tensor:
        spec = self.spec
        # The KV cache is kept in the attention dtype already (see gpu/kv_cache.py).
        q_all = q.to(kv.data.dtype).transpose(0, 1)  # [H, T, hd]
        outs = []
        for c in chunks:
            k_all, v_all = kv.read(li, c.slots_all)  # [ctx, kvh, hd]
            qc = q_all[:, c.offset:c.offset + c.num_tokens]  # [H, n, hd]
            kc = k_all.transpose(0, 1)
            vc = v_all.transpose(0, 1)
            mask = None
            if c.num_tokens > 1:
                q_pos = torch.arange(c.start, c.start + c.num_tokens, device=q.device)
                k_pos = torch.arange(c.start + c.num_tokens, device=q.device)
                mask = k_pos[None, :] <= q_pos[:, None]  # [n, ctx]
            # float64, rounded back: a prefill chunk and token-by-token decoding reduce in different
            # orders, and the float32 results would differ in their last bits. In float64 the
            # difference is ~2^-52, which rounding to float32 almost always erases, so a request
            # recomputed after a failure gets the same numbers it had before.
            o = F.scaled_dot_product_attention(qc.unsqueeze(0), kc.unsqueeze(0), vc.unsqueeze(0), attn_mask=mask,
                                               enable_gqa=spec.num_kv_heads != spec.num_heads)
            outs.append(o[0])  # [H, n, hd]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.transpose(0, 1).to(q.dtype)  # [T, H, hd]

    def _layer(self, kv: KVCache, layer: int, li: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               chunks: list[ChunkView], slots_new: torch.Tensor) -> torch.Tensor:
        spec, w = self.spec, self.w
        p = f"model.layers.{layer}."
        T = h.shape[0]
        x = rms_norm(h, w[p + "input_layernorm.weight"], spec.rms_norm_eps)
        qkv = self.linears[p + "qkv"](x)
        nq, nkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        q = qkv[:, :nq].reshape(T, spec.num_heads, spec.head_dim)
        k = qkv[:, nq:nq + nkv].reshape(T, spec.num_kv_heads, spec.head_dim)
        v = qkv[:, nq + nkv:].reshape(T, spec.num_kv_heads, spec.head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        kv.write(li, slots_new, k, v)
        attn = self._attention(kv, li, q, chunks).reshape(T, spec.num_heads * spec.head_dim)
        h = h + self.linears[p + "o"](attn)
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], spec.rms_norm_eps)
        gate_up = self.linears[p + "gate_up"](x)
        gate, up = gate_up.split(spec.intermediate_size, dim=1)
        return h + self.linears[p + "down"](F.silu(gate) * up)

    # ---------------------------------------------------------------- the step

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, chunks: list[ChunkView], positions: torch.Tensor,
                kv: KVCache | None = None) -> torch.Tensor:
        """hidden: [T, H] (already embedded on the first stage); returns the stage's output [T, H].
        `kv`: the cache to use, the stage's own by default (a buddy passes its replica pool)."""
        kv = kv or self.kv
        cos, sin = self._rope(positions)
        slots_new = torch.cat([c.slots_new for c in chunks])
        for li, layer in enumerate(self.layers):
            hidden = self._layer(kv, layer, li, hidden, cos, sin, chunks, slots_new)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head for the rows that sample: [S, H] -> [S, V] in float32."""
        x = rms_norm(hidden_rows, self.w["model.norm.weight"], self.spec.rms_norm_eps)
        return self.lm_head(x).to(torch.float32)
