"""Sampling completions from the current policy.

A plain KV-cached sampling loop instead of `generate()`: every random draw comes from the
`torch.Generator` the caller passes (seeded from (seed, step, shard)), so a resumed run samples
exactly what an uninterrupted one does, and there is no hidden global RNG.

Layout of a rollout (P = longest prompt, N = max_new_tokens), prompts left-padded:

    input_ids  [pad pad p1 p2 p3 | r1 r2 eos pad pad]      (B, P + N)
    response_mask (B, N): 1 for r1 r2 eos, 0 after the end
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from looprl.policy.forward import _causal_lm, position_ids_for


@dataclass
class Rollout:
    prompts: list[str]
    completions: list[str]
    input_ids: Tensor  # (B, P + N) int64
    attention_mask: Tensor  # (B, P + N) int64
    response_mask: Tensor  # (B, N) float32, 1 on generated tokens (up to and including eos)
    prompt_len: int  # P
    scores: Tensor | None = None  # (B,) reward-model scores, filled by the scorer
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def response_labels_slice(self) -> slice:
        # log-prob index t predicts token t+1, so response token j sits at index P - 1 + j
        return slice(self.prompt_len - 1, self.prompt_len - 1 + self.response_mask.shape[1])


def encode_prompts(tok, texts: list[str], max_prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids and mask; prompts longer than max_prompt_tokens keep their last tokens."""
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
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
    prompts: list[str],
    rendered: list[str],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    max_prompt_tokens: int = 96,
) -> Rollout:
    """Sample one completion per prompt. `rendered` are the prompts as the model sees them."""
    lm = _causal_lm(model)
    ids, mask = encode_prompts(tok, rendered, max_prompt_tokens)
    bsz, plen = ids.shape
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out_tokens = torch.full((bsz, max_new_tokens), pad, dtype=torch.long)
    alive = torch.ones(bsz, dtype=torch.bool)
    resp_mask = torch.zeros((bsz, max_new_tokens), dtype=torch.float32)

    full_mask = mask
    step_ids, positions, cache = ids, position_ids_for(mask), None
    for t in range(max_new_tokens):
        out = lm(input_ids=step_ids, attention_mask=full_mask, position_ids=positions,
                 past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        out_tokens[:, t] = nxt
        resp_mask[:, t] = alive.float()
        alive = alive & (nxt != eos)
        if not alive.any():
            break
        # finished rows keep feeding pad tokens; they are masked out of attention and of the loss
        full_mask = torch.cat([full_mask, resp_mask[:, t:t + 1].long()], dim=1)
        positions = position_ids_for(full_mask)[:, -1:]
        step_ids = nxt[:, None]

    input_ids = torch.cat([ids, out_tokens], dim=1)
    attention_mask = torch.cat([mask, resp_mask.long()], dim=1)
    completions = []
    for i in range(bsz):
        n = int(resp_mask[i].sum().item())
        toks = [x for x in out_tokens[i, :n].tolist() if x != eos]
        completions.append(tok.decode(toks, skip_special_tokens=True))
    return Rollout(list(prompts), completions, input_ids, attention_mask, resp_mask, plen)
