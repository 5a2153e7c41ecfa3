"""A policy adapter in the layout vLLM loads: LoRA on fused MoE experts as one LoRA per expert.

peft reaches transformers 5's fused expert weights (``mlp.experts.gate_up_proj`` (E, 2I, H) and
``mlp.experts.down_proj`` (E, H, I)) through ``target_parameters``: one ``ParamWrapper`` per
targeted parameter, nested on the ``experts`` module in the order the module defines them
(peft ``tuners_utils.py``, ``_inject_parameters``), so the adapter file holds
``...mlp.experts.base_layer.lora_A.weight`` (``gate_up_proj``) and ``...mlp.experts.lora_A.weight``
(``down_proj``), with all experts' factors stacked: ``lora_A``
(E·r, in), reshaped (E, r, in), and ``lora_B`` (out, r·E), reshaped (out, r, E) (peft
``tuners/lora/layer.py``, ``ParamWrapper.get_delta_factors``, peft 0.21).

vLLM loads LoRA for fused MoE layers (``FusedMoEWithLoRA``, since PR #21229 "[Feature][Kernel]
FusedMoE LoRA", first released in the 0.11 line) as one 2-D LoRA per expert and projection, read
from the adapter under the names of the model's expert checkpoint mapping. Read from vLLM's LoRA
loader (github.com/vllm-project/vllm):

- ``vllm/lora/utils.py``, ``process_packed_modules_mapping``: for a MoE model the packed module
  ``experts`` maps to ``[weight_name for _, weight_name, _, _ in model.get_expert_mapping()]``,
  i.e. ``experts.<e>.gate_proj`` / ``.down_proj`` / ``.up_proj`` for Qwen3-MoE (and Qwen2-MoE,
  OLMoE, DeepSeek) and ``experts.<e>.w1`` / ``.w2`` / ``.w3`` for Mixtral, whose MoE block vLLM
  names ``block_sparse_moe`` (``vllm/model_executor/models/mixtral.py``);
- ``vllm/lora/model_manager.py`` @ 01533aa8f9c07da9766323fbaf4c8b81bb2aa958,
  ``_create_lora_modules`` / ``create_dummy_lora``: a MoE layer becomes ``FusedMoE3DWithLoRA``
  (fused ``w13`` LoRA, peft's ``experts.base_layer`` layout) only for models that declare
  ``is_3d_moe_weight``; every other MoE model (Qwen3-MoE and Mixtral among them) gets
  ``FusedMoEWithLoRA``, whose weights ``PackedLoRALayerWeights.pack_moe`` stacks from the per-expert
  triples (w1 = gate, w2 = down, w3 = up): lora_a (E, r, in), lora_b (E, out, r);
- ``vllm/lora/lora_model.py`` @ 0306474e9d1f26d8717aad457b9511f0c9e57d60,
  ``LoRAModel.from_local_checkpoint``: reads ``adapter_model.safetensors``; a key under
  ``.experts`` must name an expected expert module (``experts.<e>.<proj>``); ``base_layer`` keys
  are only skipped by that check (they are consumed by the 3-D path alone), so for Qwen3-MoE or
  Mixtral peft's fused layout would load no expert LoRA at all.

So the copy exported here holds, for every MoE layer L and expert e, the exact factors of the
peft adapter: ``base_model.model.model.layers.L.<experts>.e.<gate>.lora_A.weight`` = A_e (r, H)
and ``.lora_B.weight`` = B_e[:I] (I, r); ``<up>``: A_e and B_e[I:]; ``<down>``: (r, I) and (H, r).
The same r and lora_alpha give the same scaling, so the copy computes the same delta weights
(tested against peft's own). Attention LoRA keys are the same in both layouts. The copy is
written at publish time into the version's ``vllm/`` directory (``looprl.storage.releases.VLLM_DIR``),
checksummed with the rest, and the adapter controller loads it on vLLM endpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# model_type -> (vLLM's path of the routed experts inside a decoder layer, gate, up, down names)
EXPERT_LAYOUT: dict[str, tuple[str, str, str, str]] = {
    "qwen3_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "qwen2_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2"),
}

_FUSED = re.compile(r"^(?P<prefix>.*\.experts)(?P<bases>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")


class LayoutError(ValueError):
    """An adapter that cannot be written in vLLM's layout; the message names the file and key."""


def _nesting(prefix: str, depths: dict, wrapped: list[str], where: Path) -> list[str]:
    """The parameter of each nested wrapper of one experts module, innermost first. peft wraps them
    in the order the module defines its parameters (``gate_up_proj``, then ``down_proj``); the
    shapes must agree: gate_up's lora_A reads what down's lora_B writes (H) and gate_up's lora_B
    writes twice what down's lora_A reads (2I)."""
    if len(depths) != len(wrapped) or any(set(f) != {"A", "B"} for f in depths.values()):
        raise LayoutError(f"{where}: {prefix}: expected lora_A and lora_B for each of {wrapped}, found "
                          f"{ {d: sorted(f) for d, f in depths.items()} }")
    if wrapped != ["down_proj", "gate_up_proj"]:
        return wrapped
    inner, outer = depths[0], depths[1]
    for gate_up, down in ((inner, outer), (outer, inner)):
        if gate_up["A"].shape[1] == down["B"].shape[0] and gate_up["B"].shape[0] == 2 * down["A"].shape[1]:
            return ["gate_up_proj", "down_proj"] if gate_up is inner else ["down_proj", "gate_up_proj"]
    raise LayoutError(f"{where}: {prefix}: the LoRA shapes fit no (gate_up_proj, down_proj) pair")


def export_vllm(adapter_dir: str | Path, out_dir: str | Path, model_type: str) -> Path:
    """Write the vLLM-layout copy of the peft adapter in ``adapter_dir`` into ``out_dir``
    (``adapter_model.safetensors`` + ``adapter_config.json``). Returns ``out_dir``."""
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    if model_type not in EXPERT_LAYOUT:
        raise LayoutError(f"model_type {model_type!r}: no vLLM expert layout known (known: {', '.join(EXPERT_LAYOUT)})")
    experts_path, gate, up, down = EXPERT_LAYOUT[model_type]
    try:
        cfg = json.loads((src / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise LayoutError(f"{src / CONFIG_FILE}: {e}") from None
    where = src / CONFIG_FILE
    if cfg.get("use_dora"):
        raise LayoutError(f"{where}: DoRA adapters have no vLLM layout")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):
        raise LayoutError(f"{where}: target_modules is a pattern ({modules!r}); export needs a list of names")
    tparams = list(cfg.get("target_parameters") or [])
    rank = int(cfg["r"])
    for key in ("rank_pattern", "alpha_pattern"):
        if any("experts" in k for k in (cfg.get(key) or {})):
            raise LayoutError(f"{where}: {key} on the experts is not supported by the export")
    wrapped = sorted({t.rpartition(".")[2] for t in tparams if t.rpartition(".")[0].split(".")[-1] == "experts"})

    tensors = load_file(str(src / WEIGHTS_FILE))
    def rename(key: str) -> str:  # transformers' experts path -> vLLM's (Mixtral: block_sparse_moe)
        return key.replace(".mlp.experts.", f".{experts_path}.")
    result: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    nested: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _FUSED.match(key)
        if m is None:
            result[rename(key)] = t
            continue
        depth = m["bases"].count(".base_layer")
        if depth >= len(wrapped):
            raise LayoutError(f"{src / WEIGHTS_FILE}: {key} has no matching entry in target_parameters {tparams}")
        nested.setdefault(m["prefix"], {}).setdefault(depth, {})[m["ab"]] = t
    for prefix, depths in nested.items():
        for depth, param in zip(sorted(depths), _nesting(prefix, depths, wrapped, src / WEIGHTS_FILE)):
            fused[(prefix, param)] = depths[depth]

    for (prefix, param), ab in sorted(fused.items()):
        if set(ab) != {"A", "B"}:
            raise LayoutError(f"{src / WEIGHTS_FILE}: {prefix} ({param}) lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] % rank or b.shape[1] != a.shape[0]:
            raise LayoutError(f"{src / WEIGHTS_FILE}: {prefix} ({param}): lora_A {tuple(a.shape)} and lora_B "
                              f"{tuple(b.shape)} are not experts x rank {rank}")
        n = a.shape[0] // rank
        a3 = a.reshape(n, rank, a.shape[1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], rank, n)  # (out, r, E)
        base = rename(prefix + ".")[:-1]
        for e in range(n):
            ae, be = a3[e].contiguous(), b3[:, :, e].contiguous()
            if param == "gate_up_proj":
                half = be.shape[0] // 2
                parts = {gate: (ae, be[:half].contiguous()), up: (ae.clone(), be[half:].contiguous())}
            elif param == "down_proj":
                parts = {down: (ae, be)}
            else:
                raise LayoutError(f"{where}: target parameter experts.{param} has no vLLM equivalent")
            for proj, (pa, pb) in parts.items():
                result[f"{base}.{e}.{proj}.lora_A.weight"] = pa
                result[f"{base}.{e}.{proj}.lora_B.weight"] = pb

    vcfg = {k: v for k, v in cfg.items() if k != "target_parameters"}
    expert_names = {gate: "gate_up_proj", up: "gate_up_proj", down: "down_proj"}
    vcfg["target_modules"] = sorted(set(modules) | {n for n, p in expert_names.items() if p in wrapped})
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(vcfg, indent=2, sort_keys=True))
    return out
