"""Per-token log-prob of labels and entropy of softmax(hidden @ lm_head^T / temperature).

The naive path builds (N, V) float32 logits, then log_softmax, then exp for the entropy: for
N = 16k tokens and V = 152k that is ~10 GB per copy, several copies kept for backward. The
chunked path walks the vocabulary in chunks with an online (max, sum-exp, sum-exp*z) reduction
and recomputes each chunk's logits in a hand-written backward: extra memory is O(N * chunk).

For z = logits / temperature, lse = logsumexp(z), p = softmax(z):
    logp  = z[label] - lse
    ent   = lse - sum_v p_v z_v
    dlogp/dz = onehot(label) - p
    dent/dz  = -p * (z - lse + ent)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def naive_logprobs_and_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                               ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Reference: full float32 logits. hidden (..., H), weight (V, H), labels (...) -> two float32 (...)."""
    logits = (hidden @ weight.T).float() / temperature
    logp_all = logits.log_softmax(-1)
    valid = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp.masked_fill(~valid, 0.0), entropy


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, temperature, backend):
        n, v = hidden.shape[0], weight.shape[0]
        m = hidden.new_full((n,), float("-inf"), dtype=torch.float32)  # running max
        s = torch.zeros_like(m)  # sum exp(z - m)
        t = torch.zeros_like(m)  # sum exp(z - m) * z
        zy = torch.zeros_like(m)  # logit of the label
        for v0 in range(0, v, chunk_size):
            z = hidden @ weight[v0:v0 + chunk_size].T  # (n, c) in the model dtype, like lm_head
            backend.fwd_chunk(z, labels, v0, temperature, m, s, t, zy)
        lse = m + s.log()
        ent = lse - t / s
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.chunk_size, ctx.temperature, ctx.backend = chunk_size, temperature, backend
        return zy - lse, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        c, temp, be = ctx.chunk_size, ctx.temperature, ctx.backend
        need_h, need_w = ctx.needs_input_grad[:2]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.float()
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        for v0 in range(0, weight.shape[0], c):
            w = weight[v0:v0 + c]
            gz = be.bwd_chunk(hidden @ w.T, labels, v0, temperature=temp, lse=lse, ent=ent,
                              g_logp=g_logp, g_ent=g_ent)  # dL/dlogits chunk, model dtype
            if need_h:
                d_hidden += (gz @ w).float()  # fp32 accumulation across chunks
            if need_w:
                torch.mm(gz.T, hidden, out=d_weight[v0:v0 + c])
        d_hidden = d_hidden.to(hidden.dtype) if need_h else None
        return d_hidden, d_weight, None, None, None, None


class TorchChunk:
    """Elementwise per-chunk work in torch: in place where possible, two fp32 (N, chunk) buffers."""

    @staticmethod
    def fwd_chunk(z: Tensor, labels: Tensor, v0: int, temperature: float,
                  m: Tensor, s: Tensor, t: Tensor, zy: Tensor) -> None:
        z = _scaled_fp32(z, temperature)
        local = labels - v0
        hit = (local >= 0) & (local < z.shape[1])
        zy.add_(torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0))
        m_new = torch.maximum(m, z.amax(-1))
        alpha = (m - m_new).exp()  # rescales the running sums to the new max; 0 on the first chunk
        e = (z - m_new[:, None]).exp_()
        s.mul_(alpha).add_(e.sum(-1))
        t.mul_(alpha).add_(e.mul_(z).sum(-1))
        m.copy_(m_new)

    @staticmethod
    def bwd_chunk(z: Tensor, labels: Tensor, v0: int, *, temperature: float, lse: Tensor, ent: Tensor,
                  g_logp: Tensor, g_ent: Tensor) -> Tensor:
        dtype = z.dtype
        logp = _scaled_fp32(z, temperature).sub_(lse[:, None])
        gz = logp.exp()
        # gz = -p * (g_logp + g_ent * (logp + ent)), built in the logp buffer
        gz.mul_(logp.add_(ent[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])).neg_()
        local = labels - v0
        rows = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
        gz[rows, local[rows]] += g_logp[rows]
        return (gz.div_(temperature) if temperature != 1.0 else gz).to(dtype)


def _scaled_fp32(z: Tensor, temperature: float) -> Tensor:
    """z / temperature in fp32, in place when z is already a fresh fp32 matmul output."""
    z = z.float()
    return z.div_(temperature) if temperature != 1.0 else z


def _backend(impl: str):
    if impl == "chunked":
        return TorchChunk()
    if impl == "triton":
        from .triton_logprob import TritonChunk  # lazy: triton is a GPU-only extra

        return TritonChunk()
    raise ValueError(f"unknown chunked log-prob impl {impl!r}")


def chunked_logprobs_and_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096,
                                 temperature: float = 1.0, ignore_index: int = -100,
                                 impl: str = "chunked") -> tuple[Tensor, Tensor]:
    """log p(label) and entropy, float32, shape labels.shape, never holding (N, V) logits.

    hidden (..., H) final hidden states (after the final norm), weight (V, H) the lm_head weight,
    labels (...) token ids; labels == ignore_index get log-prob 0 and no gradient. Gradients flow
    to hidden and weight (if it requires grad). impl: "chunked" (torch) or "triton".
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    lead = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1)
    valid = y != ignore_index
    logp, ent = _ChunkedLogprob.apply(h, weight.to(h.dtype), torch.where(valid, y, -1),
                                      chunk_size, float(temperature), _backend(impl))
    return logp.masked_fill(~valid, 0.0).view(lead), ent.view(lead)


def logprobs_and_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, impl: str = "naive",
                         chunk_size: int = 4096, temperature: float = 1.0,
                         ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Dispatch on impl: "naive" | "chunked" | "triton" (cfg.kernels.logprob)."""
    if impl == "naive":
        return naive_logprobs_and_entropy(hidden, weight, labels, temperature, ignore_index)
    return chunked_logprobs_and_entropy(hidden, weight, labels, chunk_size, temperature, ignore_index, impl)


def hidden_states_and_head(model: nn.Module, **inputs) -> tuple[Tensor, Tensor]:
    """(final hidden states (B, T, H), lm_head weight (V, H)) of a transformers causal LM, possibly
    peft-wrapped, without computing logits. For models whose logits are hidden @ lm_head^T
    (Qwen3-MoE, Mixtral: no soft-capping or logit scaling)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None or hasattr(head, "base_layer"):
        raise ValueError("expected a plain bias-free nn.Linear lm_head (not a LoRA target)")
    return base.model(**inputs).last_hidden_state, head.weight
