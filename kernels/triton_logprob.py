"""Triton per-chunk kernels for `logprob.chunked_logprobs_and_entropy` (GPU only, imported lazily).

The chunk logits z = hidden @ W_chunk^T stay a cuBLAS matmul (model dtype). These kernels fuse
the elementwise work around it, one program per token row, fp32 in registers:
  forward:  online update of (max, sum exp, sum exp * z, label logit) over the chunk;
  backward: dL/dz for the chunk, written in place over z (no fp32 (N, chunk) temporaries).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _fwd_chunk_kernel(z_ptr, stride_z, labels_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
                      C, v0, temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    label = tl.load(labels_ptr + row) - v0  # chunk-local label; out of [0, C) if elsewhere or ignored
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    t = tl.load(t_ptr + row)
    zy = tl.load(zy_ptr + row)
    for c0 in range(0, C, BLOCK_V):
        offs = c0 + tl.arange(0, BLOCK_V)
        mask = offs < C
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.exp(z - m_new)  # 0 on masked lanes
        alpha = tl.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # no 0 * -inf on masked lanes
        zy += tl.sum(tl.where(mask & (offs == label), z, 0.0), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    tl.store(zy_ptr + row, zy)


@triton.jit
def _bwd_chunk_kernel(z_ptr, stride_z, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
                      C, v0, temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    label = tl.load(labels_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    gl = tl.load(glogp_ptr + row)
    ge = tl.load(gent_ptr + row)
    for c0 in range(0, C, BLOCK_V):
        offs = c0 + tl.arange(0, BLOCK_V)
        mask = offs < C
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) / temperature
        logp = z - lse
        g = -tl.exp(logp) * (gl + ge * (logp + ent))
        g = tl.where(offs == label, g + gl, g)
        tl.store(z_row + offs, (g / temperature).to(z_ptr.dtype.element_ty), mask=mask)


def _block_v(c: int) -> int:
    return min(4096, triton.next_power_of_2(c))


class TritonChunk:
    @staticmethod
    def fwd_chunk(z: Tensor, labels: Tensor, v0: int, temperature: float,
                  m: Tensor, s: Tensor, t: Tensor, zy: Tensor) -> None:
        assert z.stride(1) == 1 and labels.is_contiguous()
        n, c = z.shape
        _fwd_chunk_kernel[(n,)](z, z.stride(0), labels, m, s, t, zy, c, v0, float(temperature),
                                BLOCK_V=_block_v(c), num_warps=8)

    @staticmethod
    def bwd_chunk(z: Tensor, labels: Tensor, v0: int, *, temperature: float, lse: Tensor, ent: Tensor,
                  g_logp: Tensor, g_ent: Tensor) -> Tensor:
        assert z.stride(1) == 1 and labels.is_contiguous()
        n, c = z.shape
        _bwd_chunk_kernel[(n,)](z, z.stride(0), labels, lse, ent, g_logp.contiguous(), g_ent.contiguous(),
                                c, v0, float(temperature), BLOCK_V=_block_v(c), num_warps=8)
        return z  # overwritten in place with dL/dz
