"""The vLLM-layout copy of a policy adapter (looprl.policy.vllm_layout): per-expert LoRA names and
shapes as vLLM's FusedMoEWithLoRA loads them, for Qwen3-MoE and Mixtral (small random models built
from their config classes), the same delta weights as peft's fused adapter, and the copy's way
through the registry to a vLLM endpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from looprl.policy.vllm_layout import LayoutError, export_vllm
from looprl.storage.registry import ChecksumError, Registry
from looprl.storage.releases import KIND, VLLM_DIR, adapter_dir

H, I, E, R, LAYERS = 32, 24, 4, 2, 2


def _model(family: str):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=I, head_dim=8, num_experts=E, **common)
    else:
        cfg = MixtralConfig(intermediate_size=I, num_local_experts=E, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _peft(family: str, tmp_path, target_parameters=("experts.gate_up_proj", "experts.down_proj")):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_model(family), LoraConfig(r=R, lora_alpha=3 * R, target_modules=["q_proj", "v_proj"],
                                                   target_parameters=list(target_parameters), init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


# vLLM's names for the routed experts of layer L (vllm/lora/utils.py process_packed_modules_mapping
# over each model's get_expert_mapping): module path, then (gate, up, down)
VLLM_EXPERTS = {"qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
                "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"))}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_the_export_has_vllms_per_expert_names_shapes_and_peft_deltas(family, tmp_path):
    pm, peft_dir = _peft(family, tmp_path)
    out = export_vllm(peft_dir, tmp_path / "vllm", family)
    sd = load_file(str(out / "adapter_model.safetensors"))
    path, (gate, up, down) = VLLM_EXPERTS[family]

    expected = {}
    for layer in range(LAYERS):
        p = f"base_model.model.model.layers.{layer}"
        expected[f"{p}.self_attn.q_proj.lora_A.weight"] = (R, H)
        expected[f"{p}.self_attn.q_proj.lora_B.weight"] = (H, R)
        expected[f"{p}.self_attn.v_proj.lora_A.weight"] = (R, H)
        expected[f"{p}.self_attn.v_proj.lora_B.weight"] = (16, R)
        for e in range(E):
            for proj, a_in, b_out in ((gate, H, I), (up, H, I), (down, I, H)):
                expected[f"{p}.{path}.{e}.{proj}.lora_A.weight"] = (R, a_in)
                expected[f"{p}.{path}.{e}.{proj}.lora_B.weight"] = (b_out, R)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not any("base_layer" in k or re.search(r"\.experts\.lora_", k) for k in sd)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "target_parameters" not in cfg and (cfg["r"], cfg["lora_alpha"]) == (R, 3 * R)
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj", gate, up, down}

    # the same delta weights as peft's fused adapter, expert by expert
    scaling = 3 * R / R
    for layer in range(LAYERS):
        outer = pm.base_model.model.model.layers[layer].mlp.experts  # down_proj wraps gate_up_proj
        d_gate_up = outer.base_layer.get_delta_weight("default")  # (E, 2I, H), as the parameter
        d_down = outer.get_delta_weight("default")  # (E, H, I)
        p = f"base_model.model.model.layers.{layer}.{path}"
        for e in range(E):
            def delta(proj):
                return scaling * sd[f"{p}.{e}.{proj}.lora_B.weight"] @ sd[f"{p}.{e}.{proj}.lora_A.weight"]
            torch.testing.assert_close(torch.cat([delta(gate), delta(up)]), d_gate_up[e])
            torch.testing.assert_close(delta(down), d_down[e])


@pytest.mark.parametrize("targets", [("experts.down_proj", "experts.gate_up_proj"), ("experts.down_proj",),
                                     ("experts.gate_up_proj",)])
def test_any_target_order_or_subset_lands_under_the_right_projections(targets, tmp_path):
    """Which nested wrapper holds which parameter is peft's business (not the listed order): the
    export checks it against the shapes, and one targeted parameter exports alone."""
    _, peft_dir = _peft("qwen3_moe", tmp_path, target_parameters=targets)
    sd = load_file(str(export_vllm(peft_dir, tmp_path / "vllm", "qwen3_moe") / "adapter_model.safetensors"))
    experts = {k.split("mlp.experts.3.")[1] : tuple(v.shape) for k, v in sd.items() if ".layers.0.mlp.experts.3." in k}
    want = {}
    if "experts.down_proj" in targets:
        want |= {"down_proj.lora_A.weight": (R, I), "down_proj.lora_B.weight": (H, R)}
    if "experts.gate_up_proj" in targets:
        want |= {f"{p}.lora_{ab}.weight": (R, H) if ab == "A" else (I, R) for p in ("gate_proj", "up_proj")
                 for ab in "AB"}
    assert experts == want


def test_unknown_family_and_broken_adapters_are_refused_by_name(tmp_path):
    _, peft_dir = _peft("qwen3_moe", tmp_path)
    with pytest.raises(LayoutError, match="model_type 'gpt_oss'"):
        export_vllm(peft_dir, tmp_path / "v", "gpt_oss")
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, "target_parameters": []}))
    with pytest.raises(LayoutError, match=r"experts.base_layer.lora_.\.weight has no matching entry"):
        export_vllm(peft_dir, tmp_path / "v", "qwen3_moe")


def test_the_copy_is_published_checksummed_and_loaded_by_vllm_endpoints(tmp_path):
    import shutil


    _, peft_dir = _peft("mixtral", tmp_path)
    export_vllm(peft_dir, peft_dir / VLLM_DIR, "mixtral")
    reg = Registry(tmp_path / "registry")
    m = reg.publish(KIND, peft_dir, base_checksum="b" * 64)
    assert {"adapter_model.safetensors", "vllm/adapter_model.safetensors", "vllm/adapter_config.json"} <= set(m.files)
    d = reg.version_dir(KIND, m.version)
    assert adapter_dir(reg, m.version, engine="vllm") == d.resolve() / VLLM_DIR
    assert adapter_dir(reg, m.version) == d.resolve()
    reg.verify(KIND, m.version)
    w = d / VLLM_DIR / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="vllm/adapter_model.safetensors"):
        reg.verify(KIND, m.version)
    # a version without the copy (attention-only, or older) is loaded as it is
    shutil.rmtree(peft_dir / VLLM_DIR)
    m2 = reg.publish(KIND, peft_dir, base_checksum="b" * 64)
    assert adapter_dir(reg, m2.version, engine="vllm") == reg.version_dir(KIND, m2.version).resolve()


def test_the_controller_hands_vllm_the_copy_and_looprl_the_peft_adapter(tmp_path):
    from upstream_stub import StubUpstream

    from looprl.ops.core.config import load_config
    from looprl.serving.controller import AdapterController

    _, peft_dir = _peft("qwen3_moe", tmp_path)
    export_vllm(peft_dir, peft_dir / VLLM_DIR, "qwen3_moe")
    reg = Registry(tmp_path / "ws" / "registry")
    v = reg.publish(KIND, peft_dir, base_checksum="b" * 64).version
    reg.set_pointer(KIND, "promoted", v)
    vllm = StubUpstream().start()
    try:
        cfg = load_config(environ={}, workspace=tmp_path / "ws", serving={"controller_retries": 1})
        assert AdapterController(cfg, endpoints=[vllm.url]).reconcile().converged
        assert vllm.loaded == {f"policy-{v}": str(reg.version_dir(KIND, v).resolve() / VLLM_DIR)}
    finally:
        vllm.stop()
