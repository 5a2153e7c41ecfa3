"""The Mixture-of-Experts families looprl trains, and where LoRA goes in each (part of the
base-model contract, with ``looprl.policy.model``).

A base checkpoint is accepted when its ``config.json`` ``model_type`` is one of ``FAMILIES``, as
transformers 5 implements them. In all five the routed experts of a layer are one module,
``mlp.experts``, holding fused parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
and the router is ``mlp.gate``; Qwen2-MoE adds a shared expert (``mlp.shared_expert``, Linear
layers) mixed in by ``mlp.shared_expert_gate``; DeepSeek-V3 adds shared experts
(``mlp.shared_experts``), uses low-rank attention (MLA: ``q_proj`` or ``q_a_proj``/``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) and keeps its first ``first_k_dense_replace``
layers dense (``mlp.gate_proj``/``up_proj``/``down_proj``).

LoRA targets are discovered on the loaded model (``discover_targets``), so the same config works
for every family: the attention projections the family has, the routed experts (fused 3-D
parameters through peft ``target_parameters``, or per-expert Linear layers ``experts.N.w1``:
the transformers-4 layout, which peft only round-trips under names its v4 checkpoint conversion
leaves alone), the shared experts' and the dense layers' MLP projections (by name in
``target_modules``, or by weight in ``target_parameters`` where peft would rename the name:
``_split_targets``). Routers and gates (``mlp.gate``, ``shared_expert_gate``) are never adapted:
moving them would change which experts see which tokens and how much the shared expert adds,
which the base's load balance was trained for. A config's explicit target list still works
(``resolve_targets``); an entry that matches nothing, or that reaches a router, is an error.

The checkpoint itself is checked before transformers reads it (``inspect_checkpoint``): a bad
config.json, missing, truncated or garbled safetensors, and an unsupported family each get an
error naming the directory and the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from torch import nn

if TYPE_CHECKING:  # heavy imports stay lazy: `looprl --help` must not import transformers
    from transformers import PretrainedConfig

AUTO = "auto"
Targets = Sequence[str] | Literal["auto"]


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str
    # Linear layers of the attention block (`self_attn`) that take LoRA, when the model has them.
    attention: tuple[str, ...]
    # config keys holding the number of routed experts / experts per token
    experts_key: str
    shared_experts_key: str | None = None


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen3_moe", "Qwen3-MoE", ("q_proj", "k_proj", "v_proj", "o_proj"), "num_experts"),
    Family("mixtral", "Mixtral", ("q_proj", "k_proj", "v_proj", "o_proj"), "num_local_experts"),
    Family("olmoe", "OLMoE", ("q_proj", "k_proj", "v_proj", "o_proj"), "num_experts"),
    Family("qwen2_moe", "Qwen2-MoE", ("q_proj", "k_proj", "v_proj", "o_proj"), "num_experts",
           shared_experts_key="shared_expert_intermediate_size"),
    Family("deepseek_v3", "DeepSeek-V3",
           ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"), "n_routed_experts",
           shared_experts_key="n_shared_experts"),
)}

# Modules that route or gate (never adapted): the router `mlp.gate` (also `router` elsewhere) and
# any `*_gate` mixing weight such as Qwen2-MoE's `shared_expert_gate`.
_ROUTER_NAMES = frozenset({"gate", "router"})
_SHARED_NAMES = ("shared_expert", "shared_experts")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class BaseModelError(ValueError):
    """A base checkpoint looprl cannot use; the message names the directory and the file."""


class UnsupportedModel(BaseModelError):
    """A checkpoint of an architecture that is not one of the supported MoE families."""


def supported() -> str:
    return ", ".join(FAMILIES)


def is_router(name: str) -> bool:
    """Whether a module or parameter path is a router or a gate (``...mlp.gate``,
    ``...mlp.gate.weight``, ``...shared_expert_gate``), which must stay frozen."""
    parts = name.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return any(p in _ROUTER_NAMES or p.endswith("_gate") for p in parts)


# ------------------------------------------------------------------------------ families
def family_of(config: "PretrainedConfig | dict[str, Any]", where: object = "the base model") -> Family:
    """The supported family of a transformers config (or config.json as a dict), else
    ``UnsupportedModel`` naming the model_type, the architecture and what is missing."""
    data = config if isinstance(config, dict) else config.to_dict()
    model_type = data.get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is not None:
        return fam
    arch = ", ".join(data.get("architectures") or []) or "unknown architecture"
    if not any(data.get(k) for k in _EXPERT_COUNT_KEYS):
        missing = f"no mlp.experts (config.json sets none of {', '.join(_EXPERT_COUNT_KEYS)})"
    else:
        missing = "its experts' layout has no LoRA target discovery in looprl"
    raise UnsupportedModel(f"{where}: model_type {model_type!r} ({arch}) is not a Mixture-of-Experts family "
                           f"looprl supports ({supported()}): {missing}")


def expert_counts(config: "PretrainedConfig | dict[str, Any]") -> tuple[int, int]:
    """(routed experts per MoE layer, experts per token) of a supported family's config."""
    data = config if isinstance(config, dict) else config.to_dict()
    fam = family_of(data)
    n = data.get(fam.experts_key) or next((data[k] for k in _EXPERT_COUNT_KEYS if data.get(k)), 0)
    return int(n), int(data.get("num_experts_per_tok") or 0)


# ------------------------------------------------------------------------------ checkpoints
@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    family: Family
    architecture: str
    parameters: int
    experts: int
    experts_per_token: int
    layers: int
    hidden_size: int
    weight_files: tuple[str, ...] = field(default=())


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict; errors name the file."""
    path = Path(path)
    conf = path / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json (run `looprl init` or set model.base_path)")
    try:
        data = json.loads(conf.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BaseModelError(f"base model directory {path}: config.json is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"base model directory {path}: config.json is not a JSON object")
    return data


def family_of_dir(path: str | Path) -> str:
    """The supported family (model_type) of a checkpoint directory, from its config.json alone."""
    return family_of(read_config(path), where=f"base model directory {path}").model_type


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (the index's shards when there is one), all present."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BaseModelError(f"base model directory {path}: {index.name} is not a valid index ({e!r})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise BaseModelError(f"base model directory {path}: {index.name} lists missing weight files {missing[:3]}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(other[:3])}: only safetensors weights are loaded, never pickles)" if other else ""
        raise FileNotFoundError(f"base model directory {path} has no .safetensors weights{hint}")
    return files


def count_parameters(files: list[Path]) -> int:
    """Total elements over the tensors of safetensors files, read from their headers; a truncated
    or garbled file is an error naming it."""
    from safetensors import safe_open

    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    n = 1
                    for d in st.get_slice(key).get_shape():
                        n *= int(d)
                    total += n
        except Exception as e:  # SafetensorError (bad header, truncated), OSError
            raise BaseModelError(f"base model directory {f.parent}: weight file {f.name} is unreadable "
                                 f"(truncated or corrupt safetensors: {e})") from None
    return total


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Check a checkpoint directory without loading its weights: config.json parses, the family
    is supported, every safetensors file is present and its header readable."""
    path = Path(path)
    data = read_config(path)
    files = weight_files(path)
    if not isinstance(data.get("model_type"), str):
        raise BaseModelError(f"base model directory {path}: config.json has no model_type")
    fam = family_of(data, where=f"base model directory {path}")
    experts, top_k = expert_counts(data)
    return CheckpointInfo(
        path=path, family=fam, architecture=", ".join(data.get("architectures") or []) or fam.name,
        parameters=count_parameters(files), experts=experts, experts_per_token=top_k,
        layers=int(data.get("num_hidden_layers") or 0), hidden_size=int(data.get("hidden_size") or 0),
        weight_files=tuple(f.name for f in files))


def skeleton(path: str | Path) -> nn.Module:
    """The causal LM of a checkpoint directory without its weights (meta device): its module tree,
    for discovering LoRA targets without loading gigabytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------------------ LoRA targets
@dataclass(frozen=True)
class LoraTargets:
    """What peft adapts: ``target_modules`` (Linear layers by name, peft's suffix rule) and
    ``target_parameters`` (weights adapted in place: the fused experts, and Linear weights that
    peft would otherwise rename, see ``_split_targets``)."""

    target_modules: list[str]
    target_parameters: list[str]
    # the module paths and parameter paths they match in the model (for checks and tests)
    modules: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()

    def as_config(self) -> dict[str, Any]:
        return {"target_modules": list(self.target_modules), "target_parameters": list(self.target_parameters)}


def _matches(target: str, name: str) -> bool:
    # peft's rule for list entries: the full name, or a name ending in "." + target.
    return name == target or name.endswith("." + target)


def _matched_modules(model: nn.Module, targets: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and any(_matches(t, n) for t in targets)]


def _matched_parameters(model: nn.Module, targets: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(_matches(t, n) for t in targets)]


def _linear_children(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, m in module.named_modules() if n and isinstance(m, nn.Linear)
            and not is_router(n)]


def discover_targets(model: nn.Module, where: object = "the base model") -> LoraTargets:
    """Where LoRA goes in a loaded model of a supported family (see the module docstring)."""
    config = getattr(model, "config", None)
    fam = family_of(config if config is not None else {}, where=where)
    linears: list[str] = []
    fused: set[str] = set()
    experts_found = False
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "self_attn":
            linears += [f"{name}.{a}" for a in fam.attention if isinstance(getattr(mod, a, None), nn.Linear)]
        elif last == "mlp":
            experts = getattr(mod, "experts", None)
            if experts is None:  # a dense layer (DeepSeek-V3's first layers): its MLP projections
                linears += _linear_children(mod, name)
                continue
            experts_found = True
            stacked = [p for p, t in experts.named_parameters(recurse=False) if t.dim() == 3]
            if stacked:  # transformers 5: one 3-D parameter per projection, peft target_parameters
                fused.update(f"experts.{p}" for p in stacked)
            else:  # per-expert Linear layers (experts.N.w1, experts.N.gate_proj, ...)
                linears += _linear_children(experts, f"{name}.experts")
            for shared in _SHARED_NAMES:
                if isinstance(getattr(mod, shared, None), nn.Module):
                    linears += _linear_children(getattr(mod, shared), f"{name}.{shared}")
    if not experts_found:
        raise UnsupportedModel(f"{where}: model_type {fam.model_type!r} ({type(model).__name__}) has no mlp.experts "
                               "in any layer: looprl trains Mixture-of-Experts models")
    if not any(n.endswith(tuple(f"self_attn.{a}" for a in fam.attention)) for n in linears):
        raise UnsupportedModel(f"{where}: {type(model).__name__} has none of the {fam.name} attention projections "
                               f"{list(fam.attention)}")
    by_name, by_weight = _split_targets(model, linears)
    params = sorted(fused) + by_weight
    return LoraTargets(by_name, params, tuple(_matched_modules(model, by_name)),
                       tuple(_matched_parameters(model, params)))


def _split_targets(model: nn.Module, linears: list[str]) -> tuple[list[str], list[str]]:
    """Peft target entries for exactly the Linear layers ``linears``: (target_modules,
    target_parameters).

    A layer goes in ``target_modules`` by its last name (``q_proj``) when that name matches only
    wanted layers and peft keeps it. peft's transformers-5 conversion renames the v4 per-expert
    names of an MoE model type (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``-``w3``)
    in ``target_modules`` to the fused experts, dotted names included (peft issue #3711), so a
    shared expert's or a dense layer's ``gate_proj`` would silently lose its LoRA, when created
    and again when a saved adapter is loaded. Such layers are adapted through their weight in
    ``target_parameters`` instead (``shared_expert.gate_proj.weight``), which peft leaves alone:
    the same LoRA (W + s B A), a standard adapter that ``PeftModel.from_pretrained`` loads."""
    want = set(linears)
    by_leaf: dict[str, set[str]] = {}
    for n in want:
        by_leaf.setdefault(n.rsplit(".", 1)[-1], set()).add(n)
    kept = peft_keeps(model, sorted(by_leaf))
    names, rest = [], set()
    for leaf, paths in sorted(by_leaf.items()):
        if leaf in kept and set(_matched_modules(model, [leaf])) == paths:
            names.append(leaf)
        else:
            rest |= paths
    # the path below the layer index ("mlp.shared_expert.gate_proj") names the same layer of every
    # decoder layer; fall back to full paths if that ever matches more
    weights = sorted({re.sub(r"^.*?\.\d+\.", "", n, count=1) + ".weight" for n in rest})
    if set(_matched_parameters(model, weights)) != {n + ".weight" for n in rest}:
        weights = sorted(n + ".weight" for n in rest)
    return names, weights


def peft_keeps(model: nn.Module, names: list[str]) -> set[str]:
    """Which ``target_modules`` entries peft's transformers-5 MoE conversion leaves as they are
    for this model (each tried alone, on a throw-away config)."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a peft without that conversion keeps every entry
        return set(names)
    kept = set()
    for n in names:
        trial = LoraConfig(target_modules=[n], target_parameters=[])
        try:
            convert_peft_config_for_transformers(trial, model, None)
        except (ValueError, TypeError):  # "cannot convert gate_proj without up_proj"; or another peft API:
            continue                      # either way the weight (target_parameters) is the safe route
        if n in set(trial.target_modules or ()) and not trial.target_parameters:
            kept.add(n)
    return kept


def resolve_targets(model: nn.Module, target_modules: Targets = AUTO, target_parameters: Targets = AUTO,
                    section: str = "policy") -> LoraTargets:
    """The LoRA targets for ``model`` from a config's ``target_modules``/``target_parameters``:
    "auto" discovers them per family; an explicit list is kept as given, and must match (each
    entry something, nothing a router or gate, nothing peft would rename, and the two lists
    together something)."""
    auto = target_modules == AUTO or target_parameters == AUTO
    found = discover_targets(model, where=f"{section} LoRA on {type(model).__name__}") if auto else None
    arch = type(model).__name__
    if target_modules == AUTO:
        tm = list(found.target_modules)
    else:
        tm = list(target_modules)
        missing = [t for t in tm if not _matched_modules(model, [t])]
        if missing:
            raise ValueError(f"{section}.target_modules {missing} match no module of {arch} "
                             f"(use \"auto\" to discover the targets of this family)")
        _refuse_routers(_matched_modules(model, tm), section)
        renamed = sorted(set(tm) - peft_keeps(model, tm))
        if renamed:
            raise ValueError(f"{section}.target_modules {renamed}: peft renames these to the fused experts on "
                             f"{arch}; name the layers' weights in target_parameters (e.g. "
                             f"'shared_expert.gate_proj.weight') or use \"auto\"")
    if target_parameters == AUTO:
        tp = list(found.target_parameters)
    else:
        tp = list(target_parameters)
        missing = [t for t in tp if not _matched_parameters(model, [t])]
        if missing:
            raise ValueError(f"{section}.target_parameters {missing} match no parameter of {arch} "
                             f"(use \"auto\" to discover the targets of this family)")
    mods, params = _matched_modules(model, tm), _matched_parameters(model, tp)
    if not mods and not params:
        raise ValueError(f"{section}.target_modules and target_parameters select nothing to train in {arch}")
    _refuse_routers([*mods, *params], section)
    return LoraTargets(tm, tp, tuple(mods), tuple(params))


def _refuse_routers(names: list[str], section: str) -> None:
    frozen = [n for n in names if is_router(n)]
    if frozen:
        raise ValueError(f"{section} LoRA targets reach a router or gate, which must stay frozen: {frozen[:3]}")


def adapted_routers(model: nn.Module) -> list[str]:
    """Trainable parameters on a router or gate, LoRA or not (must be none after attaching LoRA)."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and is_router(n.split(".lora_")[0].replace(".base_layer", ""))]
