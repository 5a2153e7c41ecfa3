"""Triton grouped GEMMs for the fused MoE-LoRA experts (GPU only, imported lazily).

Implements the primitives of `moe_lora.TorchGrouped` on rows sorted by expert:

    gmm:      out[s] = x[rows[s]] @ op(w[e]) + scale * xa[s] @ op(b[e])   (LoRA as an epilogue)
    gmm_lora: the same, with xa[s] = x[rows[s]] @ op(p[e]) accumulated in the projection's own
              K loop (and returned) instead of read from a separate rank-r pass over x
    gouter:   out[e] = scale * x[rows[seg_e]]^T @ y[seg_e]                (per-expert weight grads)
    glu:      SiLU-GLU forward and backward, one row per program, fp32 in registers

gmm runs one program per (row tile, column tile), column tiles fastest; a row tile never
straddles two experts, so the tile table (expert, first row) is built on the device from the
per-expert counts without a host sync. gouter runs one program per (expert, column tile) and
loops over that expert's rows. All accumulation is fp32; fp32 inputs use IEEE dots (no TF32) so
they match the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .glu import glu, glu_backward, is_silu


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gmm_kernel(
    x_ptr, rows_ptr, w_ptr, xa_ptr, b_ptr, out_ptr, rscale_ptr, orows_ptr, p_ptr,
    tile_expert_ptr, tile_row_ptr, seg_end_ptr,
    N, K, R: tl.constexpr, scale,  # R (the LoRA rank) constant: no mask on the side tiles' contiguous dim
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
    stride_am, stride_ar, stride_be, stride_br, stride_bn,
    stride_om, stride_on, stride_pe, stride_pk, stride_pr,
    HAS_ROWS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_OUT_ROWS: tl.constexpr,
    FUSE_SIDE: tl.constexpr, IEEE: tl.constexpr, TMA_W: tl.constexpr, TMA_X: tl.constexpr, W_TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # TMA_W: w_ptr is a TensorDescriptor of the stacked weight, (E, N, K) if W_TRANS else (E, K, N),
    # and each (K, N) weight tile is one bulk copy (the hardware zero-fills past N and K). TMA_X: x_ptr
    # is a (rows, K) descriptor of rows already sorted by expert (no gather); a box may run past the
    # expert's last row into the next expert's, and those rows are never stored. Gathered rows
    # (HAS_ROWS) have no TMA form on sm_90, so they are always loaded by pointer.
    # Column tiles vary fastest: the programs of one row tile run side by side, so its gathered x
    # rows come from HBM once and are then L2 hits, and an expert's weight, read by all its row
    # tiles, stays in L2 (row-tile-fastest order re-streamed x once per column tile).
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    tile = pid // n_col_tiles
    pid_n = pid % n_col_tiles
    e = tl.load(tile_expert_ptr + tile)
    valid = e >= 0  # tiles past the last expert's are padding: every row masked, no K loop
    e = tl.maximum(e, 0).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.where(valid, tl.load(seg_end_ptr + e), 0)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if HAS_ROWS:
        src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    if not TMA_X:
        x_rows = x_ptr + src[:, None] * stride_xm
    if not TMA_W:
        w_cols = w_ptr + e * stride_we + offs_n[None, :] * stride_wn
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SIDE:  # the rank-r side product x op(p), from the same x tiles as the projection
        side = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        p_cols = p_ptr + e * stride_pe + offs_r[None, :] * stride_pr
    k_stop = tl.where(valid, K, 0)
    e32, n0 = e.to(tl.int32), pid_n * BLOCK_N
    for k0 in range(0, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if TMA_X:
            xt = x_ptr.load([row0, k0])
        else:
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if TMA_W and W_TRANS:
            wt = tl.trans(w_ptr.load([e32, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        elif TMA_W:
            wt = w_ptr.load([e32, k0, n0]).reshape(BLOCK_K, BLOCK_N)
        else:
            wt = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(xt, wt, acc, IEEE)
        if FUSE_SIDE:
            pt = tl.load(p_cols + offs_k[:, None] * stride_pk, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            side = _dot(xt, pt, side, IEEE)

    if FUSE_SIDE:  # rounded to the input dtype as if stored and reloaded; the first column tile stores it
        at = side.to(xa_ptr.dtype.element_ty)
        tl.store(xa_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :] * stride_ar, at,
                 mask=mask_m[:, None] & mask_r[None, :] & (pid_n == 0))
    if HAS_LORA:  # rank-r side path: (BLOCK_M, R) @ (R, BLOCK_N), R padded to BLOCK_R >= 16
        if not FUSE_SIDE:
            at = tl.load(xa_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :] * stride_ar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_ptr + e * stride_be + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        # acc + scale * (at @ bt), accumulated into acc itself: a separate fp32 product tile would
        # double the accumulator's registers (the launcher passes scale != 0)
        acc = _dot(at, bt, acc * (1.0 / scale), IEEE) * scale

    if HAS_ROW_SCALE:  # the routing weight, applied in fp32 before the cast
        acc *= tl.load(rscale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if HAS_OUT_ROWS:  # scatter rows back to (token, slot) order
        dst = tl.load(orows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        dst = offs_m.to(tl.int64)
    out = out_ptr + dst[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gouter_kernel(
    x_ptr, rows_ptr, y_ptr, out_ptr, seg_start_ptr, seg_end_ptr,
    N, R: tl.constexpr, scale,
    stride_xm, stride_xn, stride_ym, stride_yr, stride_oe, stride_on, stride_or,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(seg_start_ptr + e)
    end = tl.load(seg_end_ptr + e)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        if HAS_ROWS:
            src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            src = offs_m.to(tl.int64)
        xt = tl.load(x_ptr + src[None, :] * stride_xm + offs_n[:, None] * stride_xn,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_N, BLOCK_M) = x^T
        yt = tl.load(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_r[None, :] * stride_yr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
        acc = _dot(xt, yt, acc, IEEE)

    out = out_ptr + e.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on + offs_r[None, :] * stride_or
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _glu_fwd_kernel(h_ptr, a_ptr, I, stride_h, stride_a, BLOCK: tl.constexpr):
    """a = silu(gate) * up for one row, in fp32 registers."""
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, I, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < I
        gate = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + I + offs, mask=mask, other=0.0).to(tl.float32)
        a = gate * tl.sigmoid(gate) * up
        tl.store(a_ptr + row * stride_a + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(h_ptr, ga_ptr, rw_ptr, a_ptr, dh_ptr, drw_ptr, I,
                    stride_h, stride_ga, stride_a, stride_dh, BLOCK: tl.constexpr):
    """One row of `glu.glu_backward` for SiLU: a, dh = [d gate; d up] and d rw = <ga, a>."""
    row = tl.program_id(0).to(tl.int64)
    rw = tl.load(rw_ptr + row).to(tl.float32)
    d_rw = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < I
        gate = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + I + offs, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + row * stride_ga + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        act = gate * sig
        a = act * up
        d_rw += ga * a  # masked lanes hold ga = 0
        gw = ga * rw
        d_gate = gw * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = sig (1 + g (1 - sig))
        tl.store(a_ptr + row * stride_a + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + row * stride_dh + offs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + row * stride_dh + I + offs, (gw * act).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(drw_ptr + row, tl.sum(d_rw, axis=0))


class Plan(NamedTuple):
    tile_expert: Tensor  # (n_tiles,) int32, -1 for padding tiles
    tile_row: Tensor  # (n_tiles,) int32 first sorted row of the tile
    seg_start: Tensor  # (E,) int32
    seg_end: Tensor  # (E,) int32
    block_m: int  # the row tile the table was built for


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one `_gmm_kernel` shape class (BLOCK_M is the plan's)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # weight tiles (and rows already sorted by expert) by TMA bulk copies, sm_90+


# The four projections of a fused step load their operands differently: rows gathered from token
# order (gate/up forward, down backward) or already sorted by expert (down forward, gate/up
# backward), the weight used transposed (forward) or not (backward). Each kind has its own tile.
Kind = tuple[bool, bool]  # (rows gathered, weight transposed)
PROJECTIONS: dict[str, Kind] = {"gate_up fwd": (True, True), "down fwd": (False, True),
                                "down bwd": (True, False), "gate_up bwd": (False, False)}


def every_kind(c: GemmConfig) -> dict[Kind, GemmConfig]:
    return {kind: c for kind in PROJECTIONS.values()}


def _tma_ok(t: Tensor) -> bool:
    """A TMA descriptor needs a contiguous last dim and 16-byte aligned base and strides."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * size % 16 == 0 for st in t.stride()[:-1]))


def _op_strides(t: Tensor, trans: bool) -> tuple[int, int, int]:
    """Strides (expert, K, N) of op(t)[e] for a stacked t (E, ., .): op = transpose if trans."""
    return (t.stride(0), t.stride(2), t.stride(1)) if trans else (t.stride(0), t.stride(1), t.stride(2))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


class TritonGrouped:
    """Triton backend of `moe_lora._MoELoRA`. Tile choices per dtype, projection kind and width.

    "wide" is a projection (N = 2I or H or I, hundreds to thousands of columns), with one tile per
    kind (`PROJECTIONS`); "narrow" a rank-r LoRA side product (N = r <= 64: the tile is only as
    wide as r, so the K loop streams x once with no wasted columns). The 16-bit values were picked
    with benchmarks/kernels_sweep.py on an H200 at Qwen3-30B-A3B shapes (128-row tiles, 256 columns,
    TMA weight tiles; benchmarks/results/kernels-sweep-cuda-nvidia-h200.json); fp32 uses IEEE dots
    (no TF32) and smaller tiles so it matches the reference."""

    BLOCK_M = {torch.float32: 64, "16bit": 128}
    WIDE = {torch.float32: every_kind(GemmConfig(64, 32, 4, 2)),
            "16bit": {PROJECTIONS["gate_up fwd"]: GemmConfig(256, 32, 8, 4, tma=True),
                      PROJECTIONS["down fwd"]: GemmConfig(256, 64, 8, 3, tma=True),
                      PROJECTIONS["down bwd"]: GemmConfig(256, 32, 8, 4, tma=True),
                      PROJECTIONS["gate_up bwd"]: GemmConfig(256, 32, 8, 4, tma=True)}}
    NARROW_BLOCK_K = {torch.float32: 32, "16bit": 64}
    GOUTER = {torch.float32: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
              "16bit": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)}

    @staticmethod
    def _key(dtype: torch.dtype):
        return torch.float32 if dtype == torch.float32 else "16bit"

    def plan(self, counts: Tensor, n_rows: int, dtype: torch.dtype = torch.bfloat16) -> Plan:
        bm, n_exp = self.BLOCK_M[self._key(dtype)], counts.numel()
        ends = counts.cumsum(0)
        starts = ends - counts
        tiles = (counts + bm - 1) // bm
        tile_end = tiles.cumsum(0)
        # sum_e ceil(c_e / bm) <= ceil(S / bm) + E: an upper bound known without a host sync.
        t = torch.arange(triton.cdiv(n_rows, bm) + n_exp, device=counts.device)
        te = torch.searchsorted(tile_end, t, right=True)  # expert owning tile t, E if padding
        tc = te.clamp(max=n_exp - 1)
        row = starts[tc] + (t - (tile_end[tc] - tiles[tc])) * bm
        tile_expert = torch.where(te < n_exp, tc, -1)
        return Plan(tile_expert.int(), row.int(), starts.int(), ends.int(), bm)

    def _cfg(self, dtype: torch.dtype, n_dim: int, kind: Kind) -> GemmConfig:
        key = self._key(dtype)
        if n_dim <= 64:  # a rank-r side product
            return GemmConfig(_block_r(n_dim), self.NARROW_BLOCK_K[key], num_warps=4, num_stages=3)
        return self.WIDE[key][kind]

    def gmm(self, x: Tensor, w: Tensor, plan: Plan, rows: Tensor | None = None,
            trans: bool = True, lora: tuple[Tensor, Tensor, float] | None = None,
            row_scale: Tensor | None = None, out_rows: Tensor | None = None) -> Tensor:
        return self._launch(x, w, plan, rows, trans, lora, None, row_scale, out_rows)

    def gmm_lora(self, x: Tensor, w: Tensor, plan: Plan, lora: tuple[Tensor, Tensor, float],
                 rows: Tensor | None = None, trans: bool = True, row_scale: Tensor | None = None,
                 out_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One launch: the side product x op(p) accumulates next to x op(w) in the K loop. Every
        column tile recomputes it (r / BLOCK_N more MMA work) and the first one stores it, instead of
        a separate launch that streams x again."""
        p, q, scale = lora
        r = p.shape[1] if trans else p.shape[2]
        n_rows = rows.shape[0] if rows is not None else x.shape[0]
        if r > 64:  # a side tile that wide would crowd the projection's registers: two launches
            side = self.gmm(x, p, plan, rows=rows, trans=trans)
            return self.gmm(x, w, plan, rows, trans, (side, q, scale), row_scale, out_rows), side
        side = x.new_empty(n_rows, r)
        out = self._launch(x, w, plan, rows, trans, (side, q, scale), p, row_scale, out_rows)
        return out, side

    def _launch(self, x: Tensor, w: Tensor, plan: Plan, rows: Tensor | None, trans: bool,
                lora: tuple[Tensor, Tensor, float] | None, side_p: Tensor | None,
                row_scale: Tensor | None, out_rows: Tensor | None) -> Tensor:
        """`_gmm_kernel` for out = x op(w) (+ LoRA, epilogue); with side_p, the LoRA's (S, r) input
        tensor is written (x op(side_p)) instead of read."""
        n_rows = rows.shape[0] if rows is not None else x.shape[0]
        # op(w)[e] is (K, N): w[e] is (N, K) when trans, else (K, N)
        k_dim, n_dim = (w.shape[2], w.shape[1]) if trans else (w.shape[1], w.shape[2])
        assert x.shape[1] == k_dim and x.dtype == w.dtype
        out = x.new_empty(n_rows, n_dim)
        if lora is not None:
            xa, b, scale = lora
            assert xa.dtype == b.dtype == x.dtype
            r = xa.shape[1]
        else:
            xa, b, scale, r = x, w, 0.0, 1  # dummies, never read
        c = self._cfg(x.dtype, n_dim, (rows is not None, trans))
        grid = (plan.tile_expert.numel() * triton.cdiv(n_dim, c.block_n),)
        no_op = (0, 0, 0)
        tma_w = c.tma and _tma_ok(w)  # else (odd strides) the pointer loads, same result
        tma_x = tma_w and rows is None and _tma_ok(x)
        w_in = TensorDescriptor.from_tensor(w, [1, c.block_n, c.block_k] if trans else [1, c.block_k, c.block_n]) \
            if tma_w else w
        x_in = TensorDescriptor.from_tensor(x, [plan.block_m, c.block_k]) if tma_x else x
        p_strides = no_op
        if side_p is not None:
            # The side factor's (K, r) tiles must be K-contiguous: with only r (16) contiguous elements
            # per row, the pipeliner leaves the load synchronous in every K step. A copy of a
            # rank-r factor is E * r * K elements, negligible next to the projection.
            side_p = side_p if trans else side_p.transpose(1, 2).contiguous()
            p_strides = _op_strides(side_p, True)
        _gmm_kernel[grid](
            x_in, rows if rows is not None else plan.tile_row, w_in, xa, b, out,
            row_scale if row_scale is not None else plan.tile_row, out_rows if out_rows is not None else plan.tile_row,
            side_p if side_p is not None else w, plan.tile_expert, plan.tile_row, plan.seg_end,
            n_dim, k_dim, r, float(scale),
            x.stride(0), x.stride(1), *_op_strides(w, trans),
            xa.stride(0), xa.stride(1), *(_op_strides(b, trans) if lora is not None else no_op),
            out.stride(0), out.stride(1), *p_strides,
            HAS_ROWS=rows is not None, HAS_LORA=lora is not None and scale != 0, HAS_ROW_SCALE=row_scale is not None,
            HAS_OUT_ROWS=out_rows is not None, FUSE_SIDE=side_p is not None, IEEE=x.dtype == torch.float32,
            TMA_W=tma_w, TMA_X=tma_x, W_TRANS=trans, BLOCK_M=plan.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            BLOCK_R=_block_r(r), num_warps=c.num_warps, num_stages=c.num_stages,
        )
        return out

    def gouter(self, x: Tensor, y: Tensor, plan: Plan, rows: Tensor | None = None,
               scale: float = 1.0) -> Tensor:
        assert x.dtype == y.dtype
        n_exp, n_dim, r = plan.seg_start.numel(), x.shape[1], y.shape[1]
        out = x.new_empty(n_exp, n_dim, r)
        cfg = self.GOUTER[self._key(x.dtype)]
        grid = (n_exp, triton.cdiv(n_dim, cfg["BLOCK_N"]))
        _gouter_kernel[grid](
            x, rows if rows is not None else plan.seg_start, y, out, plan.seg_start, plan.seg_end,
            n_dim, r, float(scale),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1), out.stride(2),
            HAS_ROWS=rows is not None, IEEE=x.dtype == torch.float32, BLOCK_R=_block_r(r), **cfg,
        )
        return out

    def glu_forward(self, h: Tensor, act) -> Tensor:
        if not is_silu(act):
            return glu(h, act)
        n_rows, i_dim = h.shape[0], h.shape[1] // 2
        a = h.new_empty(n_rows, i_dim)
        if n_rows:
            _glu_fwd_kernel[(n_rows,)](h, a, i_dim, h.stride(0), a.stride(0), BLOCK=_block_glu(i_dim), num_warps=4)
        return a

    def glu_backward(self, h: Tensor, ga: Tensor, rw: Tensor, act) -> tuple[Tensor, Tensor, Tensor]:
        if not is_silu(act):  # any other activation: the torch reference (autograd for act')
            return glu_backward(h, ga, rw, act)
        n_rows, i_dim = h.shape[0], h.shape[1] // 2
        a, dh = h.new_empty(n_rows, i_dim), torch.empty_like(h)
        d_rw = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        assert h.stride(1) == 1 and ga.stride(1) == 1
        if n_rows:
            _glu_bwd_kernel[(n_rows,)](h, ga, rw.contiguous(), a, dh, d_rw, i_dim,
                                       h.stride(0), ga.stride(0), a.stride(0), dh.stride(0),
                                       BLOCK=_block_glu(i_dim), num_warps=4)
        return a, dh, d_rw


def _block_glu(i_dim: int) -> int:
    return min(2048, triton.next_power_of_2(i_dim))
