"""Bring your own model: each supported MoE family (tiny random-weight checkpoints made here,
tests/families_testing.py) loads, gets LoRA on its attention and experts (never its router or
gates), trains only LoRA, saves a standard peft adapter, and runs the fused MoE-LoRA kernel; other
architectures and broken checkpoints are refused by name; `looprl init --base` links a workspace
to a checkpoint that later commands use."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from families_testing import FAMILIES, build_unsupported, corrupt_checkpoint
from looprl.kernels import disable_fused_moe_lora, enable_fused_moe_lora
from looprl.ops.core.config import PolicyConfig, load_config
from looprl.policy.families import (
    BaseModelError, UnsupportedModel, discover_targets, family_of, is_router, resolve_targets,
)
from looprl.policy.lora import attach_lora, save_adapter
from looprl.policy.model import base_checksum, load_base, render_prompt_ids

ATTENTION = {"deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}}
SHARED = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the cat?"},
        {"role": "assistant", "content": "a small cat."}, {"role": "user", "content": "and the dog?"}]


@pytest.fixture
def looprl_logs(caplog):
    """caplog for the looprl loggers, which stop propagating once a CLI test set logging up."""
    logger = logging.getLogger("looprl")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _ids(tok) -> torch.Tensor:
    return torch.tensor([render_prompt_ids(tok, CHAT)])


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _adapted(targets) -> set[str]:
    """Module paths that get LoRA: target modules, and the owners of target parameters."""
    return set(targets.modules) | {p.rsplit(".", 1)[0] for p in targets.parameters}


def _randomize_lora(model, seed: int = 0) -> None:
    """Non-zero LoRA factors (B starts at zero), so the adapter changes what the model computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_base_and_discovered_lora_targets(family, family_checkpoint, looprl_logs):
    model, tok = load_base(family_checkpoint(family))
    assert model.config.model_type == family and family_of(model.config).model_type == family
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    if family == "mixtral":  # Mixtral ships no pad token: unk pads, and the fallback is logged
        assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id
        assert any("no pad token" in r.getMessage() for r in looprl_logs.records)

    targets = discover_targets(model)
    adapted = _adapted(targets)
    n_layers = model.config.num_hidden_layers
    for i in range(n_layers):  # every layer's attention projections
        attn = {n.rsplit(".", 1)[-1] for n in adapted if n.startswith(f"model.layers.{i}.self_attn.")}
        assert attn == ATTENTION.get(family, {"q_proj", "k_proj", "v_proj", "o_proj"}), (i, attn)
    moe = _moe_layers(model)
    assert moe == (list(range(1, n_layers)) if family == "deepseek_v3" else list(range(n_layers)))
    for i in moe:  # routed experts, fused: through target_parameters
        assert {f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj"} \
            <= set(targets.parameters)
        shared = SHARED.get(family)
        if shared:
            assert {f"model.layers.{i}.mlp.{shared}.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= adapted
    if family == "deepseek_v3":  # the dense first layer's MLP
        assert {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= adapted
    if family not in SHARED:
        assert not any("shared" in n for n in adapted)

    gates = {n for n, _ in model.named_modules() if n.endswith((".mlp.gate", ".shared_expert_gate"))}
    assert len(gates) == len(moe) * (2 if family == "qwen2_moe" else 1)
    assert not adapted & gates and not any(is_router(n) for n in adapted)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_lora_and_saves_a_standard_peft_adapter(family, family_checkpoint, tmp_path):
    path = family_checkpoint(family)
    model, tok = load_base(path)
    torch.manual_seed(0)
    peft_model = attach_lora(model, PolicyConfig(lora_rank=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ids = _ids(tok)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    routers = [n for n in grads if is_router(n.replace(".base_layer", ""))]
    assert routers and all(grads[n] is None for n in routers)  # router and gates: frozen
    assert all(g is None for n, g in grads.items() if n not in trainable)
    moving = {n for n in trainable if "lora_B" in n and grads[n] is not None and grads[n].abs().sum() > 0}
    assert any(".self_attn." in n for n in moving) and any(".mlp.experts." in n for n in moving)
    if family in SHARED:
        assert any(f".{SHARED[family]}." in n for n in moving)

    _randomize_lora(peft_model)
    out = save_adapter(peft_model, tmp_path / "adapter")
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and set(acfg["target_modules"]) == set(discover_targets(load_base(path)[0]).target_modules)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        # a plain transformers load of the base and peft's own loader: nothing looprl-specific
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), out).eval()
        got = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    assert sorted(n for n, _ in reloaded.named_parameters() if "lora_" in n) == \
        sorted(n for n, _ in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_moe_lora_kernel_matches_peft(family, family_checkpoint):
    model, tok = load_base(family_checkpoint(family))
    peft_model = attach_lora(model, PolicyConfig(lora_rank=4, lora_alpha=8))
    _randomize_lora(peft_model, seed=1)
    ids = _ids(tok)

    def run():
        peft_model.zero_grad()
        logits = peft_model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if ".mlp.experts." in n
                                 and p.grad is not None}

    ref_logits, ref_grads = run()
    assert enable_fused_moe_lora(peft_model, "torch") == len(_moe_layers(model))
    logits, grads = run()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4)
    assert disable_fused_moe_lora(peft_model) == len(_moe_layers(model))


def test_fused_kernel_leaves_an_unfit_experts_module_on_peft_with_a_warning(family_checkpoint, monkeypatch,
                                                                           looprl_logs):
    import looprl.kernels.moe_lora as moe_lora

    model, tok = load_base(family_checkpoint("qwen2_moe"))
    peft_model = attach_lora(model, PolicyConfig(lora_rank=4, lora_alpha=8))
    _randomize_lora(peft_model, seed=2)
    ids = _ids(tok)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    unfit = peft_model.base_model.model.model.layers[0].mlp.experts
    real = moe_lora.fused_layout_problem
    monkeypatch.setattr(moe_lora, "fused_layout_problem",  # as if layer 0's experts had another layout
                        lambda experts, wrappers: "test layout" if experts is moe_lora.peft_experts_chain(unfit)[0]
                        else real(experts, wrappers))
    assert enable_fused_moe_lora(peft_model, "torch") == len(_moe_layers(model)) - 1
    assert "forward" not in unfit.__dict__  # peft's own forward
    warned = [r for r in looprl_logs.records if "does not fit" in r.getMessage()]
    assert warned and warned[0].fields["module"].endswith("layers.0.mlp.experts") and \
        warned[0].fields["problem"] == "test layout"
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_explicit_target_lists_are_kept_and_checked(family_checkpoint):
    model, _ = load_base(family_checkpoint("qwen3_moe"))
    t = resolve_targets(model, ["q_proj", "v_proj"], ["experts.down_proj"])
    assert t.target_modules == ["q_proj", "v_proj"] and t.target_parameters == ["experts.down_proj"]
    assert len(t.modules) == 4 and len(t.parameters) == 2
    with pytest.raises(ValueError, match=r"policy.target_modules \['nope_proj'\] match no module of Qwen3MoeForCausalLM"):
        resolve_targets(model, ["q_proj", "nope_proj"], "auto")
    with pytest.raises(ValueError, match=r"reward.target_parameters \['experts.nope'\] match no parameter"):
        resolve_targets(model, "auto", ["experts.nope"], section="reward")
    with pytest.raises(ValueError, match="router or gate, which must stay frozen"):
        resolve_targets(model, ["gate"], [])
    with pytest.raises(ValueError, match="router or gate, which must stay frozen"):
        resolve_targets(model, [], ["mlp.gate.weight"])
    with pytest.raises(ValueError, match="select nothing to train"):
        resolve_targets(model, [], [])
    deepseek, _ = load_base(family_checkpoint("deepseek_v3"))
    # peft (#3711) would rename a shared expert's gate_proj to the routed experts: refused, with the fix
    with pytest.raises(ValueError, match=r"target_modules \['gate_proj'\]: peft renames these .* target_parameters"):
        resolve_targets(deepseek, ["gate_proj"], [])
    t = resolve_targets(deepseek, [], ["shared_experts.gate_proj.weight"])
    assert t.parameters == ("model.layers.1.mlp.shared_experts.gate_proj.weight",)


def test_reward_model_lora_on_a_family_round_trips(family_checkpoint, tmp_path):
    from looprl.reward.model import RewardModel, load_from_dir

    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      model={"base_path": str(family_checkpoint("deepseek_v3"))}, reward={"lora_rank": 4})
    rm = RewardModel.fresh(cfg)
    settings = rm.lora_settings
    assert "mlp.shared_experts.gate_proj.weight" in settings["target_parameters"]
    assert "kv_b_proj" in settings["target_modules"] and "experts.gate_up_proj" in settings["target_parameters"]
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert not any(is_router(n.split(".lora_")[0].replace(".base_layer", "")) for n in trainable)
    _randomize_lora(rm.backbone, seed=3)
    prompts, answers = [CHAT[:2], CHAT], ["a cat.", "a dog, a big one."]
    expected = rm.score(prompts, answers)
    rm.save(tmp_path / "v")
    again = load_from_dir(cfg, tmp_path / "v", "v1")
    assert again.lora_settings == settings
    torch.testing.assert_close(again.score(prompts, answers), expected)


def test_an_unsupported_architecture_is_refused_naming_it_and_what_is_missing(tmp_path):
    llama = build_unsupported(tmp_path / "llama")
    with pytest.raises(UnsupportedModel, match=(
            rf"base model directory {llama}: model_type 'llama' \(LlamaForCausalLM\) is not a Mixture-of-Experts "
            r"family looprl supports \(qwen3_moe, mixtral, olmoe, qwen2_moe, deepseek_v3\): no mlp.experts")):
        load_base(llama)
    with pytest.raises(UnsupportedModel, match=r"'phimoe' \(PhimoeForCausalLM\) .*: its experts' layout has no "
                                               "LoRA target discovery"):
        family_of({"model_type": "phimoe", "architectures": ["PhimoeForCausalLM"], "num_local_experts": 16})


@pytest.mark.parametrize("how, match", [
    ("truncate", r"weight file model.safetensors is unreadable \(truncated or corrupt safetensors"),
    ("garble", r"weight file model.safetensors is unreadable \(truncated or corrupt safetensors"),
    ("config", r"config.json is not valid JSON"),
])
def test_a_corrupt_checkpoint_is_refused_naming_the_directory_and_file(how, match, family_checkpoint, tmp_path):
    broken = corrupt_checkpoint(family_checkpoint("olmoe"), tmp_path / how, how)
    with pytest.raises(BaseModelError, match=match) as e:
        load_base(broken)
    assert str(e.value).startswith(f"base model directory {broken}: ")


def test_a_hub_name_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "Qwen/Qwen3-30B-A3B" is a relative path here, and it does not exist
    with pytest.raises(FileNotFoundError, match=r"base model directory Qwen/Qwen3-30B-A3B has no config.json"):
        load_base("Qwen/Qwen3-30B-A3B")


def test_missing_shards_and_pickle_only_weights_are_refused(family_checkpoint, tmp_path):
    src = family_checkpoint("mixtral")
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(BaseModelError, match=r"model.safetensors.index.json lists missing weight files"):
        load_base(sharded)
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no .safetensors weights \(found pytorch_model.bin: only "
                                                r"safetensors weights are loaded, never pickles\)"):
        load_base(pickled)


def test_init_base_links_the_workspace_and_later_commands_use_it(family_checkpoint, tmp_path, monkeypatch, capsys):
    from looprl.ops.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    src, other = family_checkpoint("qwen2_moe"), family_checkpoint("mixtral")
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "init", "--base", str(src)]) == 0
    err = capsys.readouterr().err
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    assert "Qwen2-MoE (qwen2_moe, Qwen2MoeForCausalLM)" in err and f"({n_params:,})" in err
    assert "4 routed, top-2" in err and base_checksum(src) in err
    link = ws / "base"
    assert link.is_symlink() and link.resolve() == src.resolve()  # linked, not copied

    # the next command on the workspace loads that base through the default model.base_path
    assert main(["--workspace", str(ws), "reward", "update", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"status": "no new events"}
    assert main(["--workspace", str(ws), "init"]) == 0
    assert "nothing to do" in capsys.readouterr().err

    assert main(["--workspace", str(ws), "init", "--base", str(other)]) == 2
    assert f"{link} is already a link to {src.resolve()}; use --force" in capsys.readouterr().err
    assert main(["--workspace", str(ws), "init", "--base", str(other), "--force"]) == 0
    assert link.resolve() == other.resolve() and "Mixtral (mixtral" in capsys.readouterr().err

    # rebuilding the tiny base replaces the link, and never writes into the linked checkpoint
    before = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    monkeypatch.setenv("LOOPRL_MODEL__PRETRAIN_STEPS", "1")
    assert main(["--workspace", str(ws), "init", "--force", "--quiet"]) == 0
    assert not link.is_symlink() and (link / "config.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == before
    capsys.readouterr()

    # model.base_path set: --base must name the same directory, and nothing is linked
    monkeypatch.setenv("LOOPRL_MODEL__BASE_PATH", str(src))
    assert main(["--workspace", str(tmp_path / "ws3"), "init", "--base", str(src)]) == 0
    assert "model.base_path" in capsys.readouterr().err and not (tmp_path / "ws3" / "base").exists()
    assert main(["--workspace", str(tmp_path / "ws3"), "init", "--base", str(other)]) == 2
    assert f"model.base_path is {src}, not --base {other}" in capsys.readouterr().err
    monkeypatch.delenv("LOOPRL_MODEL__BASE_PATH")

    llama = build_unsupported(tmp_path / "llama")
    assert main(["--workspace", str(tmp_path / "ws2"), "init", "--base", str(llama)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"looprl init: base model directory {llama}: model_type 'llama'")
    assert not (tmp_path / "ws2" / "base").exists()


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_served_mixed_adapter_rows_match_each_adapter_alone(family, family_checkpoint, tmp_path):
    """Rows on different adapters share one forward (serving's MixedLora), also through the
    shared experts that LoRA reaches by weight (DeepSeek-V3)."""
    from looprl.serving.mixed import BASE, MixedLora

    path = family_checkpoint(family)
    dirs = []
    for seed in (4, 5):
        m, _ = load_base(path)
        pm = attach_lora(m, PolicyConfig(lora_rank=4, lora_alpha=8))
        _randomize_lora(pm, seed=seed)
        dirs.append(save_adapter(pm, tmp_path / f"a{seed}"))
    base, tok = load_base(path)
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name="a1")
    model.load_adapter(dirs[1], adapter_name="a2")
    model.eval()
    ids = _ids(tok).repeat(3, 1)
    expected = []
    with torch.no_grad():
        for name in ("a1", "a2"):
            model.set_adapter(name)
            expected.append(model(input_ids=ids[:1]).logits)
        with model.disable_adapter():
            expected.append(model(input_ids=ids[:1]).logits)
        model.set_adapter("a1")
        mixer = MixedLora(model, impl="torch")
        mixer.refresh()
        got = mixer.forward(["a1", "a2", BASE], input_ids=ids).logits
    for row, want in enumerate(expected):
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-4)
    assert (expected[0] - expected[1]).abs().max() > 1e-3


class _ExpertMLP(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        for name, shape in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter))):
            setattr(self, name, torch.nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(torch.nn.functional.silu(gate(x)) * up(x))


class _PerExpertLinears(torch.nn.ModuleList):
    """Experts as one Linear module per expert and projection (the transformers-4 layout)."""

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, mlp in enumerate(self):
            tok, slot = (top_k_index == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, mlp(hidden[tok]) * top_k_weights[tok, slot, None])
        return out


def test_per_expert_linear_layers_are_discovered_and_train(family_checkpoint, tmp_path):
    """transformers 5 fuses every supported family's experts; a model whose experts are still one
    Linear per expert (w1/w3/w2) gets LoRA on each of them, by name."""
    names = ("w1", "w3", "w2")
    model, tok = load_base(family_checkpoint("qwen3_moe"))
    hidden, inter = model.config.hidden_size, model.config.moe_intermediate_size
    for layer in model.model.layers:
        layer.mlp.experts = _PerExpertLinears(_ExpertMLP(hidden, inter, names)
                                              for _ in range(model.config.num_experts))
    targets = discover_targets(model)
    expert_linears = {n for n, m in model.named_modules() if ".mlp.experts." in n and isinstance(m, torch.nn.Linear)}
    assert len(expert_linears) == 2 * 4 * 3 and expert_linears <= _adapted(targets)
    assert {"w1", "w2", "w3"} <= set(targets.target_modules) and targets.target_parameters == []

    peft_model = attach_lora(model, PolicyConfig(lora_rank=4, lora_alpha=8))
    ids = _ids(tok)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    moved = {n.split(".lora_")[0].replace(".base_layer", "") for n, p in peft_model.named_parameters()
             if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".mlp.experts." in n for n in moved)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if ".mlp.gate." in n)
    _randomize_lora(peft_model)
    out = save_adapter(peft_model, tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    fresh, _ = load_base(family_checkpoint("qwen3_moe"))
    for layer, src in zip(fresh.model.layers, peft_model.base_model.model.model.layers):
        layer.mlp.experts = _PerExpertLinears(_ExpertMLP(hidden, inter, names) for _ in range(4))
        base_state = {k.replace(".base_layer", ""): v for k, v in src.mlp.experts.state_dict().items() if "lora_" not in k}
        layer.mlp.experts.load_state_dict(base_state)
    with torch.no_grad():
        got = PeftModel.from_pretrained(fresh, out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
