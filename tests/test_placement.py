"""Devices and precision (issue 28): the model.device / model.dtype resolver, bf16 on the CPU through
the reward model and the PPO learner, gradient checkpointing, the kernels' "auto" choice, the
start-up memory check of every stage, and the Ray GPU decision. Runs on the CPU (CUDA is mocked
where only the decision is under test)."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from looprl.kernels import resolve_auto
from looprl.ops.core.chat import Chat
from looprl.ops.core.config import ConfigError, load_config
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.memory import GiB, BaseShape, plan
from looprl.policy.model import MemoryBudgetError, Placement, check_memory, resolve_placement
from looprl.policy.prompts import generator
from looprl.policy.ray_backend import ray_plan

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

PROMPTS = ["tell me about your day", "the sky is", "what is the weather like", "a dog"]
TINY_BUDGET = {"memory_budget_gb": 1e-4}  # 0.1 MiB: less than any stage of the tiny base needs


def _cfg(tiny_base_cfg, tmp_path=None, **model):
    return tiny_base_cfg(tmp_path, model={"device": "cpu", **model},
                         policy={"recent_prompts": 0, "rollout_batch_size": 4, "minibatch_size": 2,
                                 "max_new_tokens": 6, "ppo_epochs": 1})


class LengthScorer:
    """Scores that differ between completions (so advantages and gradients are not zero)."""

    version = "test:length"

    def score(self, prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_cuda(monkeypatch, count: int = 1, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# ---------------------------------------------------------------------- resolver
def test_device_and_dtype_resolve_on_a_machine_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    cfg = load_config(environ={})
    assert (cfg.model.device, cfg.model.dtype) == ("auto", "auto")
    pl = resolve_placement(cfg.model)
    assert pl.device == torch.device("cpu") and pl.dtype == torch.float32
    pl = resolve_placement(load_config(environ={}, model={"device": "cpu", "dtype": "bfloat16"}).model)
    assert pl.device.type == "cpu" and pl.dtype == torch.bfloat16
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"model\.device.*{dev}.*(no CUDA|sees no CUDA GPU)"):
            resolve_placement(load_config(environ={}, model={"device": dev}).model)
    with pytest.raises(ConfigError, match="model.device"):
        load_config(environ={}, model={"device": "gpu0"})
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(environ={}, model={"dtype": "fp8"})
    assert load_config(environ={"LOOPRL_MODEL__DEVICE": "cuda:3"}).model.device == "cuda:3"


def test_auto_is_bf16_on_the_first_gpu_and_fp32_stays_explicit(monkeypatch):
    _fake_cuda(monkeypatch, count=2)
    pl = resolve_placement(load_config(environ={}).model)
    assert pl.device == torch.device("cuda", 0) and pl.dtype == torch.bfloat16
    assert resolve_placement(load_config(environ={}, model={"device": "cuda:1"}).model).device == torch.device("cuda", 1)
    assert resolve_placement(load_config(environ={}, model={"dtype": "float32"}).model).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"'cuda:2' but only 2 CUDA device"):
        resolve_placement(load_config(environ={}, model={"device": "cuda:2"}).model)
    _fake_cuda(monkeypatch, bf16=False)  # a GPU without bf16 (pre-Ampere)
    assert resolve_placement(load_config(environ={}).model).dtype == torch.float16


def test_kernels_auto_is_triton_on_cuda_with_triton_else_torch_and_peft_on_cpu(monkeypatch):
    import looprl.kernels as K
    import looprl.serving.server as server
    from looprl.serving.server import serving_moe_lora

    cfg = load_config(environ={})
    assert (cfg.kernels.moe_lora, cfg.kernels.logprob, cfg.serving.moe_lora) == ("auto", "auto", "auto")
    cuda = torch.device("cuda", 0)
    for mod in (K, server):
        monkeypatch.setattr(mod, "triton_installed", lambda: True)
    assert resolve_auto("auto", "auto", cuda) == ("triton", "triton")
    assert resolve_auto("auto", "auto", "cpu") == ("peft", "naive")
    assert serving_moe_lora("auto", cuda) == "triton" and serving_moe_lora("auto", torch.device("cpu")) == "torch"
    for mod in (K, server):
        monkeypatch.setattr(mod, "triton_installed", lambda: False)
    assert resolve_auto("auto", "auto", cuda) == ("torch", "chunked")
    assert serving_moe_lora("auto", cuda) == "torch"
    assert resolve_auto("peft", "chunked", cuda) == ("peft", "chunked")  # explicit settings are kept
    assert K.select(cfg.kernels, "cpu").moe_lora == "peft"


# ---------------------------------------------------------------------- bf16 on the CPU
def test_bf16_reward_model_scores_and_trains_in_fp32_heads(tiny_base_cfg):
    from looprl.reward.data import Example
    from looprl.reward.model import RewardModel
    from looprl.reward.train import train

    cfg = _cfg(tiny_base_cfg, dtype="bfloat16")
    rm = RewardModel.fresh(cfg)
    dtypes = {n: p.dtype for n, p in rm.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n and not n.startswith("heads.")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or n.startswith("heads.")} == {torch.float32}
    prompts = [Chat.user(p) for p in PROMPTS]
    scores = rm.score(prompts, [" a happy dog.", " the sky.", " rain.", " sun."])
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and torch.isfinite(scores).all()
    now = datetime.now(timezone.utc)
    examples = [Example(f"e{i}", "preference", prompts[i], now, chosen=" a happy sunny day.", rejected=" no.")
                for i in range(4)] + [Example("t", "thumbs", prompts[0], now, completion=" fine.", label=1.0)]
    before = {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}
    stats = train(rm, examples, lr=5e-3, batch_size=5, epochs=1, seed=0)
    assert stats.steps == 1 and stats.loss == stats.loss  # finite (not NaN)
    assert any(not torch.equal(before[n], p) for n, p in rm.named_parameters() if p.requires_grad)


def test_bf16_ppo_learner_forward_backward_keeps_the_ppo_math_in_fp32(tiny_base_cfg):
    from looprl.policy.forward import policy_forward
    from looprl.policy.workers import Learner, RolloutWorker

    cfg = _cfg(tiny_base_cfg, dtype="bfloat16")
    learner = Learner(cfg)
    base_dtypes = {p.dtype for n, p in learner.model.named_parameters() if not p.requires_grad}
    assert base_dtypes == {torch.bfloat16}
    assert {p.dtype for p in learner.params} == {torch.float32}  # LoRA + value head
    ro = RolloutWorker(cfg, LengthScorer(), model=learner.model, tok=learner.tok).rollout(
        None, PROMPTS, (0, 0, "rollout", 0))
    assert ro.scores.std() > 0
    fo = policy_forward(learner.model, ro.input_ids, ro.attention_mask, cfg.kernels, 1.0, learner.value_head)
    assert fo.logprobs.dtype == fo.entropy.dtype == fo.values.dtype == torch.float32
    assert torch.isfinite(fo.logprobs).all() and (fo.logprobs <= 0).all()
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    stats = learner.learn([ro], 0)
    assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("policy_loss", "value_loss", "grad_norm", "kl"))
    assert stats["grad_norm"] > 0
    changed = [n for n, p in learner.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any(".mlp.experts." in n for n in changed)


def test_bf16_embedded_server_keeps_its_kv_cache_in_the_model_dtype(tiny_base_cfg, tiny_base, tmp_path):
    from adapters_testing import publish_adapter

    from looprl.policy.model import base_checksum
    from looprl.serving.sampling import SamplingParams
    from looprl.serving.server import build_service
    from looprl.storage.registry import Registry

    cfg = tiny_base_cfg(tmp_path / "ws", model={"device": "cpu", "dtype": "bfloat16"},
                        serving={"torch_threads": 1, "max_context_tokens": 64, "log_responses": False})
    v = publish_adapter(Registry(cfg.registry_dir), tiny_base, base_checksum(tiny_base), seed=3, scale=4.0)
    service = build_service(cfg)
    engine = service.engine
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.max_context == 64
        caches = []
        engine.model.register_forward_pre_hook(
            lambda mod, args, kwargs: caches.append(kwargs.get("past_key_values")), with_kwargs=True)
        service.load("pol", str(cfg.registry_dir / "policy" / v))
        ids = engine.encode("question: describe the park\nanswer:")
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        base_out, pol_out = engine.generate(ids, greedy), engine.generate(ids, greedy, adapter="pol")
        assert base_out.token_ids and pol_out.token_ids
        layers = [layer for c in caches if c is not None for layer in c.layers if layer.is_initialized]
        assert layers and {layer.keys.dtype for layer in layers} == {torch.bfloat16}
        assert {layer.keys.device.type for layer in layers} == {"cpu"}
        from looprl.serving.engine import EngineError

        with pytest.raises(EngineError, match="context is 64"):
            engine.generate(list(range(3, 3 + 70)), greedy)
    finally:
        engine.stop()


def test_learner_evaluates_a_minibatch_at_a_time_with_the_same_numbers(tiny_base_cfg):
    from looprl.policy.workers import RolloutWorker

    whole = _perturbed_learner(_cfg(tiny_base_cfg))
    whole.cfg = whole.cfg.model_copy(update={"policy": whole.cfg.policy.model_copy(update={"minibatch_size": 64})})
    ro = RolloutWorker(whole.cfg, LengthScorer(), model=whole.model, tok=whole.tok).rollout(
        None, PROMPTS, (0, 0, "rollout", 0))
    a = whole.evaluate(ro)
    whole.cfg = whole.cfg.model_copy(update={"policy": whole.cfg.policy.model_copy(update={"minibatch_size": 3})})
    b = whole.evaluate(ro)  # rows 0-2, then row 3
    for x, y in ((a.logprobs, b.logprobs), (a.ref_logprobs, b.ref_logprobs), (a.values, b.values),
                 (a.entropy, b.entropy)):
        assert x.shape == y.shape == (len(PROMPTS), ro.response_mask.shape[1])
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.expert_load, b.expert_load)


def test_reward_model_follows_the_kernels_switch_with_the_same_numbers(tiny_base_cfg):
    from looprl.reward.model import RewardModel

    out = []
    for moe in ("peft", "torch"):
        cfg = _cfg(tiny_base_cfg)
        cfg = cfg.model_copy(update={"kernels": cfg.kernels.model_copy(update={"moe_lora": moe})})
        rm = RewardModel.fresh(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in rm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        x, m = rm.encode([Chat.user(p) for p in PROMPTS], [" yes.", " no.", " maybe so.", " a dog."])
        rm(x, m).sum().backward()
        out.append((rm.score([Chat.user("hi")], [" there."]),
                    {n: p.grad for n, p in rm.named_parameters() if p.requires_grad and ".experts." in n}))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=1e-5)
    assert out[0][1].keys() == out[1][1].keys() and out[0][1]
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


# ---------------------------------------------------------------------- gradient checkpointing
def _perturbed_learner(cfg):
    from looprl.policy.workers import Learner

    learner = Learner(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return learner


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_base_cfg):
    from looprl.policy import ppo
    from looprl.policy.forward import policy_forward
    from looprl.policy.rollout import sample
    from looprl.reward.model import RewardModel

    results = []
    ro = None
    for ckpt in (False, True):
        cfg = _cfg(tiny_base_cfg, gradient_checkpointing=ckpt)
        learner = _perturbed_learner(cfg)
        if ro is None:
            ro = sample(learner.model, learner.tok, PROMPTS, 6, 1.0, generator(0, "ckpt"), 64)
        calls = []
        attn = learner.model.get_base_model().model.layers[0].self_attn
        attn.register_forward_hook(lambda *a: calls.append(1))
        fo = policy_forward(learner.model, ro.input_ids, ro.attention_mask, cfg.kernels, 1.0, learner.value_head)
        sl, mask = ro.response_labels_slice(), ro.response_mask
        loss = ppo.masked_mean(fo.logprobs[:, sl] * 0.5 + fo.values[:, sl], mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}
        # the reward updater's model: same switch, same gradients
        rm = RewardModel.fresh(cfg)
        x, m = rm.encode([Chat.user(p) for p in PROMPTS], [" yes.", " no.", " maybe so.", " a dog."])
        rm(x, m).sum().backward()
        rgrads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.requires_grad}
        results.append((len(calls), grads, rgrads))
    (plain_calls, g0, r0), (ckpt_calls, g1, r1) = results
    assert (plain_calls, ckpt_calls) == (1, 2)  # checkpointing really recomputed the layer in backward
    assert g0.keys() == g1.keys() and r0.keys() == r1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)
    for n in r0:
        torch.testing.assert_close(r0[n], r1[n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(g.abs().max() > 0 for n, g in g0.items() if ".mlp.experts." in n)


# ---------------------------------------------------------------------- memory check
QWEN3_30B_A3B = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                     vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False)


def test_estimate_of_a_qwen3_30b_a3b_shape_uses_its_real_parameters_and_formula(tmp_path):
    base = tmp_path / "qwen3-30b-a3b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(QWEN3_30B_A3B))  # no weights: the shape is all it reads
    shape = BaseShape.of(base)
    assert abs(shape.params - 30.53e9) / 30.53e9 < 0.005  # Qwen3-30B-A3B: 30.5B parameters
    assert (shape.experts, shape.top_k, shape.expert_inter, shape.moe_layers) == (128, 8, 768, 48)
    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      model={"base_path": str(base), "device": "cpu", "dtype": "bfloat16"},
                      serving={"max_batch_size": 8, "max_context_tokens": 4096})
    srv = plan(cfg, "serving")
    assert srv.parts["weights"] == shape.params * 2
    assert srv.parts["KV cache"] == 8 * 4096 * 48 * (2 * 4 * 128) * 2  # rows x tokens x layers x (K+V) x bf16
    gpu = Placement(torch.device("cuda", 0), torch.bfloat16)  # planned, not used: no CUDA needed
    pol = plan(cfg, "policy", gpu)
    ckpt = plan(cfg.model_copy(update={"model": cfg.model.model_copy(update={"gradient_checkpointing": True})}),
                "policy", gpu)
    big = plan(cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"minibatch_size": 16})}), "policy", gpu)
    assert pol.parts["policy weights"] == pol.parts["reward-model weights"] == shape.params * 2
    assert big.parts["activations"] > pol.parts["activations"] > 4 * ckpt.parts["activations"]
    # on the CPU "auto" is peft's expert path, which materialises W + BA of every expert layer
    assert plan(cfg, "policy").parts["activations"] > pol.parts["activations"] + 48 * 128 * 3 * 768 * 2048 * 2
    # attention + fused experts LoRA (rank 8) of 48 layers, 16 bytes per trainable parameter
    attn = 8 * ((2048 + 4096) * 2 + (2048 + 512) * 2)
    experts = 8 * 128 * ((2048 + 1536) + (768 + 2048))
    assert pol.parts["LoRA + value head + optimizer"] == 16 * (48 * (attn + experts) + 2048 * 2050 + 1)
    assert pol.total > 100 * GiB  # a 30B model with its reward model does not fit an 80 GB GPU in bf16


def _no_loading(monkeypatch, *modules):
    """Any model load in these modules fails the test: the memory check must refuse first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the memory check refused")
    for mod in modules:
        monkeypatch.setattr(mod, "load_base", boom)


def _refusal(excinfo, stage_name: str, key: str) -> None:
    text = str(excinfo.value)
    assert f"the {stage_name} needs about" in text and "model.memory_budget_gb = 0.0001" in text
    assert key in text and "is available" in text


def test_each_stage_refuses_before_loading_when_the_budget_is_too_small(tiny_base_cfg, tmp_path, monkeypatch):
    import looprl.policy.gate as gate
    import looprl.policy.workers as workers
    import looprl.reward.model as reward_model
    import looprl.serving.server as server
    from looprl.policy.checkpoint import runs_root
    from looprl.policy.trainer import train
    from looprl.reward.updater import RewardUpdater, UpdaterBusy
    from looprl.storage.registry import Registry

    # what fits the default (the RAM this machine reports) is refused under a 0.1 MiB budget
    fits = _cfg(tiny_base_cfg, tmp_path / "ok")
    for stage in ("reward", "policy", "gate", "serving"):
        assert check_memory(fits, stage).total > 0
    # a candidate for the gate to look at, published before the budget shrinks
    learner = workers.Learner(fits)
    learner.export(tmp_path / "cand")
    cfg = _cfg(tiny_base_cfg, tmp_path / "ws", **TINY_BUDGET)
    from looprl.policy.model import base_checksum

    version = Registry(cfg.registry_dir).publish("policy", tmp_path / "cand", base_checksum=base_checksum(cfg.base_path),
                                                 status="candidate").version
    _no_loading(monkeypatch, workers, reward_model, gate, server)

    with pytest.raises(MemoryBudgetError) as e:
        RewardUpdater(cfg).open()
    _refusal(e, "reward updater", "reward.batch_size")
    with pytest.raises(MemoryBudgetError):  # the lock was let go: a retry is refused again, not "busy"
        try:
            RewardUpdater(cfg).open()
        except UpdaterBusy:
            pytest.fail("the refused updater kept its lock")

    with pytest.raises(MemoryBudgetError) as e:
        train(cfg, scorer=CheerfulScorer(), use_ray=False, resume=False)
    _refusal(e, "PPO trainer", "policy.rollout_batch_size")
    assert not list(runs_root(cfg.state_dir).glob("*/run.json"))  # a refused run is not left to resume

    with pytest.raises(MemoryBudgetError) as e:
        gate.evaluate(cfg, version, scorer=CheerfulScorer())
    _refusal(e, "promotion gate", "gate.heldout_prompts")

    with pytest.raises(MemoryBudgetError) as e:
        server.build_service(cfg)
    _refusal(e, "embedded server", "serving.max_context_tokens")
    assert isinstance(e.value, ConfigError)  # the CLI reports it as a configuration error (exit 2)


# ---------------------------------------------------------------------- Ray placement
def test_ray_requests_gpus_only_when_the_cluster_has_them_and_the_device_allows():
    with_gpus = {"CPU": 16.0, "GPU": 2.0, "memory": 1e11}
    p = ray_plan("auto", with_gpus)
    assert (p.colocated, p.num_gpus, p.device) == (True, 1.0, "cuda")
    assert ray_plan("cuda:1", with_gpus).device == "cuda"  # the granted GPU is cuda:0 inside the actor
    assert ray_plan("cuda", {"GPU": 0.5}).num_gpus == 0.5
    for device, cluster in (("cpu", with_gpus), ("auto", {"CPU": 4.0}), ("auto", {"CPU": 4.0, "GPU": 0.0})):
        p = ray_plan(device, cluster)
        assert (p.colocated, p.num_gpus, p.device) == (False, 0, "cpu")
    with pytest.raises(ConfigError, match=r"model\.device.*'cuda'.*no GPU resources"):
        ray_plan("cuda", {"CPU": 4.0})


def test_colocated_learner_samples_what_separate_workers_sample(tiny_base_cfg):
    from looprl.policy.trainer import LocalBackend, shard
    from looprl.policy.workers import ColocatedLearner

    cfg = _cfg(tiny_base_cfg)
    shards = shard([Chat.user(p) for p in PROMPTS], 2)
    seeds = [(0, 3, "rollout", i) for i in range(len(shards))]
    colocated = ColocatedLearner(cfg, CheerfulScorer()).rollout_shards(shards, seeds)
    local = LocalBackend(cfg, CheerfulScorer()).rollout(shards, seeds)
    assert [r.completions for r in colocated] == [r.completions for r in local]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(colocated, local))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (the GPU is a logical resource)")
def test_a_gpu_cluster_runs_one_colocated_learner_and_its_refusal_reads_as_config(tiny_base_cfg, tmp_path):
    """A Ray cluster that reports a GPU gets the colocated learner actor with num_gpus=1; here the
    GPU is a logical resource on a machine without CUDA, so the actor's device check refuses at
    start, and the driver reports that refusal as the configuration error it is."""
    ray = pytest.importorskip("ray")
    from looprl.policy.ray_backend import RayBackend, ray_temp_dir

    cfg = _cfg(tiny_base_cfg, tmp_path / "ws", device="auto")
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"ray_timeout_s": 120})})
    assert not ray.is_initialized()
    temp = ray_temp_dir(cfg)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=str(temp),
             object_store_memory=cfg.policy.ray_object_store_mb * 1024 * 1024, log_to_driver=False,
             configure_logging=False)
    try:
        with pytest.raises(ConfigError, match=r"model\.device' is 'cuda' but this torch build .* no CUDA"):
            RayBackend(cfg, CheerfulScorer())  # "auto" became "cuda" for the actor granted the GPU
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------- the GPU benchmark
GPU_LOOP = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_loop.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full benchmark")
def test_gpu_loop_benchmark_refuses_without_cuda_and_its_cpu_smoke_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    no_gpu = subprocess.run([sys.executable, str(GPU_LOOP)], capture_output=True, text=True, env=env, timeout=120)
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr and "--cpu-smoke" in no_gpu.stderr
    smoke = subprocess.run([sys.executable, str(GPU_LOOP), "--cpu-smoke", "--results", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    out = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "gpu-loop-cpu-smoke-quick.json").read_text())
    assert out["measured_on_gpu"] is False
    assert out["ppo"]["fused"]["kernels"] == {"moe_lora": "torch", "logprob": "chunked"}
    assert out["ppo"]["peft"]["kernels"] == {"moe_lora": "peft", "logprob": "naive"}
    for figure in (out["reward"]["tokens_per_s"], out["ppo"]["fused"]["rollout_tokens_per_s"],
                   out["ppo"]["peft"]["learner_tokens_per_s"], out["serving"]["tokens_per_s"],
                   out["ratios"]["ppo_step_speedup_fused_vs_peft"]):
        assert figure > 0
    assert out["serving"]["completion_tokens"] == out["run"]["serve_requests"] * out["run"]["serve_tokens"]
