"""Checks that stand between an admin request and the model: which LoRA adapters may be loaded.

An adapter is accepted only if
- its path is a published version of the registry (``<registry>/<kind>/v<N>``), resolved with
  symlinks followed, so ``../`` or a link out of the registry is refused;
- the version's files match its manifest checksums and it was trained on this base model;
- its manifest status is not ``rejected`` (by the gate) or ``rolled_back`` (by the canary, an
  operator or the controller), unless the admin request forces it;
- it is a peft LoRA directory with safetensors weights only (never pickle);
- it is compatible with the base: every target module / target parameter exists in the base,
  its rank is at most ``max_lora_rank``, and it uses no feature a multi-adapter server cannot
  serve safely (``modules_to_save``, DoRA, trainable tokens).

Every refusal is an ``AdapterError`` whose message names the file or config key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looprl.storage.registry import Registry, RegistryError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# Versions that were judged unfit for users (looprl.storage.releases): served only when forced.
REFUSED_STATUSES = ("rejected", "rolled_back")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter request that is refused. ``reason`` is a bounded label for metrics, which the
    HTTP layer maps to a status (``looprl.serving.app.http_status``)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BaseInventory:
    """What an adapter may target: module names and (module, parameter) pairs of the bare base."""

    modules: frozenset[str]
    parameters: frozenset[str]  # "<module>.<param>"
    checksum: str | None = None

    @classmethod
    def of(cls, model: Any, checksum: str | None = None) -> "BaseInventory":
        modules = frozenset(n for n, _ in model.named_modules() if n)
        params = frozenset(n for n, _ in model.named_parameters())
        return cls(modules, params, checksum)


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter, ready to inject."""

    name: str
    path: Path
    version: str  # registry version, e.g. "v3": what responses and feedback are attributed to
    kind: str
    rank: int
    target_parameters: tuple[str, ...]
    config: dict[str, Any] = field(repr=False)


def check_name(name: Any, reserved: set[str] = frozenset()) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(
            f"lora_name {name!r} is invalid: 1-64 characters of letters, digits, '.', '_', ':' or '-'",
            reason="bad_name",
        )
    if name in reserved:
        raise AdapterError(f"lora_name {name!r} is reserved (base model or alias name)", reason="bad_name")
    return name


def resolve_registry_path(lora_path: Any, registry_root: Path) -> tuple[str, str, Path]:
    """(kind, version, real path) of a registry version directory; refuses anything else."""
    if not isinstance(lora_path, str) or not lora_path or "\x00" in lora_path:
        raise AdapterError(f"lora_path {lora_path!r} is invalid", reason="bad_path")
    root = Path(registry_root).resolve()
    p = Path(lora_path)
    if not p.is_absolute():
        p = root / p
    real = p.resolve()
    try:
        rel = real.relative_to(root)
    except ValueError:
        raise AdapterError(
            f"lora_path {lora_path!r} is outside the registry root {root}; adapters load only from the registry",
            reason="outside_registry",
        ) from None
    parts = rel.parts
    if len(parts) != 2 or not re.match(r"^v[1-9][0-9]*$", parts[1]):
        raise AdapterError(
            f"lora_path {lora_path!r} is not a published registry version (<registry>/<kind>/v<N>)",
            reason="bad_path",
        )
    if not real.is_dir():
        raise AdapterError(f"lora_path {lora_path!r} does not exist", reason="not_found")
    return parts[0], parts[1], real


def _matches_module(target: str, modules: frozenset[str]) -> bool:
    # peft's rule for list entries: the full name, or a name ending in "." + target.
    return target in modules or any(m.endswith("." + target) for m in modules)


def check_compatible(cfg: dict[str, Any], inv: BaseInventory, max_rank: int, where: str) -> tuple[int, tuple[str, ...]]:
    """Validate a parsed adapter_config.json against the base. Returns (rank, target_parameters)."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA", reason="incompatible")
    rank = cfg.get("r")
    ranks = [rank, *(cfg.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterError(f"{where}: key 'r' must be a positive integer, got {rank!r}", reason="incompatible")
    if max(ranks) > max_rank:
        raise AdapterError(
            f"{where}: rank {max(ranks)} exceeds serving.max_lora_rank={max_rank}", reason="rank_too_large"
        )
    for key in ("modules_to_save", "trainable_token_indices"):
        if cfg.get(key):
            raise AdapterError(f"{where}: key '{key}' is not supported by the multi-adapter server", reason="incompatible")
    if cfg.get("use_dora"):
        raise AdapterError(f"{where}: key 'use_dora' (DoRA) is not supported", reason="incompatible")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{where}: key 'target_modules' is not a valid regex: {e}", reason="incompatible") from None
        if not any(pattern.fullmatch(m) for m in inv.modules):
            raise AdapterError(f"{where}: target_modules regex {targets!r} matches no module of the base", reason="incompatible")
    else:
        missing = [t for t in targets if not _matches_module(t, inv.modules)]
        if missing:
            raise AdapterError(f"{where}: target_modules {missing} do not exist in the base model", reason="incompatible")
    tparams = tuple(cfg.get("target_parameters") or ())
    missing = [t for t in tparams if not any(p == t or p.endswith("." + t) for p in inv.parameters)]
    if missing:
        raise AdapterError(f"{where}: target_parameters {missing} do not exist in the base model", reason="incompatible")
    if not targets and not tparams:
        raise AdapterError(f"{where}: the adapter targets nothing (no target_modules or target_parameters)", reason="incompatible")
    return max(ranks), tparams


def read_adapter(
    name: str, lora_path: Any, registry_root: Path, inv: BaseInventory, max_rank: int, *, force: bool = False
) -> AdapterSpec:
    """All the checks that need no model lock: path, registry checksums, status, files, config.
    ``force`` lets a rejected or rolled-back version through (nothing else)."""
    kind, version, path = resolve_registry_path(lora_path, registry_root)
    reg = Registry(Path(registry_root).resolve())
    try:
        manifest, _ = reg.open(kind, version, base_checksum=inv.checksum)
    except RegistryError as e:
        raise AdapterError(f"lora_path {lora_path!r}: {e}", reason="registry") from None
    if manifest.status in REFUSED_STATUSES and not force:
        raise AdapterError(
            f"lora_path {lora_path!r}: {kind}/{version} is {manifest.status} ({manifest.reason or 'no reason given'}); "
            f"serving refuses {' and '.join(REFUSED_STATUSES)} versions unless the load request says \"force\": true",
            reason="refused_status",
        )
    for p in path.iterdir():
        if p.is_file() and p.suffix not in (".json", ".safetensors", ".md", ".txt"):
            raise AdapterError(f"{p.name}: only safetensors weights and JSON configs are accepted", reason="bad_file")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path}: missing {WEIGHTS_FILE} (peft LoRA weights in safetensors)", reason="bad_file")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_FILE}", reason="bad_file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON: {e}", reason="bad_file") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object", reason="bad_file")
    rank, tparams = check_compatible(cfg, inv, max_rank, where=str(cfg_path))
    return AdapterSpec(name=name, path=path, version=version, kind=kind, rank=rank, target_parameters=tparams, config=cfg)
