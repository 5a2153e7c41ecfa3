"""Next-token selection for a batch of sequences with per-sequence sampling parameters.

Per row, in vLLM's order: ``logit_bias`` is added and the presence/frequency penalties are
subtracted (OpenAI: ``penalty * (count > 0)`` and ``penalty * count`` for each token already
generated in this answer); greedy rows (temperature 0) then take the argmax, so penalties and bias
change greedy answers too; sampling rows divide by their temperature, keep their ``top_k`` best
tokens and their top-p nucleus, and draw. Every step is one batched tensor operation over the rows
that use it; the per-row state is only each penalized row's token counts, kept sparse (the distinct
tokens of its answer, not a vocabulary-wide vector), so a penalty costs in proportion to the answer.

Batched greedy decoding is deterministic and equals one-at-a-time decoding. A request with a
``seed`` draws from its own generator, so its output does not depend on which other requests
happen to share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# OpenAI's ranges for the penalties and for a logit bias, and its cap on the biased tokens.
PENALTY_LIMIT = 2.0
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_TOKENS = 300
# OpenAI's cap on the alternatives returned per token (chat's top_logprobs).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks, tests)
    top_k: int = 0  # vLLM's extension: sample among the k most likely tokens; 0 or -1 = all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # Most likely alternatives to report per generated token (their raw log-probs, see
    # ``token_logprobs``); 0: none. The sampled token's own log-prob is always computed.
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 1, or 0 or -1 for no limit, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -PENALTY_LIMIT <= v <= PENALTY_LIMIT):
                raise ValueError(f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {v}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} tokens, over the limit of {MAX_LOGIT_BIAS_TOKENS}")
        for tok, bias in self.logit_bias:
            if tok < 0:
                raise ValueError(f"logit_bias: token id {tok} is negative")
            if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"logit_bias: the bias of token {tok} must be in "
                                 f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters, (if seeded) its own RNG and (if penalized) how
    many times it generated each token: ``seen_ids[:seen]`` with their ``seen_counts``."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)
    bias_ids: torch.Tensor | None = None  # logit_bias as tensors, built once
    bias_values: torch.Tensor | None = None
    seen: int = 0
    seen_ids: torch.Tensor | None = None
    seen_counts: torch.Tensor | None = None
    _slot: dict[int, int] = field(default_factory=dict)  # token id -> its place in seen_ids

    @classmethod
    def create(cls, params: SamplingParams) -> "RowSampler":
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator().manual_seed(params.seed)
        row = cls(params, gen)
        if params.logit_bias:
            row.bias_ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
            row.bias_values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        return row

    def observe(self, token: int) -> None:
        """Count a token of this answer (only penalized rows keep counts)."""
        if not self.params.penalized:
            return
        slot = self._slot.get(token)
        if slot is not None:
            self.seen_counts[slot] += 1.0
            return
        if self.seen_ids is None or self.seen == len(self.seen_ids):  # grow by doubling
            size = max(64, 2 * self.seen)
            ids, counts = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.float32)
            if self.seen:
                ids[: self.seen], counts[: self.seen] = self.seen_ids[: self.seen], self.seen_counts[: self.seen]
            self.seen_ids, self.seen_counts = ids, counts
        self.seen_ids[self.seen], self.seen_counts[self.seen] = token, 1.0
        self._slot[token] = self.seen
        self.seen += 1


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


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every token below each row's k-th largest logit. ``top_k``: (B,) long, in
    [1, V] (V: no limit). Ties with the k-th logit are kept."""
    vocab = logits.shape[-1]
    limited = top_k < vocab
    if not bool(limited.any()):
        return logits
    kmax = int(top_k[limited].max())
    best = torch.topk(logits, kmax, dim=-1).values  # (B, kmax), descending
    kth = best.gather(-1, (top_k.clamp(max=kmax) - 1).unsqueeze(-1))
    kth = kth.masked_fill(~limited.unsqueeze(-1), float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def adjust_logits(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """``logits`` (B, V) with each row's ``logit_bias`` added and its presence/frequency penalties
    subtracted, in place (a float32 copy of the model's logits)."""
    which, ids, values = [], [], []
    for i, r in enumerate(rows):
        if r.bias_ids is not None:
            which.append(torch.full((len(r.bias_ids),), i, dtype=torch.long))
            ids.append(r.bias_ids)
            values.append(r.bias_values)
        if r.params.penalized and r.seen:
            counts = r.seen_counts[: r.seen]
            which.append(torch.full((r.seen,), i, dtype=torch.long))
            ids.append(r.seen_ids[: r.seen])
            values.append(-(counts * r.params.frequency_penalty + r.params.presence_penalty))
    if ids:
        which_t, ids_t, values_t = torch.cat(which), torch.cat(ids), torch.cat(values)
        keep = ids_t < logits.shape[-1]  # ids are checked against the vocabulary before submit; never index past it
        logits.index_put_((which_t[keep], ids_t[keep]), values_t[keep], accumulate=True)
    return logits


def sample_next(logits: torch.Tensor, rows: list[RowSampler], default_generator: torch.Generator | None = None) -> list[int]:
    """Pick one token per row from ``logits`` (B, V), and count it in the row's state."""
    logits = logits.float()
    if any(r.bias_ids is not None or r.params.penalized for r in rows):
        logits = adjust_logits(logits.clone(), rows)
    out = torch.argmax(logits, dim=-1)
    sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sample_idx:
        vocab = logits.shape[-1]
        idx = torch.tensor(sample_idx)
        temps = torch.tensor([rows[i].params.temperature for i in sample_idx]).unsqueeze(-1)
        top_p = torch.tensor([rows[i].params.top_p for i in sample_idx])
        top_k = torch.tensor([rows[i].params.top_k if 0 < rows[i].params.top_k < vocab else vocab
                              for i in sample_idx], dtype=torch.long)
        sub = logits.index_select(0, idx) / temps
        sub = top_k_filter(sub, top_k)
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
    tokens = out.tolist()
    for r, t in zip(rows, tokens):
        r.observe(t)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The log-probability of each row's ``tokens[i]`` and, for rows with ``top[i] > 0``, its
    ``top[i]`` most likely tokens (id, log-prob), most likely first; ``[]`` for the other rows.

    Raw log-probs, as vLLM reports by default: ``log_softmax`` of the model's logits, at
    temperature 1 and before logit_bias, penalties, top-k and top-p. So they describe the model,
    whatever a request's sampling knobs; a trainer that corrects for off-policy data checks the
    logged sampling parameters to know whether the tokens were drawn from exactly this distribution.
    ``logits`` (B, V) float32. Costs one logsumexp and one gather; a top-k only for rows that ask."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1)).squeeze(1) - lse
    tops: list[list[tuple[int, float]]] = [[] for _ in tokens]
    want = max(top, default=0)
    if want > 0:
        rows = [i for i, k in enumerate(top) if k > 0]
        sub = torch.tensor(rows, dtype=torch.long)
        values, ids = torch.topk(logits.index_select(0, sub), min(want, logits.shape[-1]), dim=-1)
        values = values - lse.index_select(0, sub).unsqueeze(-1)
        for j, i in enumerate(rows):
            k = top[i]
            tops[i] = list(zip(ids[j, :k].tolist(), values[j, :k].tolist()))
    return picked.tolist(), tops
