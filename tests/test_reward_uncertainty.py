"""The reward model's ensemble of heads (uncertainty) and of independent LoRA adapters
(reward.ensemble_adapters), its loss weights (bootstrap, corrections) and the statistics of the
PPO start and publish gates (looprl.reward.skill)."""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone

import pytest
import torch
import torch.nn.functional as F

from looprl.ops.core.chat import Chat
from looprl.ops.sim.feedback import simulate_feedback
from looprl.policy.model import base_checksum
from looprl.reward.data import Example
from looprl.reward.model import KIND, WEIGHTS_FILE, RewardModel, RewardModelError, adapter_name, load_reward_model
from looprl.reward.skill import (Evidence, auc_estimate, auc_variance, paired_difference, pair_estimate, placements,
                                 ranking_skill, z_one_sided)
from looprl.reward.train import auc, batch_loss, bootstrap_weight, train
from looprl.storage.registry import Registry

torch.set_num_threads(1)
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def make_cfg(tiny_base_cfg):
    return lambda **reward: tiny_base_cfg(reward={"max_seq_len": 40, **reward})


def _pairs(n: int, seed: int) -> list[Example]:
    batch = simulate_feedback(n, seed=seed, mix={"preference": 1.0})
    return [Example(str(e.event_id), "preference", Chat.user(e.prompt), NOW, chosen=e.chosen_text, rejected=e.rejected_text)
            for e in batch.feedback]


def _disagreement(rm: RewardModel, prompts, a, b) -> float:
    """Median over pairs of the heads' spread of s(a) - s(b) relative to its ensemble mean: how
    much the members disagree about which answer is better (scale-free: heads differ in scale)."""
    d = rm.score_members(prompts, a) - rm.score_members(prompts, b)  # (K, n)
    return (d.std(dim=0, correction=0) / d.mean(dim=0).abs().clamp_min(1e-6)).median().item()


def test_ensemble_members_differ_and_disagree_more_off_the_training_data(make_cfg):
    rm = RewardModel.fresh(make_cfg(ensemble_heads=4), seed=1)
    assert rm.head.weight.shape[0] == rm.n_heads == 4
    train_ex = _pairs(48, seed=1)
    prompts = [e.prompt for e in train_ex]
    members = rm.score_members(prompts, [e.chosen for e in train_ex])
    assert members.shape == (4, 48) and members.dtype == torch.float32
    mean, std = rm.score_with_uncertainty(prompts, [e.chosen for e in train_ex])
    assert torch.allclose(mean, members.mean(0)) and torch.allclose(rm.score(prompts, [e.chosen for e in train_ex]), mean)
    assert torch.allclose(std, members.std(0, correction=0))

    train(rm, train_ex, lr=5e-3, batch_size=16, epochs=6, seed=0, bootstrap_seed=0)
    members = rm.score_members(prompts, [e.chosen for e in train_ex])
    # Members are different functions (own inits, own bootstrap weights), not copies.
    for i in range(4):
        for j in range(i + 1, 4):
            assert (members[i] - members[j]).abs().max() > 1e-2
    # On the pairs they learnt the heads agree which answer is better; on answers unlike the
    # training data (nonsense prompts and words) they do not. Measured over seeds 1-5: 0.16-0.27
    # on trained pairs, 0.59-1.8 on the unlike pairs.
    trained = _disagreement(rm, prompts, [e.chosen for e in train_ex], [e.rejected for e in train_ex])
    rng = random.Random(0)
    odd_p = [Chat.user("zq xv " * 6 + str(i)) for i in range(30)]
    words = ["blorp", "7", "%%", "quux", "the", "dog"]
    odd = [" " + " ".join(rng.choice(words) for _ in range(12)) for _ in range(60)]
    unlike = _disagreement(rm, odd_p, odd[:30], odd[30:])
    assert unlike > 1.5 * trained, (trained, unlike)


def test_one_head_versions_still_load_and_a_working_model_grows_heads(make_cfg, tmp_path):
    one = RewardModel.fresh(make_cfg(ensemble_heads=1), seed=2)
    src = one.save(tmp_path / "v1")
    from safetensors.torch import load_file
    assert load_file(str(src / WEIGHTS_FILE))["head.weight"].shape == (1, one.head.in_features)
    cfg = make_cfg(ensemble_heads=4)  # the configuration moved on to 4 heads
    Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base_checksum(cfg.base_path))
    loaded = load_reward_model(cfg)
    p, c = [Chat.user("describe the dog")] * 2, [" the dog is happy.", " the dog is sad."]
    assert loaded.n_heads == 1 and torch.allclose(loaded.score(p, c), one.score(p, c), atol=1e-6)
    assert torch.equal(loaded.score_with_uncertainty(p, c)[1], torch.zeros(2))
    # The updater's working model takes the old head and adds new ones around it.
    work = RewardModel.fresh(cfg, seed=3)
    work.load_trainable_state(one.trainable_state())
    assert work.n_heads == 1
    work.resize_heads(4)
    members = work.score_members(p, c)
    assert members.shape == (4, 2) and torch.allclose(members[0], one.score(p, c), atol=1e-6)
    assert (members[1:] - members[0]).abs().max() > 0  # nudged: free to diverge
    # A head whose tensors disagree with each other is refused, naming the tensors.
    state = one.trainable_state()
    state["head.bias"] = torch.zeros(3)
    with pytest.raises(RewardModelError, match=r"head.weight \(1, \d+\) / head.bias \(3,\)"):
        work.load_trainable_state(state, source="bad.safetensors")


def test_correction_weight_and_bootstrap_weights_in_the_loss(make_cfg, monkeypatch):
    rm = RewardModel.fresh(make_cfg(ensemble_heads=1), seed=4)
    pref, = _pairs(1, seed=3)
    corr = Example("c1", "correction", pref.prompt, NOW, chosen=pref.chosen, rejected=pref.rejected)
    with torch.no_grad():
        plain = batch_loss(rm, [pref], correction_weight=2.0)
        assert torch.allclose(batch_loss(rm, [pref], correction_weight=1.0), plain)  # pairs are not weighted
        assert torch.allclose(batch_loss(rm, [corr], correction_weight=2.0), 2 * plain)
        mixed = batch_loss(rm, [pref, corr], correction_weight=3.0)
        assert torch.allclose(mixed, (plain + 3 * plain) / 2)
        # A thumb weighs thumbs_weight (0: left out of the loss); pairs and ratings do not change.
        up = Example("t0", "thumbs", pref.prompt, NOW, completion=pref.chosen, label=1.0)
        rating = Example("r0", "rating", pref.prompt, NOW, completion=pref.chosen, label=1.0)
        thumb = batch_loss(rm, [up])
        assert thumb > 0 and torch.allclose(batch_loss(rm, [rating], thumbs_weight=0.25), thumb)
        assert torch.allclose(batch_loss(rm, [up], thumbs_weight=0.25), 0.25 * thumb)
        assert torch.allclose(batch_loss(rm, [pref, up], thumbs_weight=0.0), plain / 2)
        assert torch.allclose(batch_loss(rm, [pref], thumbs_weight=0.0), plain)

    # Bootstrap weights: Poisson(1), a fixed function of (seed, event, head).
    ids = [f"e{i}" for i in range(4000)]
    w = [bootstrap_weight(e, 0, 7) for e in ids]
    assert abs(sum(w) / len(w) - 1) < 0.05 and abs(sum(x == 0 for x in w) / len(w) - math.exp(-1)) < 0.03
    assert [bootstrap_weight(e, 0, 7) for e in ids[:50]] == w[:50]  # a replayed example keeps its weight
    assert [bootstrap_weight(e, 1, 7) for e in ids[:50]] != w[:50]  # another head, other weights
    # With K heads: the loss of the heads' mean score (what the shared features learn from) plus
    # the mean over heads of each head's bootstrap-weighted mean loss.
    rm4 = RewardModel.fresh(make_cfg(ensemble_heads=3), seed=5)
    thumbs = Example("t1", "thumbs", pref.prompt, NOW, completion=pref.chosen, label=1.0)
    batch = [pref, corr, thumbs]
    kind_w = torch.tensor([1.0, 2.0, 1.0])

    def losses(s):
        bt = -F.logsigmoid(s[0] - s[1]) + 0.01 * (s[0] + s[1]) ** 2
        return torch.stack([bt, bt, F.binary_cross_entropy_with_logits(s[4], torch.ones_like(s[4]), reduction="none")])

    texts = [pref.chosen, pref.rejected, pref.chosen, pref.rejected, pref.chosen]
    with torch.no_grad():
        s = rm4.members(*rm4.encode([pref.prompt] * 5, texts))
        w = torch.tensor([[bootstrap_weight(e.event_id, k, 9) for k in range(3)] for e in batch], dtype=torch.float32)
        want = (losses(s.mean(-1)) * kind_w).mean() + (losses(s) * w * kind_w[:, None]).mean(0).mean()
        assert torch.allclose(batch_loss(rm4, batch, correction_weight=2.0, bootstrap_seed=9), want, atol=1e-5)
    # The shared LoRA learns from the mean score only: its gradient is that of the mean's loss.
    lora = [p for n, p in rm4.named_parameters() if p.requires_grad and "lora_" in n]
    rm4.zero_grad()
    batch_loss(rm4, batch, correction_weight=2.0, bootstrap_seed=9).backward()
    got = [p.grad.clone() for p in lora]
    rm4.zero_grad()
    (losses(rm4.members(*rm4.encode([pref.prompt] * 5, texts)).mean(-1)) * kind_w).mean().backward()
    assert any(g.abs().sum() > 0 for g in got)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, lora))

    # Weight 0 (a thumb under thumbs_weight 0): left out of the forward pass, yet the loss and the
    # gradient are those of the whole batch forwarded, divided by the whole batch's size.
    batch = [pref, thumbs, corr]
    kind_w = torch.tensor([1.0, 0.0, 2.0])
    texts = [pref.chosen, pref.rejected, pref.chosen, pref.chosen, pref.rejected]

    def losses0(s):
        bt = -F.logsigmoid(s[0] - s[1]) + 0.01 * (s[0] + s[1]) ** 2
        return torch.stack([bt, F.binary_cross_entropy_with_logits(s[2], torch.ones_like(s[2]), reduction="none"), bt])

    encoded, encode = [], rm4.encode

    def counting_encode(prompts, texts):
        encoded.append(len(texts))
        return encode(prompts, texts)

    monkeypatch.setattr(rm4, "encode", counting_encode)
    rm4.zero_grad()
    loss = batch_loss(rm4, batch, correction_weight=2.0, thumbs_weight=0.0, bootstrap_seed=9)
    loss.backward()
    assert encoded == [4]  # the two pairs' sequences, not the thumb's
    got = [p.grad.clone() for p in rm4.parameters() if p.grad is not None]
    rm4.zero_grad()
    feats = rm4.features(*encode([pref.prompt] * 5, texts))
    w = torch.tensor([[bootstrap_weight(e.event_id, k, 9) for k in range(3)] for e in batch], dtype=torch.float32)
    want = ((losses0(rm4.head(feats).mean(-1)) * kind_w).mean()
            + (losses0(rm4.head(feats.detach())) * w * kind_w[:, None]).mean(0).mean())
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5)
    ref = [p.grad for p in rm4.parameters() if p.grad is not None]
    assert len(got) == len(ref) and all(torch.allclose(g, r, atol=1e-6) for g, r in zip(got, ref))
    # A batch of weight-0 examples only: forwarded, a zero loss whose gradient is zero.
    rm4.zero_grad()
    zero = batch_loss(rm4, [thumbs], thumbs_weight=0.0)
    zero.backward()
    assert zero.item() == 0 and all(p.grad.abs().sum() == 0 for p in lora)


# ----------------------------------------------------------------- statistics (no model)
def test_auc_standard_error_and_placements_agree_with_the_auc():
    rng = random.Random(0)
    labels = [rng.random() < 0.5 for _ in range(200)]
    scores = [rng.gauss(0.8 if y else 0.0, 1) + (0.5 if i % 7 == 0 else 0) for i, y in enumerate(labels)]
    scores[3] = scores[4]  # a tie
    a = auc(scores, [float(y) for y in labels])
    v = placements(scores, labels)
    assert math.isclose(sum(x for x, y in zip(v, labels) if y) / sum(labels), a)
    assert math.isclose(sum(x for x, y in zip(v, labels) if not y) / (len(labels) - sum(labels)), a)
    # Hanley-McNeil: about sqrt(A(1-A)/min(m, n)) at most, shrinking with more points.
    assert 0 < auc_variance(a, 100, 100) < auc_variance(a, 10, 10) < 0.05
    z = z_one_sided(0.9)
    a, var = auc_estimate(1.0, 3, 3, z)
    assert a < 0.9 and var > 0.01  # a perfect AUC on 6 points: shrunk towards 0.5, not certain
    p, var = pair_estimate(5, 5, z)
    assert p < 0.9 and var > 0.01  # five pairs all right: the same


def test_ranking_skill_pools_pairs_and_points():
    few = ranking_skill([Evidence("h", pairs=3, pairs_correct=2, auc=0.75, pos=4, neg=3)], 0.9)
    many = ranking_skill([Evidence("h", pairs=4, pairs_correct=4, auc=0.9, pos=3, neg=2),
                          *(Evidence(f"u{i}", pairs=30, pairs_correct=24, auc=0.7, pos=40, neg=40) for i in range(3))], 0.9)
    assert few.lower < 0.55 < many.lower < many.estimate < 0.8
    assert many.pairs == 94 and len(many.aucs) == 4
    text = many.describe()
    assert "90% lower bound" in text and "94 pairs" in text and "0.700 on 40+/40- (u0)" in text
    # Old records: pair accuracy without pairs_correct, AUC without class counts (left out).
    ev = Evidence.from_metrics("v1", {"holdout_pairs": 10, "holdout_pair_accuracy": 0.8, "holdout_point_auc": 0.7},
                               "holdout_")
    assert (ev.pairs, ev.pairs_correct, ev.auc) == (10, 8.0, None)
    assert ranking_skill([], 0.9).estimate is None


def test_paired_difference_flags_only_a_confident_drop():
    ids = [f"p{i}" for i in range(40)]
    cur = {e: 1.0 for e in ids}
    small = {e: (0.0 if i < 2 else 1.0) for i, e in enumerate(ids)}
    big = {e: (0.0 if i < 15 else 1.0) for i, e in enumerate(ids)}
    d_small = paired_difference(small, cur, {}, {}, 0.9)
    d_big = paired_difference(big, cur, {}, {}, 0.9)
    assert d_small.delta == pytest.approx(-0.05) and d_small.upper > 0
    assert d_big.delta == pytest.approx(-0.375) and d_big.upper < 0
    assert paired_difference(cur, cur, {}, {}, 0.9).delta == 0  # identical: no change, not worse
    assert paired_difference({"a": 1.0}, {"b": 1.0}, {}, {}, 0.9) is None  # no shared event


# ---------------------------------------------------------------------- independent adapters
def _lora(rm: RewardModel, i: int) -> dict[str, torch.Tensor]:
    tag = f".{adapter_name(i)}."
    return {n: p.detach().clone() for n, p in rm.backbone.named_parameters() if "lora_" in n and tag in n}


def test_adapters_train_apart_and_every_head_scores(make_cfg):
    rm = RewardModel.fresh(make_cfg(ensemble_heads=2, ensemble_adapters=3), seed=1)
    assert rm.n_adapters == 3 and rm.n_heads == 6
    ex = _pairs(24, seed=1)
    prompts, chosen = [e.prompt for e in ex], [e.chosen for e in ex]
    members = rm.score_members(prompts, chosen)
    assert members.shape == (6, 24)
    assert torch.allclose(rm.score(prompts, chosen), members.mean(0))
    flags = {n: p.requires_grad for n, p in rm.named_parameters()}
    assert all(flags[n] for n in flags if "lora_" in n)  # every adapter trains while the updater owns the model

    # One step on adapter 1 moves its LoRA and heads only, and switching adapters puts every
    # requires_grad flag back as it was (peft's set_adapter freezes the inactive adapters).
    before = [_lora(rm, i) for i in range(3)]
    heads_before = [h.weight.detach().clone() for h in rm.heads]
    with rm.using(1):
        assert rm.active_adapter == 1 and rm.head is rm.heads[1]
        params = rm.adapter_parameters(1)
        opt = torch.optim.AdamW(params, lr=1e-2)
        rm.train()
        for _ in range(2):  # B starts at zero: A moves only from the second step
            opt.zero_grad()
            batch_loss(rm, ex[:8]).backward()
            opt.step()
        rm.eval()
    assert rm.active_adapter == 0 and {n: p.requires_grad for n, p in rm.named_parameters()} == flags
    after = [_lora(rm, i) for i in range(3)]
    for i in (0, 2):
        assert all(torch.equal(before[i][n], after[i][n]) for n in before[i])
        assert torch.equal(heads_before[i], rm.heads[i].weight)
    assert any(not torch.equal(before[1][n], after[1][n]) for n in before[1])
    assert not torch.equal(heads_before[1], rm.heads[1].weight)
    # The other adapters' LoRA B is still zero: their features are the base's, adapter 1's are not.
    x, m = rm.encode(prompts[:4], chosen[:4])
    with torch.no_grad():
        f0, f2 = rm.features(x, m), None
        with rm.using(2):
            f2 = rm.features(x, m)
        with rm.using(1):
            f1 = rm.features(x, m)
    assert torch.allclose(f0, f2) and not torch.allclose(f0, f1)

    # train() trains every adapter, each from its own start: afterwards all three differ.
    train(rm, ex, lr=5e-3, batch_size=8, epochs=2, seed=0, bootstrap_seed=0)
    with torch.no_grad():
        feats = []
        for i in range(3):
            with rm.using(i):
                feats.append(rm.features(x, m))
    for i in range(3):
        for j in range(i + 1, 3):
            assert (feats[i] - feats[j]).abs().max() > 1e-4


def test_a_version_with_adapters_round_trips_and_loads_frozen(make_cfg, tmp_path):
    cfg = make_cfg(ensemble_heads=2, ensemble_adapters=2)
    rm = RewardModel.fresh(cfg, seed=2)
    ex = _pairs(16, seed=2)
    train(rm, ex, lr=5e-3, batch_size=8, epochs=2, seed=0)
    state = rm.trainable_state()
    assert "head.weight" in state and "adapter1.head.weight" in state
    assert any(k.startswith("adapter1.lora.") for k in state) and not any(".adapter1." in k for k in state)
    src = rm.save(tmp_path / "v1")
    Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base_checksum(cfg.base_path))
    # Loaded with a configuration that now says one adapter: the version's own count rules.
    loaded = load_reward_model(cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"ensemble_adapters": 1})}))
    p, c = [e.prompt for e in ex], [e.chosen for e in ex]
    assert loaded.n_adapters == 2
    assert torch.allclose(loaded.score_members(p, c), rm.score_members(p, c), atol=1e-5)
    # Scoring switched adapters; the loaded model stays frozen.
    assert not any(q.requires_grad for q in loaded.parameters())

    # A state missing an adapter's tensors is refused, naming them.
    partial = {k: v for k, v in state.items() if not k.startswith("adapter1.head.")}
    with pytest.raises(RewardModelError, match=r"missing \['adapter1.head"):
        RewardModel.fresh(cfg, seed=3).load_trainable_state(partial, source="bad.safetensors")
    # A one-adapter model's tensors keep the names of versions saved before ensemble adapters.
    one = RewardModel.fresh(make_cfg(ensemble_heads=2), seed=4).trainable_state()
    assert not any(k.startswith("adapter") for k in one)
    from safetensors.torch import load_file
    assert set(load_file(str(src / WEIGHTS_FILE))) == set(state)
