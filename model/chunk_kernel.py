"""A fused Triton kernel for chunked attention (LSH and local), used for inference on CUDA.

Same contract as `attention.chunked_attention`: every chunk of queries attends to its own chunk and
`before`/`after` neighbours (circular), masked scores are replaced by a constant, the self score by another,
and it returns the output and the log-sum-exp per query. Scores live only in registers (an online softmax
over key tiles), so memory stays linear in the length and no mask tensor exists. Accumulation is in fp32
whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _chunk_attention(
    Q, K, V, POS, VALID, O, LSE,
    stride_z, stride_t, stride_pz, stride_vz, stride_oz, stride_ot,
    count, dim, masked, self_value,
    CHUNK: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SELF_MASK: tl.constexpr,
    HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = (block * BLOCK_M) // CHUNK
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols[None, :] < dim
    q = tl.load(Q + z * stride_z + rows[:, None] * stride_t + cols[None, :], mask=col_ok, other=0.0)
    q_pos = tl.load(POS + z * stride_pz + rows)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for offset in tl.static_range(0, BEFORE + AFTER + 1):
        key_chunk = (chunk + offset - BEFORE + BEFORE * count) % count
        for start in tl.static_range(0, CHUNK, BLOCK_N):
            keys = key_chunk * CHUNK + start + tl.arange(0, BLOCK_N)
            k = tl.load(K + z * stride_z + keys[:, None] * stride_t + cols[None, :], mask=col_ok, other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            k_pos = tl.load(POS + z * stride_pz + keys)
            if CAUSAL:
                scores = tl.where(q_pos[:, None] >= k_pos[None, :], scores, masked)
            if HAS_VALID:
                valid = tl.load(VALID + z * stride_vz + keys)
                scores = tl.where(valid[None, :] != 0, scores, masked)
            if SELF_MASK:
                scores = tl.where(q_pos[:, None] == k_pos[None, :], self_value, scores)
            new_best = tl.maximum(best, tl.max(scores, 1))
            scale = tl.exp(best - new_best)
            probs = tl.exp(scores - new_best[:, None])
            total = total * scale + tl.sum(probs, 1)
            v = tl.load(V + z * stride_z + keys[:, None] * stride_t + cols[None, :], mask=col_ok, other=0.0)
            if IEEE:
                acc = acc * scale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * scale[:, None] + tl.dot(probs.to(v.dtype), v)
            best = new_best
    # exp(best - lse) rather than 1 / total: the reference normalises with exp(score - lse), which for a
    # row whose every score is the masking constant sums instead of averaging (lse rounds to the constant).
    lse = best + tl.log(total)
    out = acc * tl.exp(best - lse)[:, None]
    tl.store(O + z * stride_oz + rows[:, None] * stride_ot + cols[None, :], out.to(O.dtype.element_ty), mask=col_ok)
    tl.store(LSE + z * count * CHUNK + rows, lse)


def supported(queries: Tensor) -> bool:
    """Shapes the kernel handles: chunks a multiple of 16, a head size of at least 16, and on a GPU 16-bit
    inputs (fp32 dots in IEEE precision made ptxas run for minutes on an H200; fp32 takes the torch path)."""
    chunk, dim = queries.shape[-2], queries.shape[-1]
    half = queries.dtype in (torch.float16, torch.bfloat16) or not queries.is_cuda
    return chunk % 16 == 0 and 16 <= dim <= 256 and half


def chunk_attention(queries: Tensor, keys: Tensor, values: Tensor, positions: Tensor, key_valid: Tensor | None, *,
                    before: int, after: int, causal: bool, self_mask: bool, masked: float,
                    self_value: float) -> tuple[Tensor, Tensor]:
    """queries/keys/values (B, H, N, c, d); positions/key_valid (B, H|1, N, c) -> out, lse as in torch."""
    batch, heads, count, chunk, dim = queries.shape
    z = batch * heads
    q = queries.reshape(z, count * chunk, dim).contiguous()
    k = keys.reshape(z, count * chunk, dim).contiguous()
    v = values.reshape(z, count * chunk, dim).contiguous()
    pos = positions.expand(batch, heads, count, chunk).reshape(z, count * chunk).to(torch.int32).contiguous()
    valid = None
    if key_valid is not None:
        valid = key_valid.expand(batch, heads, count, chunk).reshape(z, count * chunk).to(torch.int8).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(z, count * chunk, dtype=torch.float32, device=q.device)
    block = 64 if q.dtype != torch.float32 else 32
    block = min(block, chunk)
    while chunk % block:
        block //= 2
    grid = (count * chunk // block, z)
    _chunk_attention[grid](
        q, k, v, pos, valid if valid is not None else pos, out, lse,
        q.stride(0), q.stride(1), pos.stride(0), valid.stride(0) if valid is not None else 0,
        out.stride(0), out.stride(1), count, dim, masked, self_value,
        CHUNK=chunk, BEFORE=before, AFTER=after, BLOCK_M=block, BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), CAUSAL=causal, SELF_MASK=self_mask,
        HAS_VALID=valid is not None, IEEE=q.dtype == torch.float32,
    )
    return out.view(batch, heads, count, chunk, dim), lse.view(batch, heads, count, chunk)
