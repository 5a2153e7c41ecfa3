"""`looprl init [--base PATH] [--force] [--quiet]`: create the workspace layout and give it a base
model. On a workspace that has a base model it checks it and does nothing else unless ``--force``.

Without ``--base`` it builds the tiny MoE base into ``cfg.base_path``. With ``--base PATH`` (a
local Hugging Face checkpoint directory of a supported MoE family) it checks the checkpoint
(config.json, family, safetensors headers, tokenizer) and links ``<workspace>/base -> PATH``
(absolute), so every later command on the workspace finds it through the default
``model.base_path`` without copying gigabytes. When ``model.base_path`` is set it must be the same
directory; in containers, mount the checkpoint and set ``model.base_path`` instead of the link."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from looprl.ops.core.config import LooprlConfig

WORKSPACE_DIRS = ("events", "registry", "state", "ray", "reports")


def _human(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe_base(path: Path) -> tuple[dict, str]:
    """Check a base checkpoint as every stage will load it (config, family, weights' headers,
    tokenizer with its pad fallback and chat template) without loading its weights. Returns
    (figures, checksum); raises BaseModelError / FileNotFoundError naming the directory and file."""
    from transformers import AutoTokenizer

    from looprl.policy.model import BaseModelError, base_checksum, ensure_chat_template, ensure_pad_token, \
        inspect_checkpoint

    info = inspect_checkpoint(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise BaseModelError(f"base model directory {path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    ensure_pad_token(tok, path)
    ensure_chat_template(tok, path)
    figures = {"family": info.family.model_type, "name": info.family.name, "architecture": info.architecture,
               "parameters": info.parameters, "experts": info.experts, "experts_per_token": info.experts_per_token,
               "layers": info.layers, "hidden_size": info.hidden_size, "vocab": len(tok)}
    return figures, base_checksum(path)


def _print_base(console: Console, path: Path, figures: dict, checksum: str, head: str) -> None:
    console.print(f"[bold green]{head}[/] {path}" + (f" -> {path.resolve()}" if path.is_symlink() else ""))
    console.print(f"  family      {figures['name']} ({figures['family']}, {figures['architecture']})")
    console.print(f"  parameters  {_human(figures['parameters'])} ({figures['parameters']:,}), "
                  f"{figures['layers']} layers, hidden {figures['hidden_size']}, vocab {figures['vocab']:,}")
    console.print(f"  experts     {figures['experts']} routed, top-{figures['experts_per_token']}")
    console.print(f"  checksum    {checksum}")


def _link_base(args: argparse.Namespace, cfg: LooprlConfig, console: Console) -> int:
    from looprl.policy.families import BaseModelError

    src = Path(args.base).expanduser().resolve()
    try:
        figures, checksum = describe_base(src)
    except (BaseModelError, FileNotFoundError) as e:
        print(f"looprl init: {e}", file=sys.stderr)
        return 2
    if cfg.model.base_path is not None:
        if Path(cfg.model.base_path).expanduser().resolve() != src:
            print(f"looprl init: model.base_path is {cfg.model.base_path}, not --base {args.base}: unset "
                  "model.base_path to link the workspace to --base, or pass the same directory", file=sys.stderr)
            return 2
        _print_base(console, Path(cfg.model.base_path), figures, checksum, "base model (model.base_path)")
        return 0
    link = cfg.workspace / "base"
    if link.is_symlink() and link.resolve() == src:
        _print_base(console, link, figures, checksum, "base model already linked; nothing to do:")
        return 0
    if link.is_symlink() or link.exists():
        what = f"a link to {os.readlink(link)}" if link.is_symlink() else "a base model directory"
        if not args.force:
            print(f"looprl init: {link} is already {what}; use --force to replace it with a link to {src}",
                  file=sys.stderr)
            return 2
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
        if any((cfg.registry_dir / kind).glob("v*") for kind in ("policy", "reward")):
            console.print("[yellow]note[/] versions in the registry were trained on the previous base; every stage "
                          "refuses them on this one (their base checksum differs)")
    link.symlink_to(src, target_is_directory=True)
    _print_base(console, link, figures, checksum, "base model linked")
    return 0


def _init(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    console = Console(stderr=True)
    ws = cfg.workspace
    for name in WORKSPACE_DIRS:
        (ws / name).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]workspace[/] {ws.resolve()}: {', '.join(d + '/' for d in WORKSPACE_DIRS)} ready")
    if args.base is not None:
        return _link_base(args, cfg, console)

    from looprl.ops.sim.base import create_base
    from looprl.policy.families import BaseModelError
    from looprl.policy.model import base_checksum

    base = cfg.base_path
    if (base / "config.json").is_file() and not args.force:
        try:
            figures, checksum = describe_base(base)
        except (BaseModelError, FileNotFoundError) as e:
            print(f"looprl init: {e}", file=sys.stderr)
            return 2
        _print_base(console, base, figures, checksum, "base model exists; nothing to do (use --force to rebuild):")
        return 0
    if base.is_symlink() and not args.force:
        print(f"looprl init: {base} links to {os.readlink(base)}, which has no config.json; use --force to replace "
              "the link with a tiny built base, or `looprl init --base PATH --force` to link another checkpoint",
              file=sys.stderr)
        return 2
    if cfg.model.base_path is not None and not args.force and base.exists():
        console.print(f"[red]model.base_path {base} exists but has no config.json; refusing to overwrite (use --force)")
        return 2
    if base.is_symlink():  # --force: build the tiny base here, never into the linked checkpoint
        base.unlink()
    console.print(f"[bold]base model[/] building {cfg.model.family} "
                  f"(hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, {cfg.model.num_experts} experts, "
                  f"top-{cfg.model.experts_per_token}), pre-training {cfg.model.pretrain_steps} steps ...")
    out = create_base(cfg, progress=not args.quiet)
    console.print(f"[bold green]base model ready[/] {out} (checksum {base_checksum(out)[:12]})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="create the workspace and its base model: build the tiny MoE base, or link yours (--base)",
        description="Create the workspace. Without --base, build the tiny MoE base model into <workspace>/base. "
                    "With --base PATH, check a local Hugging Face checkpoint of a supported MoE family (qwen3_moe, "
                    "mixtral, olmoe, qwen2_moe, deepseek_v3) and link <workspace>/base -> PATH (nothing is copied "
                    "or downloaded); every later command on the workspace then uses it. Idempotent.")
    p.add_argument("--base", metavar="PATH", help="a local Hugging Face MoE checkpoint directory to use as the base")
    p.add_argument("--force", action="store_true",
                   help="rebuild the tiny base, or replace the workspace's base with the link to --base")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_init)
