"""Sampling completions from the current policy.

A plain KV-cached sampling loop instead of `generate()`: every random draw comes from the
`torch.Generator` the caller passes (seeded from (seed, step, shard)), so a resumed run samples
exactly what an uninterrupted one does, and there is no hidden global RNG.

Prompts are conversations rendered with the base's chat template (``render_prompt_ids``, as
serving renders them); an answer ends at any of ``stop_ids`` (the template's end of turn and the
eos ids), which is part of the response. Layout of a rollout (P = longest prompt, N =
max_new_tokens), prompts left-padded:

    input_ids  [pad pad p1 p2 p3 | r1 r2 eot pad pad]      (B, P + N)
    response_mask (B, N): 1 for r1 r2 eot, 0 after the end
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from looprl.ops.core.chat import Chat
from looprl.policy.forward import _causal_lm, position_ids_for
from looprl.policy.model import model_device, render_prompt_ids, stop_token_ids

REPEAT_MIN_TOKENS = 4  # shorter answers are judged by gate.min_answer_tokens alone


@dataclass
class Rollout:
    prompts: list[Chat]
    completions: list[str]
    input_ids: Tensor  # (B, P + N) int64
    attention_mask: Tensor  # (B, P + N) int64
    response_mask: Tensor  # (B, N) float32, 1 on generated tokens (up to and including the stop token)
    prompt_len: int  # P
    scores: Tensor | None = None  # (B,) reward-model scores, filled by the scorer
    timings: dict[str, float] = field(default_factory=dict)
    # Served answers (policy/served.py) only; None for rollouts this policy sampled. labels: (B,)
    # the users' labels in [0, 1] (NaN on rollout rows of a mixed batch); behaviour_logprobs:
    # (B, N) the log-probs the served tokens were sampled with, at temperature 1.
    labels: Tensor | None = None
    behaviour_logprobs: Tensor | None = None
    # (B,) True on answers the gate calls degenerate (`degenerate_flags`), set by the rollout worker;
    # False on the served rows of a mixed batch.
    degenerate: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def response_labels_slice(self) -> slice:
        # log-prob index t predicts token t+1, so response token j sits at index P - 1 + j
        return slice(self.prompt_len - 1, self.prompt_len - 1 + self.response_mask.shape[1])

    def to(self, device: torch.device | str) -> "Rollout":
        """The same rollout with its tensors on ``device`` (rollouts travel between processes on
        the CPU; the learner moves them to its model's device)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device), scores=move(self.scores), labels=move(self.labels),
            behaviour_logprobs=move(self.behaviour_logprobs), degenerate=move(self.degenerate))

    def served_rows(self) -> Tensor | None:
        """(B,) True on rows that are served answers; None when the batch holds rollouts only."""
        return None if self.labels is None else ~torch.isnan(self.labels)


def answer_tokens(ro: Rollout, stops: list[int]) -> list[list[int]]:
    """Each answer's generated token ids, the end of turn / stop tokens left out."""
    stop_set, out = set(stops), []
    for i in range(len(ro.completions)):
        n = int(ro.response_mask[i].sum().item())
        out.append([t for t in ro.input_ids[i, ro.prompt_len:ro.prompt_len + n].tolist() if t not in stop_set])
    return out


def degenerate_flags(tokens: list[list[int]], completions: list[str], min_answer_tokens: int,
                     min_distinct_token_ratio: float) -> tuple[list[bool], list[bool]]:
    """(empty or near-empty, repetitive) per answer; the rule of the gate's module docstring (policy/gate.py)."""
    short = [len(t) < min_answer_tokens or not c.strip() for t, c in zip(tokens, completions)]
    repetitive = [len(t) >= REPEAT_MIN_TOKENS and len(set(t)) < min_distinct_token_ratio * len(t) for t in tokens]
    return short, repetitive


def encode_prompts(tok, prompts: list[Chat | str], max_prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids and mask of the rendered prompts; prompts longer than max_prompt_tokens
    keep their last tokens."""
    rows = []
    for p in prompts:
        ids = render_prompt_ids(tok, p)[-max_prompt_tokens:]
        rows.append(ids or [tok.eos_token_id])  # an empty prompt still needs one token to condition on
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model: nn.Module,
    tok,
    prompts: list[Chat | str],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    max_prompt_tokens: int = 96,
    stop_ids: list[int] | None = None,
) -> Rollout:
    """Sample one completion per prompt (a ``Chat``, or a user's text). Runs on the model's
    device; the returned rollout's tensors are on the CPU."""
    lm = _causal_lm(model)
    dev = model_device(lm)
    chats = [Chat.parse(p) for p in prompts]
    ids, mask = (t.to(dev) for t in encode_prompts(tok, chats, max_prompt_tokens))
    stops = torch.tensor(stop_ids if stop_ids else stop_token_ids(tok, lm), dtype=torch.long, device=dev)
    gen = device_generator(generator, dev)
    bsz, plen = ids.shape
    pad = tok.pad_token_id
    out_tokens = torch.full((bsz, max_new_tokens), pad, dtype=torch.long, device=dev)
    alive = torch.ones(bsz, dtype=torch.bool, device=dev)
    resp_mask = torch.zeros((bsz, max_new_tokens), dtype=torch.float32, device=dev)

    full_mask = mask
    step_ids, positions, cache = ids, position_ids_for(mask), None
    for t in range(max_new_tokens):
        # logits_to_keep=1: the prefill computes the last position's logits only, not (B, P, V)
        out = lm(input_ids=step_ids, attention_mask=full_mask, position_ids=positions,
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        out_tokens[:, t] = nxt
        resp_mask[:, t] = alive.float()
        alive = alive & ~torch.isin(nxt, stops)
        if not alive.any():
            break
        # finished rows keep feeding pad tokens; they are masked out of attention and of the loss
        full_mask = torch.cat([full_mask, resp_mask[:, t:t + 1].long()], dim=1)
        positions = position_ids_for(full_mask)[:, -1:]
        step_ids = nxt[:, None]

    ids, mask, out_tokens, resp_mask = (x.cpu() for x in (ids, mask, out_tokens, resp_mask))
    input_ids = torch.cat([ids, out_tokens], dim=1)
    attention_mask = torch.cat([mask, resp_mask.long()], dim=1)
    completions, stop_set = [], set(stops.tolist())
    for i in range(bsz):
        n = int(resp_mask[i].sum().item())
        toks = [x for x in out_tokens[i, :n].tolist() if x not in stop_set]
        completions.append(tok.decode(toks, skip_special_tokens=True))
    return Rollout(chats, completions, input_ids, attention_mask, resp_mask, plen)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself on its own device; for a model elsewhere (a GPU), a generator there
    seeded from one draw of ``generator``: still a function of the caller's seed."""
    if torch.device(generator.device).type == device.type:
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
