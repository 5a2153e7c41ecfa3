"""A registry version for release tests: a tiny published policy adapter in a chosen status."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from looprl.storage.registry import Registry
from looprl.storage.releases import KIND


def publish_version(reg: Registry, tmp_path: Path, status: str = "candidate", parent: str | None = None) -> str:
    src = tmp_path / f"src{len(reg.versions(KIND))}"
    src.mkdir()
    save_file({"w": torch.zeros(2)}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text("{}")
    v = reg.publish(KIND, src, base_checksum="b" * 64, parent=parent).version
    if status != "candidate":
        reg.set_status(KIND, v, status, f"test: {status}")
    return v
