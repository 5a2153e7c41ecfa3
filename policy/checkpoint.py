"""Run directories and atomic checkpoints of a PPO job.

    <state_dir>/policy_run/<run_id>/
        run.json                      what the run is: seed, steps, base checksum, reward version, config
        prompts.json                  the prompt pool snapshot (resume never re-reads the event log)
        checkpoints/step-000005/      adapter.safetensors, value_head.safetensors, optimizer.safetensors,
                                      rng.safetensors, state.json (step, KL controller, optimizer groups)
        latest                        name of the newest complete checkpoint (replaced atomically)
        done.json                     written once the candidate is published

A checkpoint is written to a temp directory, fsynced and renamed; only then is ``latest`` moved,
so a SIGKILL at any moment leaves the previous checkpoint valid. Tensors go to safetensors and
the rest to JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from looprl.ops.core.chat import Chat
from looprl.ops.core.locks import LockHeld, try_lock
from looprl.storage.registry import atomic_write_text, fsync_dir

CKPT_FILES = ("adapter.safetensors", "value_head.safetensors", "optimizer.safetensors", "rng.safetensors",
              "state.json")


class CheckpointError(RuntimeError):
    """A run directory or checkpoint is missing or unreadable; the message names the file."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # ---- run metadata ----
    def write_meta(self, meta: dict[str, Any], pool: list[Chat]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "prompts.json", json.dumps([c.to_json() for c in pool]))
        atomic_write_text(self.path / "run.json", json.dumps(meta, indent=2, default=str))

    def read_meta(self) -> tuple[dict[str, Any], list[Chat]]:
        try:
            meta = json.loads((self.path / "run.json").read_text())
            pool = [Chat.parse(p) for p in json.loads((self.path / "prompts.json").read_text())]
        except (OSError, ValueError) as e:
            raise CheckpointError(f"run {self.path}: unreadable run.json/prompts.json: {e}") from e
        return meta, pool

    def is_done(self) -> bool:
        return (self.path / "done.json").is_file()

    def mark_done(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.path / "done.json", json.dumps(info, indent=2, default=str))

    def done_info(self) -> dict[str, Any]:
        return json.loads((self.path / "done.json").read_text())

    # ---- one process per run ----
    def lock(self) -> FileLock:
        """Take the run's exclusive lock (released by ``.release()`` or when the process dies, even by SIGKILL)."""
        try:
            return try_lock(self.path / ".lock")
        except LockHeld:
            raise CheckpointError(f"run {self.run_id} is being trained by another process ({self.path}/.lock)") from None

    # ---- checkpoints ----
    def latest_step(self) -> int | None:
        p = self.path / "latest"
        if not p.is_file():
            return None
        name = p.read_text().strip()
        if not (self.checkpoints / name / "state.json").is_file():
            raise CheckpointError(f"{p} points at {name}, which is not a complete checkpoint")
        return int(name.split("-")[1])

    def save(self, step: int, learner_state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Atomically write the state after `step` steps (the next step to run is `step`)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        try:
            opt_tensors, opt_meta = _flatten_optimizer(learner_state["optimizer"])
            _save_tensors(learner_state["lora"], tmp / "adapter.safetensors")
            _save_tensors(learner_state["value_head"], tmp / "value_head.safetensors")
            _save_tensors(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
            _save_tensors({"torch": learner_state["rng"]}, tmp / "rng.safetensors")
            state = {"step": step, "kl_ctl": learner_state["kl_ctl"], "score_stats": learner_state["score_stats"],
                     "optimizer": opt_meta,
                     "saved_at": datetime.now(timezone.utc).isoformat(), **(extra or {})}
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=2, default=str))
            fsync_dir(tmp)
            final = self.checkpoints / name
            if final.exists():  # a re-run of the same step after a crash between rename and pointer
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.checkpoints)
            atomic_write_text(self.path / "latest", name + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep=2)
        return final

    def load(self, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(step, learner state, state.json) of the newest (or given) checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"run {self.path} has no checkpoint")
        d = self.checkpoints / f"step-{step:06d}"
        try:
            state = json.loads((d / "state.json").read_text())
            opt = load_file(str(d / "optimizer.safetensors"))
            opt.pop("_empty", None)
            learner_state = {
                "lora": load_file(str(d / "adapter.safetensors")),
                "value_head": load_file(str(d / "value_head.safetensors")),
                "optimizer": _unflatten_optimizer(opt, state["optimizer"]),
                "kl_ctl": state["kl_ctl"],
                "score_stats": state["score_stats"],
                "rng": load_file(str(d / "rng.safetensors"))["torch"],
            }
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {d} is unreadable: {e}") from e
        return int(state["step"]), learner_state, state

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.checkpoints.glob(".tmp-*"):  # leftovers of a checkpoint killed mid-write
            shutil.rmtree(p, ignore_errors=True)


def runs_root(state_dir: Path) -> Path:
    return Path(state_dir) / "policy_run"


def latest_unfinished(state_dir: Path) -> RunDir | None:
    """The most recently started run that has not published its candidate yet."""
    root = runs_root(state_dir)
    if not root.is_dir():
        return None
    runs = [RunDir(p) for p in root.iterdir() if (p / "run.json").is_file() and not (p / "done.json").exists()]
    if not runs:
        return None
    return max(runs, key=lambda r: (r.path / "run.json").stat().st_mtime)
