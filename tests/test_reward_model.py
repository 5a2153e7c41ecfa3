"""The reward model: scoring, save/publish/load round trip, and refusal of bad versions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from looprl.ops.core.chat import Chat

from looprl.ops.core.config import load_config
from looprl.policy.model import base_checksum
from looprl.reward.model import (CONFIG_FILE, KIND, WEIGHTS_FILE, RewardModel, RewardModelError, load_reward_model,
                                 encode_answer)
from looprl.storage.registry import ChecksumError, Registry, RegistryError

torch.set_num_threads(1)

PROMPTS = ["describe the dog", "tell me about the park", "what is the sea like"]
ANSWERS = ["the dog is happy.", "we passed the old park today. it was dark.", "the sea is calm."]


@pytest.fixture
def cfg(tmp_path, tiny_base):
    return load_config(environ={}, workspace=tmp_path / "ws", model={"base_path": str(tiny_base)},
                       reward={"max_seq_len": 32})


def _publish(cfg, model: RewardModel, tmp_path, name="src", base=None):
    src = model.save(tmp_path / name)
    return Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base or base_checksum(cfg.base_path))


def test_score_shapes_and_encoding(cfg):
    rm = RewardModel.fresh(cfg)
    s = rm.score(PROMPTS, ANSWERS)
    assert s.dtype == torch.float32 and s.shape == (3,) and not s.requires_grad
    # Order and batching do not change a score (right padding, last-token pooling).
    one_by_one = torch.cat([rm.score([p], [a]) for p, a in zip(PROMPTS, ANSWERS)])
    assert torch.allclose(s, one_by_one, atol=1e-5)
    assert torch.allclose(rm.score(PROMPTS, ANSWERS, batch_size=2), s, atol=1e-5)
    # A row is the served sequence: rendered prompt, the answer's own tokens, end of turn.
    tok = rm.tokenizer
    row = encode_answer(tok, "describe the dog", " the dog is happy.", 128)
    assert tok.decode(row) == "question: describe the dog\nanswer: the dog is happy.<|eos|>"
    # Every row ends with the end of turn, even when truncated to max_seq_len; a long answer keeps
    # its first tokens and the prompt its last ones.
    x, m = rm.encode(["describe the dog"], [" the dog is old." * 40])
    assert x.shape[1] == cfg.reward.max_seq_len and x[0, -1] == tok.eos_token_id
    assert tok.decode(x[0, :-1]).startswith("question: describe the dog\nanswer: the dog is old.")
    long_prompt = Chat.from_messages([{"role": "user", "content": "tell me about the dog. " * 40},
                                      {"role": "assistant", "content": " ok."}, {"role": "user", "content": "and the cat"}])
    row = encode_answer(tok, long_prompt, " the cat is old.", 32)
    assert len(row) == 32 and tok.decode(row).endswith("question: and the cat\nanswer: the cat is old.<|eos|>")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rm.score(PROMPTS[:2], ANSWERS[:1])
    assert rm.score([], []).shape == (0,)


def test_only_lora_and_head_train(cfg):
    rm = RewardModel.fresh(cfg)
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert names and all("lora" in n or n.startswith("heads.") for n in names)
    assert any("experts" in n for n in names)  # experts adapted through target_parameters
    before = {n: p.detach().clone() for n, p in rm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=1e-2)
    x, m = rm.encode(PROMPTS, ANSWERS)
    for _ in range(3):
        loss = -rm(x, m)[0] + rm(x, m)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = rm.score(PROMPTS, ANSWERS)
    assert s[0] > s[1]  # gradients reached the score
    assert all(torch.equal(p, before[n]) for n, p in rm.named_parameters() if not p.requires_grad)


def test_publish_and_load_round_trip(cfg, tmp_path):
    rm = RewardModel.fresh(cfg, seed=3)
    with torch.no_grad():
        rm.head.bias.fill_(0.25)
    m = _publish(cfg, rm, tmp_path)
    files = set(m.files)
    assert files == {WEIGHTS_FILE, CONFIG_FILE}
    loaded = load_reward_model(cfg)
    assert loaded.version == m.version == "v1"
    assert torch.allclose(loaded.score(PROMPTS, ANSWERS), rm.score(PROMPTS, ANSWERS), atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    # An explicit older version is loadable too.
    _publish(cfg, RewardModel.fresh(cfg, seed=4), tmp_path, name="src2")
    assert load_reward_model(cfg).version == "v2" and load_reward_model(cfg, "v1").version == "v1"


def test_no_version_yet_is_a_clear_error(cfg):
    with pytest.raises(RewardModelError, match="no reward model published yet"):
        load_reward_model(cfg)


def test_corrupted_weights_are_refused(cfg, tmp_path):
    m = _publish(cfg, RewardModel.fresh(cfg), tmp_path)
    path = Registry(cfg.registry_dir).version_dir(KIND, m.version) / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {WEIGHTS_FILE}"):
        load_reward_model(cfg)


def test_unreadable_safetensors_is_refused_even_with_matching_checksum(cfg, tmp_path):
    src = RewardModel.fresh(cfg).save(tmp_path / "src")
    (src / WEIGHTS_FILE).write_bytes(b"\x00\x01garbage")  # the manifest will checksum the garbage
    Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base_checksum(cfg.base_path))
    with pytest.raises(RewardModelError, match=f"{WEIGHTS_FILE}: unreadable safetensors"):
        load_reward_model(cfg)


def test_wrong_base_is_refused(cfg, tmp_path):
    _publish(cfg, RewardModel.fresh(cfg), tmp_path, base="0" * 64)
    with pytest.raises(RegistryError, match="trained on base 000000000000"):
        load_reward_model(cfg)
    # The weights' own config is checked too (a manifest edited to the right base is not enough).
    src = RewardModel.fresh(cfg).save(tmp_path / "src2")
    conf = json.loads((src / CONFIG_FILE).read_text())
    conf["base_checksum"] = "f" * 64
    (src / CONFIG_FILE).write_text(json.dumps(conf))
    Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base_checksum(cfg.base_path))
    with pytest.raises(RewardModelError, match="trained on base ffffffffffff"):
        load_reward_model(cfg)


def test_nan_weights_are_refused(cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    rm = RewardModel.fresh(cfg)
    with torch.no_grad():
        rm.head.weight[0, 0] = math.nan
    with pytest.raises(RewardModelError, match="head.weight has NaN"):
        rm.save(tmp_path / "nan")
    # A NaN file that reached the registry anyway (checksums are of the NaN file) is refused on load.
    src = RewardModel.fresh(cfg).save(tmp_path / "src")
    state = load_file(str(src / WEIGHTS_FILE))
    key = next(k for k in state if k.startswith("lora."))
    state[key][...] = math.inf
    save_file(state, str(src / WEIGHTS_FILE))
    Registry(cfg.registry_dir).publish(KIND, src, base_checksum=base_checksum(cfg.base_path))
    with pytest.raises(RewardModelError, match="NaN or infinite"):
        load_reward_model(cfg)


def test_sequence_classification_checkpoint(cfg, tiny_base, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    clf.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "rm")
    c = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"checkpoint_path": tmp_path / "rm"})})
    rm = load_reward_model(c)
    assert rm.version == "checkpoint:rm"
    s = rm.score(PROMPTS, ANSWERS)
    assert s.shape == (3,) and torch.isfinite(s).all() and len(set(s.tolist())) > 1
    with pytest.raises(RewardModelError, match="fixed"):
        rm.trainable_state()
    bad = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"checkpoint_path": tmp_path / "nope"})})
    with pytest.raises(RewardModelError, match="reward.checkpoint_path .*nope has no config.json"):
        load_reward_model(bad)
