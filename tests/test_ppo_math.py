"""The PPO math against straightforward references (no model)."""

import math

import pytest
import torch

from looprl.policy import ppo


def gae_reference(rewards, values, length, gamma, lam):
    """Textbook GAE for one episode of `length` steps, terminal value 0."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_reference_per_episode(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=g)
    values = torch.randn(3, 6, generator=g)
    lengths = [6, 3, 1]
    mask = torch.zeros(3, 6)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    adv, ret = ppo.gae(rewards * mask, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        ref = gae_reference(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0  # nothing leaks past the end of a completion
        assert ret[i, :n].tolist() == pytest.approx((adv[i, :n] + values[i, :n]).tolist(), abs=1e-6)
    # with lambda = 1 and gamma = 1 the return is the undiscounted sum of future rewards
    if gamma == 1.0 and lam == 1.0:
        assert ret[0, 0].item() == pytest.approx(rewards[0].sum().item(), abs=1e-5)


def test_token_rewards_put_score_on_last_token_and_penalize_kl():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.05], [0.0, -1.0 + 0.1, 0.0]]))


def test_clipped_surrogate_stops_gradient_beyond_the_clip():
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # ratio e^0.5 ~ 1.65 for a positive advantage (clipped), e^-0.5 ~ 0.61 for a negative one (clipped)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)
    z = torch.zeros(1, 2)
    out = ppo.ppo_loss(new, old, adv, z, z, z, z, mask, 0.2, 0.2, 0.5, 0.0)
    out.loss.backward()
    assert out.clip_fraction.item() == 1.0
    assert new.grad.abs().sum().item() == 0.0
    assert out.policy_loss.item() == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0) / 2)
    # inside the clip range the gradient is -advantage * ratio / n_tokens
    new2 = torch.tensor([[0.05, 0.0]], requires_grad=True)
    out2 = ppo.ppo_loss(new2, old, adv, z, z, z, z, mask, 0.2, 0.2, 0.5, 0.0)
    out2.loss.backward()
    assert out2.clip_fraction.item() == 0.0
    assert new2.grad[0, 0].item() == pytest.approx(-math.exp(0.05) / 2, rel=1e-5)


def test_value_loss_is_clipped_around_old_values():
    mask = torch.ones(1, 1)
    z = torch.zeros(1, 1)
    values = torch.tensor([[2.0]], requires_grad=True)
    out = ppo.ppo_loss(z, z, z, values, torch.zeros(1, 1), torch.tensor([[3.0]]), z, mask, 0.2, 0.5, 1.0, 0.0)
    # unclipped error (2-3)^2 = 1, clipped value 0.5 -> (0.5-3)^2 = 6.25; the max is kept
    assert out.value_loss.item() == pytest.approx(0.5 * 6.25)
    out.loss.backward()
    assert values.grad.item() == 0.0  # the clipped branch is constant in `values`


def test_adaptive_kl_controller_tracks_target():
    ctl = ppo.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=5.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl2 = ppo.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl2.update(current_kl=0.9, n_steps=10)
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    state = ctl.state_dict()
    ctl3 = ppo.AdaptiveKLController(0.5, 1.0, 100)
    ctl3.load_state_dict(state)
    assert ctl3.value == ctl.value


def test_the_kl_floor_holds_within_a_run_and_across_continued_runs():
    parent = ppo.AdaptiveKLController(0.08, target=7.0, horizon=100, floor=0.02)
    for _ in range(200):  # KL far under target: the controller keeps lowering the coefficient
        parent.update(current_kl=1.0, n_steps=16)
    assert parent.value == pytest.approx(0.02)
    unfloored = ppo.AdaptiveKLController(0.08, target=7.0, horizon=100)
    for _ in range(200):
        unfloored.update(current_kl=1.0, n_steps=16)
    assert unfloored.value < 0.001
    child = ppo.AdaptiveKLController(0.08, target=7.0, horizon=100, floor=0.02)
    child.start_at(unfloored.value)  # a parent that ran without the floor
    assert child.value == pytest.approx(0.02)
    child.start_at(0.05)
    assert child.value == pytest.approx(0.05)
    assert ppo.AdaptiveKLController(0.0, 7.0, 100, floor=0.02).value == pytest.approx(0.02)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.masked_whiten(x, mask)
    assert ppo.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ppo.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 3].item() == 0.0  # masked entries are zeroed, the outlier does not count
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert ppo.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0, abs=1e-6)


def test_degenerate_answers_are_capped_below_the_mean():
    m = ppo.RunningMoments()
    m.update(torch.tensor([0.0, 2.0, 4.0]))  # mean 2, std 2
    scores = torch.tensor([9.0, 9.0, -5.0, 1.5])
    flags = torch.tensor([True, False, True, True])
    got = ppo.cap_degenerate(scores, flags, m, penalty=1.0)
    # a loved degenerate answer drops to mean - 1 std; one already lower keeps its score; others stand
    assert got.tolist() == [0.0, 9.0, -5.0, 0.0]
    assert ppo.cap_degenerate(scores, flags, m, penalty=0.0).tolist() == [2.0, 9.0, -5.0, 1.5]
