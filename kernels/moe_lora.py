"""Fused MoE-LoRA experts: routed tokens grouped by expert, LoRA applied as a low-rank side path.

For expert e and a routed token x, with gate/up and down projections W_gu (2I, H), W_d (H, I):

    h = x W_gu^T + s_gu (x A_gu^T) B_gu^T          # (2I,)   never forms W_gu + s B A
    a = act(h[:I]) * h[I:]                         # (I,)
    y = a W_d^T  + s_d  (a A_d^T)  B_d^T           # (H,)
    out[token] += routing_weight * y

peft's `target_parameters` path instead materializes W_e + s B_e A_e for every expert on every
forward (and its full-size gradient on backward). Here the backward is written by hand and
returns gradients for the hidden states, the routing weights and the LoRA factors only: the
base expert weights are frozen.

The grouped matmuls are delegated to a backend (`gmm`, `gmm_lora`, `gouter`, and the GLU), a torch
loop over experts (reference, runs everywhere) or Triton kernels (`triton_moe_lora.py`).
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .glu import glu, glu_backward


class LoRAFactors(NamedTuple):
    """LoRA on a stacked expert weight W (E, out, in): delta_e = scaling * B[e] @ A[e]."""

    A: Tensor  # (E, r, in)
    B: Tensor  # (E, out, r)
    scaling: float


# ----------------------------------------------------------------------------------------------
# torch reference backend: rows are sorted by expert, expert e owns rows [off[e], off[e+1]).


class TorchGrouped:
    """Grouped GEMMs as a Python loop over experts. No weight is ever copied or summed."""

    def plan(self, counts: Tensor, n_rows: int, dtype: torch.dtype | None = None) -> list[int]:
        return counts.tolist()  # one host sync per layer call

    def gmm(self, x: Tensor, w: Tensor, plan: list[int], rows: Tensor | None = None,
            trans: bool = True, lora: tuple[Tensor, Tensor, float] | None = None,
            row_scale: Tensor | None = None, out_rows: Tensor | None = None) -> Tensor:
        """out[s] = x[rows[s]] @ op(w[e]) (+ scale * xa[s] @ op(b[e])), op = transpose if trans.

        e is the expert owning sorted row s; xa is already in sorted row order. Epilogue: each
        row times row_scale[s] (in the wider dtype, then cast), stored at row out_rows[s]."""
        n_rows = rows.shape[0] if rows is not None else x.shape[0]
        out = x.new_empty(n_rows, w.shape[1] if trans else w.shape[2])
        epilogue = row_scale is not None or out_rows is not None
        start = 0
        for e, n in enumerate(plan):
            if n == 0:
                continue
            seg = slice(start, start + n)
            start += n
            xe = x[rows[seg]] if rows is not None else x[seg]
            we = w[e].T if trans else w[e]
            ye = None if epilogue else out[seg]  # no epilogue: write in place, no temporary
            if lora is None:
                ye = torch.mm(xe, we, out=ye)
            else:
                xa, b, scale = lora
                be = b[e].T if trans else b[e]
                ye = torch.addmm(xe @ we, xa[seg], be, alpha=scale, out=ye)
            if not epilogue:
                continue
            if row_scale is not None:  # promotes to the wider dtype, then back
                ye = (ye * row_scale[seg, None]).to(out.dtype)
            if out_rows is None:
                out[seg] = ye
            else:  # one segment at a time: never a second (rows, N) buffer
                out.index_copy_(0, out_rows[seg], ye)
        return out

    def gmm_lora(self, x: Tensor, w: Tensor, plan: list[int], lora: tuple[Tensor, Tensor, float],
                 rows: Tensor | None = None, trans: bool = True, row_scale: Tensor | None = None,
                 out_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A projection with its LoRA: out = x op(w) + scale * (x op(p)) op(q), for lora = (p, q, scale).

        Also returns the rank-r side product xp = x op(p) (in sorted row order), which the backward
        needs. Here two `gmm` calls; the Triton backend computes xp inside the projection's K loop."""
        p, q, scale = lora
        xp = self.gmm(x, p, plan, rows=rows, trans=trans)
        out = self.gmm(x, w, plan, rows=rows, trans=trans, lora=(xp, q, scale), row_scale=row_scale,
                       out_rows=out_rows)
        return out, xp

    def glu_forward(self, h: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
        return glu(h, act)

    def glu_backward(self, h: Tensor, ga: Tensor, rw: Tensor, act: Callable[[Tensor], Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor]:
        return glu_backward(h, ga, rw, act)

    def gouter(self, x: Tensor, y: Tensor, plan: list[int], rows: Tensor | None = None,
               scale: float = 1.0) -> Tensor:
        """out[e] = scale * x[rows[seg_e]]^T @ y[seg_e]: (E, x.shape[1], y.shape[1]), per-expert weight grads."""
        out = x.new_zeros(len(plan), x.shape[1], y.shape[1])
        start = 0
        for e, n in enumerate(plan):
            if n == 0:
                continue
            seg = slice(start, start + n)
            xe = x[rows[seg]] if rows is not None else x[seg]
            torch.mm(xe.T, y[seg], out=out[e])
            start += n
        return out.mul_(scale) if scale != 1.0 else out


def _backend(impl: str):
    if impl == "torch":
        return TorchGrouped()
    if impl == "triton":
        from .triton_moe_lora import TritonGrouped  # lazy: triton is a GPU-only extra

        return TritonGrouped()
    raise ValueError(f"unknown MoE-LoRA impl {impl!r} (expected 'torch' or 'triton')")


# ----------------------------------------------------------------------------------------------
# autograd Function


def _project(backend, x: Tensor, w: Tensor, plan, lora: tuple[Tensor | None, Tensor | None, float], **kw
             ) -> tuple[Tensor, Tensor | None]:
    """x op(w) plus its LoRA side path when there is one: (out, rank-r side product or None)."""
    if lora[0] is None:
        return backend.gmm(x, w, plan, **kw), None
    return backend.gmm_lora(x, w, plan, lora, **kw)


class _MoELoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, w_gu, w_d, a_gu, b_gu, a_d, b_d,
                s_gu, s_d, act, backend):
        k = top_k_index.shape[1]
        # Group the T*k (token, slot) routes by expert; stable sort keeps token order inside an expert.
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        # Per-expert counts by scatter-add: torch.bincount would sync with the host on CUDA.
        counts = torch.zeros(w_gu.shape[0], dtype=torch.int64, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int64))
        plan = backend.plan(counts, flat.numel(), x.dtype)
        rw = top_k_weights.reshape(-1)[order]

        h, xa = _project(backend, x, w_gu, plan, (a_gu, b_gu, s_gu), rows=tok)  # (S, 2I), xa = x A_gu^T (S, r)
        a = backend.glu_forward(h, act)  # (S, I)
        # Epilogue: times the routing weight (in the wider dtype, as transformers does), stored in
        # (token, slot) order, so combining the k expert outputs of a token is a plain sum.
        y, aa = _project(backend, a, w_d, plan, (a_d, b_d, s_d), row_scale=rw, out_rows=order)  # aa = a A_d^T
        del a
        out = y.view(-1, k, y.shape[-1]).sum(1)

        # Saved: the pre-activation h (S, 2I) and two rank-r side products; a is recomputed.
        ctx.save_for_backward(x, order, tok, rw, h, xa, aa, w_gu, w_d, a_gu, b_gu, a_d, b_d)
        ctx.plan, ctx.s_gu, ctx.s_d, ctx.act, ctx.backend = plan, s_gu, s_d, act, backend
        ctx.k, ctx.w_dtype = k, top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x, order, tok, rw, h, xa, aa, w_gu, w_d, a_gu, b_gu, a_d, b_d = ctx.saved_tensors
        be, plan, s_gu, s_d = ctx.backend, ctx.plan, ctx.s_gu, ctx.s_d
        need_x, _, need_w = ctx.needs_input_grad[:3]
        g = g.contiguous().to(x.dtype)
        dt = x.dtype
        d_agu = d_bgu = d_ad = d_bd = dx = d_weights = None

        # down projection: y = a W_d^T + s_d (a A_d^T) B_d^T, scaled by the routing weight rw.
        # ga = g W'_d (S, I), unweighted; gb = g B_d (S, r)
        ga, gb = _project(be, g, w_d, plan, (b_d, a_d, s_d), rows=tok, trans=False)
        # through the GLU: a recomputed from h, dh (S, 2I), and d rw = <g W'_d, a> (no need to keep y)
        a, dh, d_rw = be.glu_backward(h, ga, rw, ctx.act)
        del ga
        if need_w:
            d_weights = torch.empty(order.numel(), dtype=ctx.w_dtype, device=x.device)
            d_weights[order] = d_rw.to(ctx.w_dtype)
            d_weights = d_weights.view(-1, ctx.k)
        if a_d is not None:
            d_bd = be.gouter(g, (aa * rw[:, None]).to(dt), plan, rows=tok, scale=s_d)  # (E, H, r)
            d_ad = be.gouter(a, (gb * rw[:, None]).to(dt), plan, scale=s_d).transpose(1, 2)  # (E, r, I)
        del a

        # gate/up projection: h = x W_gu^T + s_gu (x A_gu^T) B_gu^T
        if need_x:  # rows stored in (token, slot) order: a token's k contributions are a plain sum
            dx_s, dhb = _project(be, dh, w_gu, plan, (b_gu, a_gu, s_gu), trans=False, out_rows=order)
            dx = dx_s.view(-1, ctx.k, dx_s.shape[-1]).sum(1)
            del dx_s
        elif a_gu is not None:
            dhb = be.gmm(dh, b_gu, plan, trans=False)  # dh B_gu (S, r)
        if a_gu is not None:
            d_bgu = be.gouter(dh, xa, plan, scale=s_gu)  # (E, 2I, r)
            d_agu = be.gouter(x, dhb, plan, rows=tok, scale=s_gu).transpose(1, 2)  # (E, r, H)
        return dx, None, d_weights, None, None, d_agu, d_bgu, d_ad, d_bd, None, None, None, None


def moe_lora_experts(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    gate_up_lora: LoRAFactors | None = None,
    down_lora: LoRAFactors | None = None,
    act: Callable[[Tensor], Tensor] = F.silu,
    impl: str = "torch",
) -> Tensor:
    """Routed experts with LoRA, transformers-5 layout.

    hidden (T, H); top_k_index (T, k) int in [0, E); top_k_weights (T, k);
    gate_up_proj (E, 2I, H) with rows [gate; up]; down_proj (E, H, I). Returns (T, H).
    LoRA factors are cast to the base weight dtype (as peft does); gradients flow to them, to
    hidden and to top_k_weights. The base weights must be frozen.
    """
    if torch.is_grad_enabled() and (gate_up_proj.requires_grad or down_proj.requires_grad):
        raise ValueError("moe_lora_experts trains LoRA factors only: freeze gate_up_proj and down_proj")
    dt = gate_up_proj.dtype
    a_gu, b_gu, s_gu = _cast(gate_up_lora, dt)
    a_d, b_d, s_d = _cast(down_lora, dt)
    return _MoELoRA.apply(hidden.to(dt), top_k_index, top_k_weights, gate_up_proj, down_proj,
                          a_gu, b_gu, a_d, b_d, s_gu, s_d, act, _backend(impl))


def _cast(lora: LoRAFactors | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, float]:
    if lora is None:
        return None, None, 0.0
    return lora.A.to(dtype), lora.B.to(dtype), float(lora.scaling)


# ----------------------------------------------------------------------------------------------
# peft integration
#
# peft and transformers are imported inside the functions: with the repository root on sys.path
# (`python -m pytest` from a checkout) this folder is also the top-level package `kernels`, which
# transformers imports while peft itself is still being imported (its hub-kernels probe), and a
# module-level peft or transformers import here would then be circular.
#
# peft wraps each targeted 3-D parameter in a `lora.ParamWrapper`; two targets on one experts
# module nest: mlp.experts = ParamWrapper(down_proj) -> ParamWrapper(gate_up_proj) -> Experts.
# We patch the *outermost* wrapper's forward (an instance attribute, so it is per-module and
# reversible) and read the LoRA weights from the wrappers on every call. The parameters are
# untouched, so state_dict / save_pretrained output is exactly peft's.
#
# peft layout for W (E, out, in) (see ParamWrapper.get_delta_factors):
#   lora_A.weight (E*r, in)  -> view (E, r, in)                     : A[e]
#   lora_B.weight (out, r*E) -> view (out, r, E).permute(2, 0, 1)   : B[e]  (expert index fastest)
#   delta_e = scaling * B[e] @ A[e]


def peft_experts_chain(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(experts module, {parameter_name: ParamWrapper}) for a (possibly nested) ParamWrapper."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {}
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def _is_fusable_experts(m: nn.Module) -> bool:
    """transformers-5 fused experts (Qwen3-MoE, Mixtral, ...): [gate; up] concatenated, no bias."""
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (
        isinstance(gu, Tensor) and isinstance(dn, Tensor) and gu.dim() == 3 and dn.dim() == 3
        and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]
        and hasattr(m, "act_fn")
        and not getattr(m, "is_transposed", False) and not getattr(m, "has_bias", False)
        and getattr(m, "is_concatenated", True) and getattr(m, "has_gate", True)
        and not getattr(m, "has_post_expert_norm", False)
        and _default_gate(m)
    )


def fused_layout_problem(experts: nn.Module, wrappers: dict[str, nn.Module]) -> str | None:
    """Why the fused path cannot run this LoRA'd experts module, or None when it can."""
    if set(wrappers) - {"gate_up_proj", "down_proj"} or not _is_fusable_experts(experts):
        return (f"LoRA targets {sorted(wrappers)} of {type(experts).__name__}, "
                "whose layout the fused MoE-LoRA path does not support")
    if any(not w._did_swap_in_out_features for w in wrappers.values()):
        return "fused MoE-LoRA expects (E, out, in) expert weights"
    return None


def _default_gate(m: nn.Module) -> bool:
    """False if the experts class overrides transformers' act(gate) * up (e.g. clamped GLUs)."""
    gate = getattr(type(m), "_apply_gate", None)
    if gate is None:
        return True
    from transformers.integrations.moe import _default_apply_gate

    return gate is _default_apply_gate


def peft_lora_factors(wrapper: nn.Module, adapter: str) -> LoRAFactors:
    """The LoRA factors of a peft ParamWrapper on a 3-D (E, out, in) parameter, as views of its weights."""
    n_exp = wrapper.num_experts
    wa, wb = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    a = wa.view(n_exp, -1, wa.shape[-1])
    b = wb.view(wb.shape[0], -1, n_exp).permute(2, 0, 1)
    return LoRAFactors(a, b, wrapper.scaling[adapter])


def _fused_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   *args, **kwargs) -> Tensor:
    experts, wrappers = peft_experts_chain(self)
    active = self.active_adapters
    # Anything peft handles specially (disabled or merged adapters, several active adapters,
    # per-sample adapters) goes through peft's own forward.
    plain = (
        args or kwargs or len(active) != 1
        or any(w.disable_adapters or w.merged for w in wrappers.values())
    )
    if plain:
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    adapter = active[0]

    def factors(name: str) -> LoRAFactors | None:
        w = wrappers.get(name)
        return peft_lora_factors(w, adapter) if w is not None and adapter in w.lora_A else None

    return moe_lora_experts(
        hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
        factors("gate_up_proj"), factors("down_proj"), act=experts.act_fn, impl=self._looprl_moe_impl,
    )


def _expert_wrappers(model: nn.Module) -> list[nn.Module]:
    """Outermost peft ParamWrappers whose base is a fusable experts module. An experts module the
    fused path does not fit keeps peft's own forward (same values, slower), with a warning."""
    from peft.tuners.lora.layer import ParamWrapper

    from looprl.ops.core.log import get_logger

    found, inner = [], set()
    for name, m in model.named_modules():
        if isinstance(m, ParamWrapper) and id(m) not in inner:
            experts, wrappers = peft_experts_chain(m)
            inner.update(id(w) for w in wrappers.values())
            if set(wrappers) & {"gate_up_proj", "down_proj"}:
                problem = fused_layout_problem(experts, wrappers)
                if problem:
                    get_logger(__name__).warning("fused MoE-LoRA does not fit this experts module; it keeps "
                                                 "peft's forward", module=name, problem=problem)
                    continue
                found.append(m)
    return found


def enable_fused_moe_lora(model: nn.Module, impl: str = "torch") -> int:
    """Route every peft-LoRA'd experts module of `model` through the fused path. Returns the count.

    Idempotent (a second call only changes impl); impl="peft" is the same as disable. Works for
    any transformers-5 fused experts module with LoRA on `experts.gate_up_proj` and/or
    `experts.down_proj` (Qwen3-MoE, Mixtral, ...). Parameters and adapter files are unchanged.
    """
    if impl == "peft":
        disable_fused_moe_lora(model)
        return 0
    _backend(impl)  # fail now (e.g. triton missing), not on the first forward
    wrappers = _expert_wrappers(model)
    for w in wrappers:
        w._looprl_moe_impl = impl
        w.forward = types.MethodType(_fused_forward, w)
    return len(wrappers)


def disable_fused_moe_lora(model: nn.Module) -> int:
    """Restore peft's own forward on every patched experts module. Returns how many were patched."""
    n = 0
    for m in model.modules():
        if "_looprl_moe_impl" in m.__dict__:
            del m.forward, m._looprl_moe_impl
            n += 1
    return n
