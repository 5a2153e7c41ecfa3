"""Fixtures of the serving tests: the shared tiny MoE base (``tiny_base``), a registry of LoRA adapters on it
(attention + fused-expert LoRA, expert-only, too-large rank, incompatible), workspaces/configs,
and embedded servers started once per test module on free loopback ports."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ADMIN_TOKEN = "test-admin-token"
MAX_LORA_RANK = 8


@pytest.fixture(scope="session")
def serving_base(tiny_base) -> Path:
    return Path(tiny_base)


@dataclass
class AdapterSet:
    """A registry (read-only template) and what its versions are."""

    registry: Path
    checksum: str
    good: list[str]  # compatible attention + expert LoRAs
    experts_only: str  # LoRA on the fused expert parameters only
    too_large: str  # rank > MAX_LORA_RANK
    incompatible: str  # targets a module the base does not have
    tampered: str  # weights modified after publishing (checksum mismatch)


@pytest.fixture(scope="session")
def serving_adapters(serving_base, tmp_path_factory) -> AdapterSet:
    from adapters_testing import make_adapter, publish_adapter

    from looprl.policy.model import base_checksum
    from looprl.storage.registry import Registry

    root = tmp_path_factory.mktemp("serving-registry") / "registry"
    reg = Registry(root)
    ck = base_checksum(serving_base)
    good = [publish_adapter(reg, serving_base, ck, seed=s, scale=4.0) for s in (1, 2, 3)]
    experts_only = _experts_only(reg, serving_base, ck)
    too_large = publish_adapter(reg, serving_base, ck, seed=5, rank=2 * MAX_LORA_RANK)
    with tempfile.TemporaryDirectory() as tmp:
        a = make_adapter(serving_base, Path(tmp) / "a", seed=6)
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg["target_modules"] = sorted(set(cfg["target_modules"]) | {"missing_proj"})
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        incompatible = reg.publish("policy", a, base_checksum=ck).version
    tampered = publish_adapter(reg, serving_base, ck, seed=7)
    w = reg.version_dir("policy", tampered) / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    (root / "policy" / "latest").unlink(missing_ok=True)
    return AdapterSet(root, ck, good, experts_only, too_large, incompatible, tampered)


def _experts_only(reg, base: Path, ck: str) -> str:
    """An adapter with LoRA only on ``experts.gate_up_proj`` / ``experts.down_proj``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    torch.manual_seed(11)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        (Path(tmp) / "README.md").unlink(missing_ok=True)
        return reg.publish("policy", tmp, base_checksum=ck).version


def make_workspace(dst: Path, adapters: AdapterSet) -> Path:
    """A fresh workspace whose registry is a copy of the session's adapter registry."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapters.registry, dst / "registry")
    return dst


def serving_config(workspace: Path, base: Path, **serving: Any):
    from looprl.ops.core.config import load_config

    s = {"max_lora_rank": MAX_LORA_RANK, "admin_token": ADMIN_TOKEN, "max_batch_size": 16, "torch_threads": 1,
         "controller_poll_seconds": 0.2, "controller_retries": 2, "controller_timeout_seconds": 10.0,
         "default_max_tokens": 16, "unload_grace_seconds": 0.0, **serving}
    return load_config(environ={}, workspace=workspace, model={"base_path": str(base)}, serving=s)


class CapturingLogger:
    """Stands in for ``looprl.ingest.client.ResponseLogger``."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._lock = threading.Lock()

    def log(self, event: Any) -> None:
        with self._lock:
            self.events.append(event)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunningServer:
    url: str
    cfg: Any
    service: Any
    thread: Any
    logger: CapturingLogger | None
    adapters: AdapterSet
    token: str = ADMIN_TOKEN
    extra: dict = field(default_factory=dict)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def registry_path(self, version: str) -> str:
        return str(self.cfg.registry_dir / "policy" / version)


def start_server(workspace: Path, base: Path, adapters: AdapterSet, logger: Any = "capture", **serving: Any) -> RunningServer:
    import torch

    from looprl.serving.server import ServerThread, build_service

    torch.set_num_threads(1)
    cfg = serving_config(workspace, base, **serving)
    service = build_service(cfg)
    lg = CapturingLogger() if logger == "capture" else logger
    th = ServerThread(service, admin_token=ADMIN_TOKEN, response_logger=lg,
                      default_max_tokens=cfg.serving.default_max_tokens,
                      render_prompts=cfg.serving.render_prompts, max_body_bytes=cfg.serving.max_body_bytes,
                      max_prompt_chars=cfg.serving.max_prompt_chars).start()
    return RunningServer(th.url, cfg, service, th, lg if isinstance(lg, CapturingLogger) else None, adapters)


@pytest.fixture(scope="module")
def serving_server(serving_base, serving_adapters, tmp_path_factory):
    """One embedded server per test module (free port), stopped at the end of the module."""
    ws = make_workspace(tmp_path_factory.mktemp("serving-ws"), serving_adapters)
    srv = start_server(ws, serving_base, serving_adapters)
    yield srv
    srv.thread.stop()
