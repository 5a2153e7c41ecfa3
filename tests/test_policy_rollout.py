"""Sampling, the shared forward pass and the kernel switches of the policy stage."""

import pytest
import torch

from looprl.policy.forward import expert_load, policy_forward
from looprl.policy.prompts import generator
from looprl.policy.rollout import sample
from looprl.policy.workers import build_policy

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

PROMPTS = ["tell me about your day", "the sky", "what is the weather like in the city today", "a dog"]


@pytest.fixture
def policy(policy_cfg):
    cfg = policy_cfg(max_new_tokens=10)
    model, tok = build_policy(cfg)
    return cfg, model, tok


def _sample(cfg, model, tok, seed, prompts=PROMPTS, n=None):
    return sample(model, tok, prompts, n or cfg.policy.max_new_tokens, 1.0, generator(seed, "t"), 64)


def test_sampling_is_a_function_of_the_seed(policy):
    cfg, model, tok = policy
    a, b, c = _sample(cfg, model, tok, 1), _sample(cfg, model, tok, 1), _sample(cfg, model, tok, 2)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    assert not torch.equal(a.input_ids, c.input_ids)


def test_response_mask_ends_at_eos_and_pads_after(policy):
    cfg, model, tok = policy
    eos = tok.eos_token_id
    bias = torch.zeros(model.get_base_model().lm_head.weight.shape[0])
    bias[eos] = 3.0  # make completions end early, at different lengths
    h = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        ro = _sample(cfg, model, tok, 0, PROMPTS * 4, n=12)
    finally:
        h.remove()
    resp = ro.input_ids[:, ro.prompt_len:]
    lengths = ro.response_mask.sum(1).long()
    assert (lengths < 12).any(), "the eos bias should end some completions early"
    for i, n in enumerate(lengths.tolist()):
        assert ro.response_mask[i, :n].eq(1).all() and ro.response_mask[i, n:].eq(0).all()
        body = resp[i, :n].tolist()
        if n < resp.shape[1]:
            assert body[-1] == eos and eos not in body[:-1]
            assert resp[i, n:].eq(tok.pad_token_id).all()
            assert ro.attention_mask[i, ro.prompt_len + n:].eq(0).all()
        assert ro.completions[i] == tok.decode([t for t in body if t != eos], skip_special_tokens=True)


def test_logprobs_ignore_left_padding(policy):
    """A completion scored inside a padded batch gets the log-probs it gets alone."""
    cfg, model, tok = policy
    ro = _sample(cfg, model, tok, 3)
    sl = ro.response_labels_slice()
    with torch.no_grad():
        batch = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels).logprobs[:, sl]
        for i in range(len(PROMPTS)):
            keep = ro.attention_mask[i].bool()
            keep[ro.prompt_len:] = True  # keep masked tail positions so the label slice lines up
            pad = int((~keep).sum())
            ids, mask = ro.input_ids[i:i + 1, pad:], ro.attention_mask[i:i + 1, pad:]
            alone = policy_forward(model, ids, mask, cfg.kernels).logprobs[:, ro.prompt_len - pad - 1:]
            m = ro.response_mask[i].bool()
            torch.testing.assert_close(batch[i][m], alone[0][m], atol=1e-4, rtol=1e-4)


def test_logprobs_match_the_sampling_distribution(policy):
    """The learner's log p(token) is the log of the distribution the token was sampled from."""
    cfg, model, tok = policy
    ro = _sample(cfg, model, tok, 4)
    sl = ro.response_labels_slice()
    lm = model.get_base_model()
    with torch.no_grad():
        fo = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels)
        logits = lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                    position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1].float()
    ref = logits.log_softmax(-1).gather(-1, ro.input_ids[:, 1:, None]).squeeze(-1)
    m = ro.response_mask.bool()
    torch.testing.assert_close(fo.logprobs[:, sl][m], ref[:, sl][m], atol=1e-4, rtol=1e-4)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(fo.entropy[:, sl][m], ent[:, sl][m], atol=1e-4, rtol=1e-4)


def test_expert_load_counts_only_masked_tokens():
    r1 = torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    load = expert_load((r1, r1), torch.tensor([[1.0, 1.0, 0.0]]), top_k=1)
    torch.testing.assert_close(load, torch.tensor([1.0, 0.0, 0.0]))
    load2 = expert_load((r1,), torch.ones(1, 3), top_k=2)
    assert load2.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(load2, torch.tensor([2 / 6, 2 / 6, 2 / 6]))
