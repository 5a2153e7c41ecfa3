"""LoRA forwards for serving: rows of one batch on different adapters, and a fast experts path.

peft supports mixed-adapter batches for ordinary LoRA layers (``lora.Linear``): pass
``adapter_names=[key per row]`` (``"__base__"`` for no adapter) and each layer runs the base
weight once for the whole batch, then each adapter's low-rank update on its rows. LoRA on the
fused MoE expert parameters (``target_parameters``, peft's ``ParamWrapper``) refuses
``adapter_names``, and applies an adapter by re-parametrising the whole expert weight tensor on
every forward (slow for decode steps of a few tokens).

``MixedLora`` closes both gaps without changing peft or the adapter files:
- a forward pre-hook on every ``lora.Linear``-like layer injects ``adapter_names`` while
  ``rows`` is set;
- the outermost ``ParamWrapper`` of each experts module gets a forward that splits the tokens
  by adapter and runs the experts once per adapter on its tokens only, through the fused
  MoE-LoRA kernel of ``looprl.kernels`` (LoRA as a low-rank side path, no weight
  materialisation; ``impl="torch"`` runs everywhere, ``"triton"`` on GPUs), or through peft's own
  forward with ``impl="peft"``. Base-model rows call the experts module directly;
- a Linear layer adapted through its weight (a ``ParamWrapper`` on ``nn.Linear``: shared experts,
  see ``looprl.policy.families``) runs its base projection once and each adapter's low-rank update
  on that adapter's rows.

So a decode step with rows on the promoted and the canary adapter costs one model forward plus one
extra (cheap) experts pass instead of two full forwards. ``rows`` is set only for the duration of
one ``forward`` call by the engine thread, the only thread that runs the model.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from torch import nn

from looprl.kernels import fused_layout_problem, moe_lora_experts, peft_experts_chain, peft_lora_factors

BASE = "__base__"


class MixedLora:
    def __init__(self, model: nn.Module, impl: str = "torch"):
        if impl not in ("peft", "torch", "triton"):
            raise ValueError(f"serving.moe_lora must be peft|torch|triton, got {impl!r}")
        self.model = model
        self.impl = impl
        self.rows: list[str] | None = None  # adapter key per batch row, during one forward

    # ------------------------------------------------------------------ install
    def refresh(self) -> None:
        """(Re)install hooks after adapters were injected: peft may have created new LoRA layers
        or wrapped the experts in one more ``ParamWrapper``."""
        mods = dict(self.model.named_modules())
        for name, mod in mods.items():
            if isinstance(mod, ParamWrapper):
                parent = mods.get(name.rpartition(".")[0])
                outermost = not isinstance(parent, ParamWrapper)
                patched = "forward" in mod.__dict__
                if outermost and not patched:
                    linear = isinstance(peft_experts_chain(mod)[0], nn.Linear)
                    make = _make_linear_forward if linear else _make_experts_forward
                    mod.forward = types.MethodType(make(self), mod)
                elif not outermost and patched:
                    del mod.forward
            elif isinstance(mod, LoraLayer) and not getattr(mod, "_looprl_mixed_hook", False):
                # A flag on the layer, not its id(): layers are dropped when the last adapter
                # is unloaded, and a new layer may reuse a freed id.
                mod.register_forward_pre_hook(self._inject_names, with_kwargs=True)
                mod._looprl_mixed_hook = True

    def _inject_names(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.rows is None:
            return None
        names = self.rows
        x = args[0] if args else kwargs.get("x")
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else len(names)
        if n != len(names) and n % len(names) == 0:  # tokens flattened row-major (Qwen2-MoE's shared expert)
            names = [k for k in names for _ in range(n // len(names))]
        return args, {**kwargs, "adapter_names": names}

    # ------------------------------------------------------------------ use
    def forward(self, rows: list[str], **inputs: Any) -> Any:
        """``model(**inputs)`` with row ``i`` on adapter key ``rows[i]`` (``BASE``: none)."""
        self.rows = rows
        try:
            return self.model(**inputs)
        finally:
            self.rows = None


def _make_linear_forward(mixer: MixedLora):
    """A Linear layer adapted through its weight (a peft ``ParamWrapper``; how
    ``looprl.policy.families`` adapts shared experts that peft would otherwise rename): peft's
    forward for one adapter, and for mixed rows the base projection once plus each adapter's
    low-rank update on its own rows, as ``lora.Linear`` does with ``adapter_names``."""
    peft_forward = ParamWrapper.forward

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = mixer.rows
        if rows is None or args or kwargs:
            return peft_forward(self, x, *args, **kwargs)
        base, chain = peft_experts_chain(self)
        w = chain.get("weight")
        if w is None or len(chain) != 1:
            raise ValueError(f"mixed-adapter rows through LoRA on {sorted(chain)} of {type(base).__name__} "
                             "are not supported")
        out = F.linear(x, base.weight, base.bias)
        flat_x, flat = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        per_row = flat_x.shape[0] // len(rows)  # (rows, seq, in) or (rows * seq, in), row-major
        for key in dict.fromkeys(rows):
            if key == BASE or key not in w.lora_A:  # an adapter that does not adapt this layer
                continue
            idx = torch.tensor([i for i, k in enumerate(rows) if k == key], device=x.device)
            tok = (idx.unsqueeze(1) * per_row + torch.arange(per_row, device=x.device)).flatten()
            a, b = w.lora_A[key].weight, w.lora_B[key].weight  # (r, in), (out, r)
            delta = (flat_x.index_select(0, tok).to(a.dtype) @ a.T) @ b.T * w.scaling[key]
            flat.index_add_(0, tok, delta.to(flat.dtype))
        return out

    return forward


def _make_experts_forward(mixer: MixedLora):
    peft_forward = ParamWrapper.forward

    def run(self: nn.Module, chain: dict, experts: nn.Module, fused: bool, key: str,
            hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if key == BASE:
            return experts(hidden, top_k_index, top_k_weights)
        if not fused:
            for w in chain.values():
                w._active_adapter = [key]
            return peft_forward(self, hidden, top_k_index, top_k_weights)
        def factors(name: str):
            w = chain.get(name)
            return peft_lora_factors(w, key) if w is not None and key in w.lora_A else None

        return moe_lora_experts(hidden, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                                factors("gate_up_proj"), factors("down_proj"), act=experts.act_fn, impl=mixer.impl)

    def forward(self: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        experts, chain = peft_experts_chain(self)
        if len(args) != 2 or kwargs:  # not the (hidden, top_k_index, top_k_weights) experts call
            return peft_forward(self, hidden, *args, **kwargs)
        top_k_index, top_k_weights = args
        fused = mixer.impl != "peft" and fused_layout_problem(experts, chain) is None
        rows = mixer.rows
        if rows is None:  # whole batch on the model's active adapter (or adapters disabled)
            active = self.active_adapters
            if any(w.disable_adapters or w.merged for w in chain.values()) or len(active) != 1:
                return peft_forward(self, hidden, *args)
            return run(self, chain, experts, fused, active[0], hidden, top_k_index, top_k_weights)
        per_row = hidden.shape[0] // len(rows)  # tokens are flattened row-major: (rows * seq, hidden)
        groups = {k: i for i, k in enumerate(dict.fromkeys(rows))}
        row_group = torch.tensor([groups[k] for k in rows], device=hidden.device)
        out = None
        for key, g in groups.items():
            idx = (row_group == g).nonzero().flatten()
            tok = (idx.unsqueeze(1) * per_row + torch.arange(per_row, device=hidden.device)).flatten()
            y = run(self, chain, experts, fused, key, hidden.index_select(0, tok),
                    top_k_index.index_select(0, tok), top_k_weights.index_select(0, tok))
            if out is None:
                out = y.new_zeros((hidden.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, tok, y)
        return out

    return forward
