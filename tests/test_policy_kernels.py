"""The kernel switches (cfg.kernels.logprob, cfg.kernels.moe_lora) change speed, not numbers:
the PPO learner gives the same log-probs, gradients and updates with each setting."""

import pytest
import torch

from looprl.policy.forward import policy_forward
from looprl.policy.prompts import generator
from looprl.policy.rollout import sample
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.workers import Learner, RolloutWorker

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

PROMPTS = ["tell me about your day", "the sky is", "what is the weather like", "a dog", "the sea", "my friend"]


def _learner(policy_cfg, **kernels):
    cfg = policy_cfg(max_new_tokens=8, rollout_batch_size=6, minibatch_size=3, ppo_epochs=1)
    cfg = cfg.model_copy(update={"kernels": cfg.kernels.model_copy(update=kernels)})
    return Learner(cfg)


def _nudge(learner):
    # a trained-looking adapter: LoRA B is zero at init, so perturb it to make the LoRA path count
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("kernels", [{"logprob": "chunked", "logprob_chunk_size": 16}, {"moe_lora": "torch"}],
                         ids=["logprob-chunked", "moe_lora-torch"])
def test_kernel_setting_gives_the_same_logprobs_and_grads(policy_cfg, kernels):
    ref, alt = _learner(policy_cfg), _learner(policy_cfg, **kernels)
    _nudge(ref)
    _nudge(alt)
    ro = sample(ref.model, ref.tok, PROMPTS, 8, 1.0, generator(0, "k"), 64)
    outs = []
    for learner in (ref, alt):
        learner.model.zero_grad()
        fo = policy_forward(learner.model, ro.input_ids, ro.attention_mask, learner.cfg.kernels, 1.0)
        (fo.logprobs * ro.attention_mask[:, 1:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}
        outs.append((fo.logprobs.detach(), fo.entropy.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4)
    assert outs[0][2].keys() == outs[1][2].keys()
    for n in outs[0][2]:
        torch.testing.assert_close(outs[0][2][n], outs[1][2][n], atol=1e-4, rtol=1e-3, msg=n)
    assert any(".mlp.experts." in n and g.abs().max() > 0 for n, g in outs[0][2].items())


@pytest.mark.parametrize("kernels", [{"logprob": "chunked", "logprob_chunk_size": 16, "moe_lora": "torch"}],
                         ids=["chunked+torch"])
def test_ppo_step_is_the_same_with_fast_kernels(policy_cfg, kernels):
    ref, alt = _learner(policy_cfg), _learner(policy_cfg, **kernels)
    worker = RolloutWorker(ref.cfg, CheerfulScorer(), model=ref.model, tok=ref.tok)
    ro = worker.rollout(None, PROMPTS, (0, 0, "rollout", 0))
    s_ref, s_alt = ref.learn([ro], 0), alt.learn([ro], 0)
    for key in ("kl", "policy_loss", "value_loss", "entropy", "approx_kl"):
        assert s_alt[key] == pytest.approx(s_ref[key], rel=1e-3, abs=1e-5), key
    a, b = ref.lora_state(), alt.lora_state()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
