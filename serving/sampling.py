"""Next-token selection for a batch of sequences with per-sequence sampling parameters.

Greedy rows (temperature 0) take the argmax, so batched greedy decoding is deterministic and
equals one-at-a-time decoding. Sampling rows apply temperature, then nucleus (top-p) filtering.
A request with a ``seed`` draws from its own generator, so its output does not depend on which
other requests happen to share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks, tests)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters and (if seeded) its own RNG."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams) -> "RowSampler":
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator().manual_seed(params.seed)
        return cls(params, gen)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's nucleus. ``top_p``: (B,) in (0, 1]."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is kept if the mass of the tokens ranked strictly above it is < top_p;
    # the top token is therefore always kept.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(-1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, rows: list[RowSampler], default_generator: torch.Generator | None = None) -> list[int]:
    """Pick one token per row from ``logits`` (B, V) (float32)."""
    logits = logits.float()
    out = torch.argmax(logits, dim=-1)
    sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sample_idx:
        idx = torch.tensor(sample_idx)
        temps = torch.tensor([rows[i].params.temperature for i in sample_idx]).unsqueeze(-1)
        top_p = torch.tensor([rows[i].params.top_p for i in sample_idx])
        sub = logits.index_select(0, idx) / temps
        if bool((top_p < 1.0).any()):
            sub = top_p_filter(sub, top_p)
        probs = torch.softmax(sub, dim=-1)
        shared = [j for j, i in enumerate(sample_idx) if rows[i].generator is None]
        if shared:
            picks = torch.multinomial(probs[shared], 1, generator=default_generator).squeeze(-1)
            for j, tok in zip(shared, picks.tolist()):
                out[sample_idx[j]] = tok
        for j, i in enumerate(sample_idx):
            gen = rows[i].generator
            if gen is not None:
                out[i] = torch.multinomial(probs[j], 1, generator=gen).item()
    return out.tolist()
