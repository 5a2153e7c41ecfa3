"""Losses, training loop and evaluation of the reward model.

- pairs (preferences, corrections): Bradley–Terry, ``-log sigmoid(r(chosen) - r(rejected))``;
- points (thumbs, ratings): binary cross-entropy of ``sigmoid(r)`` against the label in [0, 1].

Both kinds mix in one minibatch; a minibatch is one forward over all its sequences.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from looprl.reward.data import Example
from looprl.reward.model import RewardModel


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


def batch_loss(model: RewardModel, batch: list[Example]) -> torch.Tensor:
    """Mean loss of a mixed minibatch (one forward pass over all sequences)."""
    prompts, texts = _flatten(batch)
    scores = model(*model.encode(prompts, texts))
    losses, i = [], 0
    for ex in batch:
        if ex.is_pair:
            losses.append(-F.logsigmoid(scores[i] - scores[i + 1]))
            i += 2
        else:
            losses.append(F.binary_cross_entropy_with_logits(scores[i], scores.new_tensor(float(ex.label))))
            i += 1
    return torch.stack(losses).mean()


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    loss: float = float("nan")


def train(model: RewardModel, examples: list[Example], *, lr: float, batch_size: int, epochs: int, seed: int,
          max_grad_norm: float = 1.0, progress: bool = False, desc: str = "reward update") -> TrainStats:
    """A few epochs of AdamW over ``examples`` (shuffled with ``seed``); returns the last-epoch loss."""
    stats = TrainStats()
    if not examples:
        return stats
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order = list(examples)
    n_batches = math.ceil(len(order) / batch_size)
    bar = None
    if progress:
        bar = tqdm(total=epochs * n_batches, desc=desc, unit="batch", leave=False)
    model.train()
    try:
        for _ in range(epochs):
            rng.shuffle(order)
            total, count = 0.0, 0
            for b in range(n_batches):
                batch = order[b * batch_size: (b + 1) * batch_size]
                loss = batch_loss(model, batch)
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
            stats.loss = total / max(1, count)
        stats.examples = len(examples)
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    return stats


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
    per_example: dict[str, float] = field(default_factory=dict)  # event_id -> 1 correct / 0 wrong (pairs)

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
        d = {"pairs": self.pairs, "pair_accuracy": self.pair_accuracy, "points": self.points,
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
    t_scores, t_labels, p_scores, p_labels = [], [], [], []
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
            if ex.kind == "thumbs":
                t_scores.append(scores[i])
                t_labels.append(ex.label)
            res.points += 1
            i += 1
    if res.pairs:
        res.pair_accuracy = correct / res.pairs
    res.thumbs_auc = auc(t_scores, t_labels)
    res.point_auc = auc(p_scores, p_labels)
    return res
