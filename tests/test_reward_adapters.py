"""A reward model with several independent LoRA adapters (reward.ensemble_adapters): each adapter
and its heads train on their own, the scores read all of them, and versions round-trip."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import torch

from looprl.ops.core.chat import Chat
from looprl.ops.sim.feedback import simulate_feedback
from looprl.policy.model import base_checksum
from looprl.reward.data import Example
from looprl.reward.model import KIND, WEIGHTS_FILE, RewardModel, RewardModelError, adapter_name, load_reward_model
from looprl.reward.train import batch_loss, train
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
