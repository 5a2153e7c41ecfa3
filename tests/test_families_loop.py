"""The loop on each supported family's own checkpoint and chat format: `looprl init --base` links
a tiny random-weight checkpoint (tests/families_testing.py), then one reward update, one PPO step
and the gate run on it, and the new adapter serves one chat completion whose prompt tokens are the
tokens the trainer and the reward model render for that conversation."""

from __future__ import annotations

import httpx
import pytest
import torch

from families_testing import FAMILIES
from fixtures_serving import CapturingLogger
from looprl.ops.core.chat import Chat
from looprl.ops.core.config import load_config
from looprl.ops.sim.feedback import SimulatedLog, simulate_feedback
from looprl.policy.families import discover_targets
from looprl.policy.gate import run_gate
from looprl.policy.model import load_base, render_prompt_ids
from looprl.policy.rollout import encode_prompts
from looprl.policy.trainer import train
from looprl.reward.model import encode_answer
from looprl.reward.updater import RewardUpdater
from looprl.serving.server import ServerThread, build_service
from looprl.storage.registry import Registry

torch.set_num_threads(1)

MESSAGES = [
    {"role": "system", "content": "answer about animals"},
    {"role": "user", "content": "tell me about the dog"},
    {"role": "assistant", "content": "the dog is old."},
    {"role": "user", "content": "what is the cat?"},
]
TOKEN = "t0ken"
# how each family's template marks a user turn (tests/families_testing.py)
USER_MARK = {"qwen3_moe": "<|im_start|>user", "qwen2_moe": "<|im_start|>user", "mixtral": "[INST]",
             "olmoe": "<|user|>", "deepseek_v3": "<｜User｜>"}


def _config(ws):
    return load_config(
        environ={}, workspace=ws,
        reward=dict(min_new_events=10, max_user_share=1.0, lora_rank=4, batch_size=8, epochs_per_update=1,
                    max_seq_len=64),
        policy=dict(rollout_batch_size=4, minibatch_size=4, max_new_tokens=4, ppo_epochs=1, steps=1,
                    checkpoint_every=1, recent_prompts=0, lora_rank=4, lora_alpha=8),
        gate=dict(heldout_prompts=4, min_win_rate=0.0, max_kl=100.0),
        serving=dict(admin_token=TOKEN, max_lora_rank=8, torch_threads=1, default_max_tokens=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_init_reward_ppo_gate_serve_on_a_family(family, family_checkpoint, tmp_path, monkeypatch, capsys):
    from looprl.ops.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "init", "--base", str(family_checkpoint(family)), "--quiet"]) == 0
    capsys.readouterr()
    cfg = _config(ws)  # model.base_path unset: the workspace's link
    reg = Registry(cfg.registry_dir)

    log = SimulatedLog(cfg.events_dir)
    with RewardUpdater(cfg, connect=log.connect) as up:
        log.append(simulate_feedback(40, seed=0))
        result = up.update()
    assert result.decision == "published"
    reward = reg.manifest("reward", result.version)
    assert reward.base_family == family

    policy = train(cfg, use_ray=False, resume=False).manifest
    assert policy.base_family == family and policy.extra["reward_version"] == result.version
    assert len(policy.metrics["curve"]) == 1
    base, _ = load_base(cfg.base_path)
    assert policy.extra["target_parameters"] == sorted(discover_targets(base).target_parameters)

    report = run_gate(cfg, policy.version)
    assert report.decision == "gated", report.reasons
    assert reg.manifest("policy", policy.version).status == "gated"

    service = build_service(cfg)
    engine = service.engine
    submitted: list[list[int]] = []
    real_submit = engine.submit_many

    def spy(prompt_ids, *args, **kwargs):
        submitted.append(list(prompt_ids))
        return real_submit(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "submit_many", spy)
    server = ServerThread(service, admin_token=TOKEN, response_logger=CapturingLogger()).start()
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        name = f"policy-{policy.version}"
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=auth, timeout=60,
                       json={"lora_name": name, "lora_path": str(reg.version_dir("policy", policy.version))})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": name, "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
    finally:
        server.stop()
        engine.stop()

    # the prompt the server fed the model is what PPO rollouts and the reward model render
    _, tok = load_base(cfg.base_path)
    chat = Chat.from_messages(MESSAGES)
    (served,) = submitted
    assert served == render_prompt_ids(tok, chat)
    ids, mask = encode_prompts(tok, [chat], max_prompt_tokens=10_000)
    assert ids[0][mask[0].bool()].tolist() == served
    assert encode_answer(tok, chat, answer, max_len=10_000)[:len(served)] == served
    text = tok.decode(served)
    assert text.count(MESSAGES[0]["content"]) == 1 and text.count(USER_MARK[family]) == 2  # system + both turns
