"""Losses, training loop and evaluation of the reward model.

- pairs (preferences, corrections): Bradley–Terry, ``-log sigmoid(r(chosen) - r(rejected))``;
  a correction (the user's edit preferred over the served answer) weighs ``correction_weight``;
- points (thumbs, ratings): binary cross-entropy of ``sigmoid(r)`` against the label in [0, 1];
  a thumb weighs ``thumbs_weight`` (a coin flip of the user's P(up), where a pair says which of
  two answers is better).

Both kinds mix in one minibatch; a minibatch is one forward over its sequences (those of
examples weighted 0 left out). With an ensemble of K heads the shared features learn from the
heads' mean score, and each head has its own loss on the (detached) features, every example
weighted by that head's bootstrap weight (Poisson(1), fixed per (seed, event id, head), so a
replayed example keeps its weight); see ``batch_loss``. One head: the plain loss. A model with
several LoRA adapters (``reward.ensemble_adapters``) trains each adapter and its heads on its own,
as a separate model from its own random start and its own shuffle: ``train``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from looprl.reward.data import Example
from looprl.reward.model import RewardModel
from looprl.reward.skill import placements


def _flatten(batch: list[Example]) -> tuple[list[str], list[str]]:
    prompts, texts = [], []
    for ex in batch:
        if ex.is_pair:
            prompts += [ex.prompt, ex.prompt]
            texts += [ex.chosen, ex.rejected]
        else:
            prompts.append(ex.prompt)
            texts.append(ex.completion)
    return prompts, texts


# Bradley-Terry sees only score differences, so a pair leaves each head's offset free to drift, and
# the heads' spread on familiar answers would be their arbitrary offsets rather than doubt. A small
# penalty on the pair's summed score (Eisenstein et al. 2023, "Helping or herding?") pins the
# offsets without touching the margin, so the heads agree where there was data.
CENTERING = 0.01


def bootstrap_weight(event_id: str, head: int, seed: int) -> int:
    """Head ``head``'s Poisson(1) bootstrap count of an example: a fixed function of (seed, event
    id, head), the same in every process and every update that trains (or replays) it."""
    h = hashlib.blake2b(f"{seed}:{event_id}:{head}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0 ** 64
    k, p = 0, math.exp(-1.0)  # inverse CDF of Poisson(1)
    cdf = p
    while u >= cdf and k < 20:
        k += 1
        p /= k
        cdf += p
    return k


def example_weights(batch: list[Example], n_heads: int, seed: int, first_head: int = 0) -> torch.Tensor:
    """(B, K) bootstrap weights of heads ``first_head`` .. ``first_head + K - 1`` (an adapter's
    heads are numbered after the previous adapters'); all ones for a single head (no bootstrap)."""
    if n_heads == 1:
        return torch.ones(len(batch), 1)
    return torch.tensor([[float(bootstrap_weight(ex.event_id, first_head + k, seed)) for k in range(n_heads)]
                         for ex in batch])


def _losses(scores: torch.Tensor, batch: list[Example]) -> torch.Tensor:
    """(B, K) per-example losses of (S, K) scores (pairs: two rows each, chosen first)."""
    losses, i = [], 0
    for ex in batch:
        if ex.is_pair:
            losses.append(-F.logsigmoid(scores[i] - scores[i + 1]) + CENTERING * (scores[i] + scores[i + 1]) ** 2)
            i += 2
        else:
            losses.append(F.binary_cross_entropy_with_logits(
                scores[i], scores.new_full(scores[i].shape, float(ex.label)), reduction="none"))
            i += 1
    return torch.stack(losses)


def kind_weights(batch: list[Example], correction_weight: float, thumbs_weight: float) -> torch.Tensor:
    """(B,) loss weight of each example by its kind: corrections and thumbs weighed, the rest 1."""
    by_kind = {"correction": correction_weight, "thumbs": thumbs_weight}
    return torch.tensor([by_kind.get(ex.kind, 1.0) for ex in batch])


def batch_loss(model: RewardModel, batch: list[Example], *, correction_weight: float = 1.0,
               thumbs_weight: float = 1.0, bootstrap_seed: int = 0) -> torch.Tensor:
    """Loss of a mixed minibatch (one forward pass over its weighted examples' sequences) for the
    model's active adapter (``RewardModel.using``), each example weighted by its kind (``kind_weights``).

    The shared features (LoRA) learn from the ensemble's mean score, as one head would: K heads
    pulling the features each their own way learn them slower, which sparse feedback cannot afford.
    Each head also learns on its own, on detached features, from its bootstrap-weighted loss (mean
    over examples of weight x loss, then over heads): that is where the heads differ."""
    kind_w = kind_weights(batch, correction_weight, thumbs_weight)
    # An example of weight 0 adds nothing to the loss or its gradient, so it skips the forward pass
    # (the sparse profile's thumbs: about two thirds of its examples). The sums still divide by the
    # whole batch's size, so loss and gradient are those of every example forwarded. A batch of
    # weight-0 examples only is forwarded whole: its zero loss keeps a graph, so the optimiser steps
    # as it did before.
    size = len(batch)
    kept = [i for i in range(size) if kind_w[i] != 0]
    if kept and len(kept) < size:
        batch, kind_w = [batch[i] for i in kept], kind_w[kept]
    prompts, texts = _flatten(batch)
    x, mask = model.encode(prompts, texts)
    if model.classifier or model.head.n_heads == 1:
        per = _losses(model.members(x, mask), batch)  # (B, 1)
        return (per * kind_w.to(per.device)[:, None]).sum() / size
    feats = model.features(x, mask)
    kind_w = kind_w.to(feats.device)
    shared = (_losses(model.head(feats).mean(dim=-1, keepdim=True), batch)[:, 0] * kind_w).sum() / size
    per = _losses(model.head(feats.detach()), batch)  # (B, K)
    w = example_weights(batch, per.shape[1], bootstrap_seed, first_head=model.active_adapter * per.shape[1]).to(per.device)
    return shared + (per * w * kind_w[:, None]).sum(dim=0).mean() / size


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    loss: float = float("nan")


def train(model: RewardModel, examples: list[Example], *, lr: float, batch_size: int, epochs: int, seed: int,
          max_grad_norm: float = 1.0, progress: bool = False, desc: str = "reward update",
          correction_weight: float = 1.0, thumbs_weight: float = 1.0, bootstrap_seed: int = 0) -> TrainStats:
    """A few epochs of AdamW over ``examples`` (shuffled with ``seed``); returns the last-epoch loss
    (the adapters' mean). ``bootstrap_seed`` keys the heads' bootstrap weights: keep it fixed
    across updates. Each adapter trains on its own, with its own optimizer and shuffle."""
    stats = TrainStats()
    if not examples:
        return stats
    n_batches = math.ceil(len(examples) / batch_size)
    bar = None
    if progress:
        bar = tqdm(total=model.n_adapters * epochs * n_batches, desc=desc, unit="batch", leave=False)
    losses = []
    model.train()
    try:
        for i in range(model.n_adapters):
            with model.using(i):
                # adapter 0 keeps the shuffle of a one-adapter model; the others get their own
                rng = random.Random(seed if i == 0 else f"{seed}:adapter{i}")
                losses.append(_train_active(model, examples, stats, bar, lr=lr, batch_size=batch_size, epochs=epochs,
                                            rng=rng, max_grad_norm=max_grad_norm, correction_weight=correction_weight,
                                            thumbs_weight=thumbs_weight, bootstrap_seed=bootstrap_seed))
        stats.loss = sum(losses) / len(losses)
        stats.examples = len(examples)
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    return stats


def _train_active(model: RewardModel, examples: list[Example], stats: TrainStats, bar: tqdm | None, *, lr: float,
                  batch_size: int, epochs: int, rng: random.Random, max_grad_norm: float, correction_weight: float,
                  thumbs_weight: float, bootstrap_seed: int) -> float:
    """``epochs`` epochs of a fresh AdamW on the active adapter; its last-epoch loss (steps counted in ``stats``)."""
    params = model.adapter_parameters(model.active_adapter)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(examples)
    n_batches = math.ceil(len(order) / batch_size)
    total, count = 0.0, 0
    for _ in range(epochs):
        rng.shuffle(order)
        total, count = 0.0, 0
        for b in range(n_batches):
            batch = order[b * batch_size: (b + 1) * batch_size]
            loss = batch_loss(model, batch, correction_weight=correction_weight, thumbs_weight=thumbs_weight,
                              bootstrap_seed=bootstrap_seed)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reward training loss became {loss.item()} (learning rate too high?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            total += loss.item() * len(batch)
            count += len(batch)
            stats.steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def auc(scores: list[float], labels: list[float]) -> float | None:
    """ROC AUC of scores for binary labels (ties count one half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y >= 0.5]
    neg = [s for s, y in zip(scores, labels) if y < 0.5]
    if not pos or not neg:
        return None
    # Rank-sum (Mann-Whitney) with average ranks for ties: O(n log n).
    allv = sorted((s, i) for i, s in enumerate(pos + neg))
    ranks = [0.0] * len(allv)
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[allv[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_pos = sum(ranks[: len(pos)])
    return (rank_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


@dataclass
class EvalResult:
    pairs: int = 0
    pair_accuracy: float | None = None
    points: int = 0
    thumbs_auc: float | None = None
    point_auc: float | None = None  # thumbs and ratings together, ratings binarised at label >= 0.5
    # The counts behind the numbers, for confidence intervals (reward.skill): right pairs (ties
    # one half) and the point AUC's positives and negatives.
    pairs_correct: float = 0.0
    points_pos: int = 0
    points_neg: int = 0
    per_example: dict[str, float] = field(default_factory=dict)  # event_id -> 1 correct / 0 wrong (pairs)
    # event_id -> (positive, placement value) of each point (reward.skill.placements), for paired comparisons
    per_point: dict[str, tuple[bool, float]] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """One number for the publish decision: pair accuracy and point AUC weighted by counts."""
        parts = []
        if self.pair_accuracy is not None:
            parts.append((self.pair_accuracy, self.pairs))
        if self.point_auc is not None:
            parts.append((self.point_auc, self.points))
        if not parts:
            return None
        return sum(v * n for v, n in parts) / sum(n for _, n in parts)

    def as_dict(self, prefix: str = "") -> dict[str, float | int | None]:
        d = {"pairs": self.pairs, "pair_accuracy": self.pair_accuracy, "pairs_correct": self.pairs_correct,
             "points": self.points, "points_pos": self.points_pos, "points_neg": self.points_neg,
             "thumbs_auc": self.thumbs_auc, "point_auc": self.point_auc, "score": self.score}
        return {prefix + k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def evaluate(model: RewardModel, examples: list[Example], batch_size: int = 64) -> EvalResult:
    """Pair accuracy (ties count one half) and AUC of the points, with the model frozen."""
    res = EvalResult()
    if not examples:
        return res
    prompts, texts = _flatten(examples)
    scores = model.score(prompts, texts, batch_size=batch_size).tolist()
    i, correct = 0, 0.0
    t_scores, t_labels, p_scores, p_labels, p_ids = [], [], [], [], []
    for ex in examples:
        if ex.is_pair:
            diff = scores[i] - scores[i + 1]
            c = 1.0 if diff > 0 else (0.5 if diff == 0 else 0.0)
            res.per_example[ex.event_id] = c
            correct += c
            res.pairs += 1
            i += 2
        else:
            p_scores.append(scores[i])
            p_labels.append(ex.label)
            p_ids.append(ex.event_id)
            if ex.kind == "thumbs":
                t_scores.append(scores[i])
                t_labels.append(ex.label)
            res.points += 1
            i += 1
    if res.pairs:
        res.pair_accuracy = correct / res.pairs
    res.pairs_correct = correct
    res.thumbs_auc = auc(t_scores, t_labels)
    res.point_auc = auc(p_scores, p_labels)
    if res.point_auc is not None:
        positive = [y >= 0.5 for y in p_labels]
        res.points_pos = sum(positive)
        res.points_neg = len(positive) - res.points_pos
        res.per_point = {e: (y, v) for e, y, v in zip(p_ids, positive, placements(p_scores, positive))}
    return res
