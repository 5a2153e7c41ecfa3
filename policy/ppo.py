"""PPO for language models, the math only (CleanRL-style; no model, no I/O).

One episode = one completion. Token j of a completion is an action; its reward is

    r_j = -kl_coef * (log pi(a_j) - log pi_base(a_j))      (+ reward-model score on the last token)

which is the per-token KL penalty of Ziegler et al. (2019). Advantages come from GAE over the
completion's tokens; the policy loss is the clipped surrogate, the value loss is clipped too.
All tensors here are (B, N) over completion tokens with a 0/1 mask (1 up to and including eos).

Served answers (off-policy, ``policy/served.py``) join a batch with a user label instead of a
reward-model score (``label_scores``) and were sampled by another policy, pi_behaviour (the
version that served them). The PPO ratio stays pi / pi_old, pi_old being the policy at the start
of the step (the "proximal" policy), and each served token's policy-gradient term is multiplied by
a truncated importance weight ``truncated_is_weights`` = min(pi_old / pi_behaviour, cap): the
decoupled PPO objective of AReaL (inclusionAI/AReaL, areal/utils/functional.py
``ppo_actor_loss_fn``, behaviour weight against the proximal log-probs) with verl's truncation of
the weight instead of dropping the token (volcengine/verl, verl/trainer/ppo/core_algos.py,
``rollout_is_weights`` multiplying ``pg_losses``). Rollout tokens have weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect critic, <= 0 is no better than a constant."""
    var_y = masked_var(returns, mask)
    if var_y.item() < 1e-12:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_y)


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge the KL coefficient so the per-episode KL tracks `target`.

    coef <- max(floor, coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon))

    The floor keeps a leash on runs that continue one another: each starts from the coefficient the
    run before it ended with, which the controller lowers while the KL is under target, and a run
    that starts near no leash at all overshoots the target faster than the clipped update can
    raise it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int, floor: float = 0.0):
        self.floor = float(floor)
        self.value, self.target, self.horizon = max(float(init_kl_coef), self.floor), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.floor)
        return self.value

    def start_at(self, coef: float) -> None:
        """Continue from another run's coefficient (never below the floor)."""
        self.value = max(float(coef), self.floor)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean/std of reward-model scores (Welford, over every score seen this run).

    Scores are standardized with it before PPO so that the KL coefficient means the same thing
    for any reward model's scale (Ziegler et al. normalize the reward model the same way)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        var = self.m2 / (self.count - 1) if self.count > 1 else 0.0
        return var ** 0.5 if var > 1e-12 else 1.0  # constant scores so far: leave the scale alone

    def standardize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def token_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                  kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards and per-token KL (both (B, N)); the score lands on each completion's last token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards)
    return rewards * mask, kl


def label_scores(labels: Tensor, moments: "RunningMoments", scale: float) -> Tensor:
    """A served answer's user label (0 = thumbs down .. 1 = thumbs up) as a reward-model score:

        score = mean + scale * (2 * label - 1) * std

    with the running mean/std of the reward model's scores, so a thumbs-up is worth ``scale``
    standard deviations above the average rollout and a thumbs-down as much below it, on the
    scale the KL coefficient is tuned for (after standardization it is just scale * (2 label - 1))."""
    return moments.mean + scale * (2.0 * labels.double() - 1.0) * moments.std


def cap_degenerate(scores: Tensor, degenerate: Tensor, moments: "RunningMoments", penalty: float) -> Tensor:
    """Scores with every degenerate answer's (``degenerate``: (B,) bool) capped at ``penalty``
    standard deviations below the running mean of the reward model's scores:

        score = min(score, mean - penalty * std)

    so PPO never climbs towards answers the gate rejects, however a reward model learned from a
    few labels scores them; a degenerate answer already scored lower keeps its score."""
    floor = torch.full_like(scores, moments.mean - penalty * moments.std)
    return torch.where(degenerate.to(scores.device), torch.minimum(scores, floor), scores)


def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                         cap: float) -> tuple[Tensor, Tensor]:
    """Per-token importance weights w = min(pi_old / pi_behaviour, cap) of tokens another policy
    sampled, and the untruncated ratios (for diagnostics). Both (B, N), 1 where mask is 0; no
    gradient (the weights are data, like the advantages)."""
    with torch.no_grad():
        ratio = torch.exp(old_logprobs - behaviour_logprobs)
        ratio = torch.where(mask.bool(), ratio, torch.ones_like(ratio))
        return ratio.clamp(max=cap), ratio


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over each completion; returns (advantages, returns)."""
    n = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        # the value after the final token is 0: the episode ends at eos or at max_new_tokens
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < n else 0.0)
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


@dataclass
class LossOut:
    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def ppo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
    values: Tensor, old_values: Tensor, returns: Tensor,
    entropy: Tensor, mask: Tensor,
    clip_range: float, value_clip_range: float, vf_coef: float, ent_coef: float,
    is_weights: Tensor | None = None,
) -> LossOut:
    """is_weights: per-token importance weights of off-policy tokens (``truncated_is_weights``;
    1 for on-policy ones), multiplying each token's clipped policy-gradient term; None: all 1."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    pg = torch.maximum(pg1, pg2)
    if is_weights is not None:
        # decoupled PPO: the clip keeps pi near pi_old, the weight corrects pi_old vs pi_behaviour
        pg = is_weights * pg
    policy_loss = masked_mean(pg, mask)

    v_clipped = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
    value_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)

    ent = masked_mean(entropy, mask)
    loss = policy_loss + vf_coef * value_loss - ent_coef * ent
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)  # k3 estimator, >= 0
    return LossOut(loss, policy_loss, value_loss, ent, clip_fraction, approx_kl)
