"""CPU tests of looprl.kernels: the torch references against plain peft / plain log-softmax,
values and gradients; the fused paths never build the big tensors they exist to avoid."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from looprl.kernels import (
    LoRAFactors,
    chunked_logprobs_and_entropy,
    disable_fused_moe_lora,
    hidden_states_and_head,
    enable_fused_moe_lora,
    moe_lora_experts,
    naive_logprobs_and_entropy,
    select,
)
from looprl.ops.core.config import KernelsConfig

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_model(family: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                             norm_topk_prob=True, **common)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
        model = MixtralForCausalLM(cfg)
    return model.to(dtype)


def tiny_peft(family: str, dtype=torch.float32, targets=EXPERT_PARAMS, seed: int = 0):
    # init_lora_weights=False: B is random too, so the LoRA path is not a no-op.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=targets,
                     init_lora_weights=False)
    return get_peft_model(tiny_model(family, dtype, seed), cfg)


def forward_backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only add contention on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# the autograd Function itself


def dense_reference(x, idx, w, wgu, wd, gu: LoRAFactors | None, dn: LoRAFactors | None, act=F.silu):
    """Per (token, slot) with W + s B A written out: the definition the fused path must meet."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            w1 = wgu[e] + (gu.scaling * gu.B[e] @ gu.A[e] if gu else 0)
            w2 = wd[e] + (dn.scaling * dn.B[e] @ dn.A[e] if dn else 0)
            gate, up = (x[t] @ w1.T).chunk(2)
            out[t] = out[t] + w[t, j] * ((act(gate) * up) @ w2.T)
    return out


# silu takes the analytic activation backward, anything else autograd's; a hidden state that
# needs no gradient (the first MoE layer under frozen attention) skips dL/dx but not the LoRA grads
@pytest.mark.parametrize("targets, act, x_grad", [("both", F.silu, True), ("gate_up", F.silu, True),
                                                  ("down", F.silu, True), ("both", torch.tanh, True),
                                                  ("both", F.silu, False), ("down", F.silu, False)])
def test_function_matches_dense_reference_and_gradcheck(targets, act, x_grad):
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k, r = 7, 6, 4, 4, 2, 2
    kw = dict(dtype=torch.float64, generator=g)
    x = torch.randn(T, H, **kw).requires_grad_(x_grad)
    # expert E-1 gets no token: empty groups must give zero LoRA gradients, not garbage
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, **kw).requires_grad_()
    wgu, wd = torch.randn(E, 2 * I, H, **kw), torch.randn(E, H, I, **kw)
    lora = [torch.randn(E, r, H, **kw), torch.randn(E, 2 * I, r, **kw),
            torch.randn(E, r, I, **kw), torch.randn(E, H, r, **kw)]
    for t in lora:
        t.requires_grad_()

    def f(x, w, a1, b1, a2, b2):
        gu = LoRAFactors(a1, b1, 0.7) if targets in ("both", "gate_up") else None
        dn = LoRAFactors(a2, b2, 1.3) if targets in ("both", "down") else None
        return moe_lora_experts(x, idx, w, wgu, wd, gu, dn, act), dense_reference(x, idx, w, wgu, wd, gu, dn, act)

    fused, dense = f(x, w, *lora)
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[0], (x, w, *lora))


def test_function_refuses_trainable_base_weights():
    x, idx, w = torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    wgu = torch.randn(2, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="freeze"):
        moe_lora_experts(x, idx, w, wgu, torch.randn(2, 4, 2))


# ---------------------------------------------------------------------------------------------
# against peft's target_parameters path on real transformers models


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_matches_peft_logits_and_lora_grads(family, ids, monkeypatch):
    model = tiny_peft(family)
    ref_logits, ref_grads = forward_backward(model, ids)
    assert enable_fused_moe_lora(model, "torch") == 2  # one experts module per layer

    # The fused forward must not go through peft's parametrization (which builds W + dW).
    def no_delta(*a, **k):
        raise AssertionError("peft materialized the expert delta")
    monkeypatch.setattr(ParamWrapper, "_activate_lora", no_delta)
    logits, grads = forward_backward(model, ids)

    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("experts" in n for n in grads)
    for name in grads:  # attention LoRA grads too: they see dL/dhidden through experts and router
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ["experts.down_proj"]])
def test_fused_matches_peft_with_one_expert_target(targets, ids):
    model = tiny_peft("qwen3_moe", targets=targets)
    ref_logits, ref_grads = forward_backward(model, ids)
    assert enable_fused_moe_lora(model) == 2
    logits, grads = forward_backward(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_bf16_close_to_peft(ids):
    model = tiny_peft("qwen3_moe", dtype=torch.bfloat16)
    ref_logits, ref_grads = forward_backward(model, ids)
    enable_fused_moe_lora(model)
    logits, grads = forward_backward(model, ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
    for name in grads:
        if "experts" in name:  # relative error of the whole gradient tensor
            err = (grads[name].float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm()
            assert err < 3e-2, (name, err)


def test_fused_saves_no_expert_sized_tensor(ids):
    """Nothing saved for backward has the size of a stacked expert weight, except the weight itself."""
    model = tiny_peft("qwen3_moe")
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    params = {p.data_ptr() for p in model.parameters()}
    big = {experts.gate_up_proj.numel(), experts.down_proj.numel()}

    def copies_of_expert_weights():
        found = []

        def pack(t):
            if t.numel() in big and t.data_ptr() not in params:
                found.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum()
        return found

    assert copies_of_expert_weights()  # peft keeps W + dW (the check can see it)
    enable_fused_moe_lora(model)
    assert copies_of_expert_weights() == []


def test_switch_is_idempotent_reversible_and_respects_peft_state(ids):
    model = tiny_peft("mixtral")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert enable_fused_moe_lora(model) == enable_fused_moe_lora(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-5)
        with model.disable_adapter():  # e.g. the PPO reference policy: falls back to peft, no LoRA
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-6)
        model.merge_adapter()  # merged weights: peft's path, LoRA not applied twice
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-4)
        model.unmerge_adapter()
    assert disable_fused_moe_lora(model) == 2 and disable_fused_moe_lora(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert enable_fused_moe_lora(model, "peft") == 0


def test_adapter_trained_fused_loads_in_plain_peft(tmp_path, ids):
    model = tiny_peft("qwen3_moe")
    enable_fused_moe_lora(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "fused")

    plain = tiny_peft("qwen3_moe")  # same base init; peft's own save for the key/shape layout
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}

    loaded = PeftModel.from_pretrained(tiny_model("qwen3_moe"), tmp_path / "fused")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=1e-5)


def test_unsupported_state_is_refused_early():
    model = tiny_peft("qwen3_moe")
    with pytest.raises(ValueError, match="unknown MoE-LoRA impl"):
        enable_fused_moe_lora(model, "cuda")


# ---------------------------------------------------------------------------------------------
# chunked log-prob / entropy


def logprob_case(dtype=torch.float32, B=2, T=5, H=16, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0], labels[1, 2], labels[1, 3] = -100, V - 1, 0  # ignored, last and first vocab ids
    return hidden, weight, labels


def values_and_grads(fn, hidden, weight, labels, **kw):
    logp, ent = fn(hidden, weight, labels, **kw)
    g = torch.Generator().manual_seed(3)
    loss = (logp * torch.randn(logp.shape, generator=g)).sum() + (ent * torch.randn(ent.shape, generator=g)).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return logp, ent, gh, gw


@pytest.mark.parametrize("chunk_size", [16, 37, 100, 101, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_naive(chunk_size, temperature):
    case = logprob_case()
    ref = values_and_grads(naive_logprobs_and_entropy, *case, temperature=temperature)
    out = values_and_grads(chunked_logprobs_and_entropy, *case, temperature=temperature, chunk_size=chunk_size)
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_lm_head"], out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert out[0][0, 0] == 0 and out[2].shape == case[0].shape


def test_chunked_logprobs_bf16_and_frozen_head():
    hidden, weight, labels = logprob_case(torch.bfloat16, V=300)
    weight.requires_grad_(False)  # LoRA training: lm_head frozen, no (V, H) gradient computed
    logp, ent = chunked_logprobs_and_entropy(hidden, weight, labels, chunk_size=64)
    ref_logp, ref_ent = naive_logprobs_and_entropy(hidden, weight, labels)
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
    (gh,) = torch.autograd.grad(logp.sum() + ent.sum(), hidden)
    (ref_gh,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), hidden)
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-2)


def test_chunked_logprobs_never_keep_full_logits():
    hidden, weight, labels = logprob_case(B=2, T=8, H=16, V=512)
    n_logits = labels.numel() * weight.shape[0]
    inputs = {hidden.data_ptr(), weight.data_ptr()}

    def largest_saved(fn, **kw):  # largest tensor kept for backward, the inputs aside
        sizes = [0]

        def pack(t):
            if t.data_ptr() not in inputs:
                sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden, weight, labels, **kw)
        return max(sizes)

    assert largest_saved(naive_logprobs_and_entropy) >= n_logits
    assert largest_saved(chunked_logprobs_and_entropy, chunk_size=64) < n_logits // 8


def test_policy_logprobs_from_a_peft_model_without_logits(ids):
    """The trainer's path: hidden states + lm_head weight -> chunked log-probs == log_softmax(logits)."""
    model = tiny_peft("mixtral")
    enable_fused_moe_lora(model)
    hidden, head = hidden_states_and_head(model, input_ids=ids)
    logp, ent = chunked_logprobs_and_entropy(hidden[:, :-1], head, ids[:, 1:], chunk_size=48)
    logits = model(input_ids=ids).logits[:, :-1].float()
    ref = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits).entropy(), rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------
# config switch and packaging


def test_select_follows_kernels_config(ids):
    hidden, weight, labels = logprob_case()
    k = select(KernelsConfig(moe_lora="torch", logprob="chunked", logprob_chunk_size=16))
    model = tiny_peft("qwen3_moe")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert k.patch_model(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-5)
    for a, b in zip(k.logprobs_and_entropy(hidden, weight, labels), naive_logprobs_and_entropy(hidden, weight, labels)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert select(KernelsConfig(moe_lora="peft")).patch_model(model) == 0  # "peft" unpatches
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure mode")
def test_select_triton_without_gpu_fails_fast():
    with pytest.raises(RuntimeError, match="triton"):
        select(KernelsConfig(moe_lora="triton"))
    with pytest.raises(RuntimeError, match="triton"):
        select(KernelsConfig(logprob="triton"))


def test_import_never_imports_triton():
    code = "import sys, looprl.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
