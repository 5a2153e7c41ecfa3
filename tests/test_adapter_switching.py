"""The installed peft and transformers can switch LoRA adapters the way every stage does it.

Serving, the gate and the reward model load, select, disable and delete adapters through peft's
own API. A peft/transformers pair that cannot (a version gate, a renamed method, an adapter that
silently stays active) must fail here with both versions named, not as 500s in the demo."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from peft import PeftModel

from looprl.policy.model import load_base
from looprl.serving.adapters import read_adapter
from looprl.serving.engine import Engine
from looprl.serving.sampling import SamplingParams

from fixtures_serving import MAX_LORA_RANK

PAIR = f"peft {peft.__version__} with transformers {transformers.__version__}"
IDS = torch.tensor([[5, 17, 42, 8, 99, 3]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _check(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"{PAIR} cannot switch adapters: {what}")


def test_peft_api_switches_adapters_on_this_pair(serving_base, serving_adapters):
    reg = serving_adapters.registry / "policy"
    v1, v2 = serving_adapters.good[:2]
    model, _ = load_base(serving_base)
    base = _logits(model)
    refs = {v: _logits(PeftModel.from_pretrained(load_base(serving_base)[0], reg / v).eval()) for v in (v1, v2)}
    _check(not torch.allclose(refs[v1], refs[v2]), "two different adapters give the same logits")

    try:
        pm = PeftModel.from_pretrained(model, str(reg / v1), adapter_name="one", is_trainable=False)
        pm.load_adapter(str(reg / v2), adapter_name="two", is_trainable=False)
        lora = pm.base_model
        for name, v in (("one", v1), ("two", v2), ("one", v1)):
            pm.set_adapter(name, inference_mode=True)
            _check(torch.allclose(_logits(model), refs[v], atol=1e-5), f"set_adapter({name!r}) does not serve {v}")
        lora.disable_adapter_layers()
        _check(torch.allclose(_logits(model), base, atol=1e-6), "disable_adapter_layers() leaves LoRA active")
        lora.enable_adapter_layers()
        pm.set_adapter("two", inference_mode=True)
        _check(torch.allclose(_logits(model), refs[v2], atol=1e-5), "enable_adapter_layers() does not restore LoRA")
        _check(not any(p.requires_grad for p in model.parameters()), "inference_mode=True leaves weights trainable")
        pm.delete_adapter("one")
        pm.load_adapter(str(reg / v1), adapter_name="three", is_trainable=False)
        pm.set_adapter("three", inference_mode=True)
        _check(torch.allclose(_logits(model), refs[v1], atol=1e-5), "an adapter loaded after a delete is wrong")
        pm.delete_adapter("two")
        pm.delete_adapter("three")
        restored = pm.unload()
    except pytest.fail.Exception:
        raise
    except Exception as e:
        pytest.fail(f"{PAIR} cannot switch adapters: {type(e).__name__}: {e}")
    _check(restored is model and torch.allclose(_logits(model), base, atol=1e-6),
           "unload() after deleting every adapter does not give back the bare base")


def test_engine_switches_adapters_between_requests(serving_base, serving_adapters):
    """The serving engine's own switching: base, adapter, other adapter and base again, each
    answer equal to a model that only ever had that adapter; then unload all and load again."""
    torch.set_num_threads(1)
    reg = serving_adapters.registry
    v1, v2 = serving_adapters.good[:2]
    model, tok = load_base(serving_base)
    eng = Engine(model, tok, max_lora_rank=MAX_LORA_RANK, base_checksum=serving_adapters.checksum, mixed=False).start()
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        want = {None: eng.generate("the cat", greedy).text}
        for name, v in (("a", v1), ("b", v2)):
            eng.load_adapter(read_adapter(name, f"policy/{v}", reg, eng.inventory, MAX_LORA_RANK))
        for adapter in ("a", "b"):
            want[adapter] = eng.generate("the cat", greedy, adapter=adapter).text
        _check(len(set(want.values())) == 3, f"base and two adapters answer alike: {want}")
        for adapter in (None, "b", "a", None, "a"):
            got = eng.generate("the cat", greedy, adapter=adapter).text
            _check(got == want[adapter], f"after switching, {adapter or 'base'} answers {got!r}, not {want[adapter]!r}")
        for name in ("a", "b"):
            eng.unload_adapter(name)
        eng.generate("the cat", greedy)  # lets the engine delete the drained adapters
        _check(eng.generate("the cat", greedy).text == want[None], "the base answers differently after unloading")
        eng.load_adapter(read_adapter("a2", f"policy/{v1}", reg, eng.inventory, MAX_LORA_RANK))
        _check(eng.generate("the cat", greedy, adapter="a2").text == want["a"], "reloading after unload-all differs")
    finally:
        eng.stop()
