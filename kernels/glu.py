"""The experts' GLU, a = act(gate) * up, and its backward: the torch reference that both grouped-GEMM
backends (`moe_lora.TorchGrouped`, `triton_moe_lora.TritonGrouped` for any activation but SiLU) run."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def glu(h: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    gate, up = h.chunk(2, dim=-1)  # transformers' concatenated [gate; up] layout
    return act(gate) * up


def is_silu(act: Callable) -> bool:
    return act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def glu_backward(h: Tensor, ga: Tensor, rw: Tensor, act: Callable[[Tensor], Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of y_s = rw_s * (act(gate) * up) W'_d through the GLU, given ga = dL/dy W'_d (unweighted).

    Returns (a, dh, d_rw): the recomputed activation a = act(gate) * up (S, I), dL/dh (S, 2I) and
    dL/d rw = <ga, a> (S,) in float32."""
    dt = h.dtype
    gate, up = h.chunk(2, dim=-1)
    if is_silu(act):  # the common case: analytic backward below, no autograd graph
        act_gate = F.silu(gate)
    else:
        with torch.enable_grad():
            gate_leaf = gate.detach().requires_grad_()
            act_graph = act(gate_leaf)
        act_gate = act_graph.detach()
    a = act_gate * up
    d_rw = (ga * a).sum(-1, dtype=torch.float32)
    ga = ga.mul_(rw[:, None]) if rw.dtype == dt else (ga * rw[:, None]).to(dt)
    # through a = act(gate) * up, written straight into the two halves of dh (S, 2I)
    dh = torch.empty_like(h)
    d_gate, d_up = dh.chunk(2, dim=-1)
    torch.mul(ga, act_gate, out=d_up)
    del act_gate
    g_act = ga.mul_(up)
    if is_silu(act):
        d_gate.copy_(torch.ops.aten.silu_backward(g_act, gate))
    else:
        d_gate.copy_(torch.autograd.grad(act_graph, gate_leaf, g_act)[0])
    return a, dh, d_rw
