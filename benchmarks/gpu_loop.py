"""Bring your own model, on a GPU: reward updates, PPO steps (rollout + learning) and served
generation on a Qwen3-30B-A3B-shaped MoE with few layers, through looprl's own code paths.

    python benchmarks/gpu_loop.py                 # needs CUDA (exits 2 without it)
    python benchmarks/gpu_loop.py --layers 8      # 4-8 decoder layers (default 4)
    python benchmarks/gpu_loop.py --cpu-smoke     # tiny shapes on the CPU in well under a minute:
                                                  # checks the script end to end, measures nothing

The base: hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of intermediate 768, top-8,
a 151,936-token vocabulary, bf16 (``model.dtype`` "auto"), random weights from transformers'
``Qwen3MoeConfig``, saved as a Hugging Face checkpoint with a tokenizer made here (word-level,
``tokenizer.json``) and a ChatML-style chat template. Nothing is downloaded.

1. reward updates: ``RewardModel.fresh`` (base + LoRA + head) trained by ``reward.train.train``, the
   updater's training loop, on synthetic preference pairs; tokens/s = sequence tokens / update time.
2. PPO steps, twice in this run: with the fused kernels (``kernels.*`` "auto": Triton MoE-LoRA and
   log-probs when triton is installed, else the torch fused / chunked paths) and with plain peft
   (peft's expert path, full-vocabulary log-softmax). ``trainer.LocalBackend`` + ``_one_step``, as
   ``looprl policy train`` runs them in one process (the learner samples its own rollouts, as the
   colocated Ray actor does), scored by the reward model of step 1. Rollout tokens/s = completion
   tokens / generation time; learner tokens/s = completion tokens / learning time (old-policy and
   base evaluation, PPO epochs).
3. serving: the fused run's adapter published to the registry and loaded into the embedded
   server (``serving.server.build_service``); concurrent chat requests, half on the adapter and half
   on the base; tokens/s = completion tokens / wall time.

Each stage first runs its start-up memory check (``looprl.policy.memory``); the stage's plan is
printed beside the peak memory measured (``torch.cuda.max_memory_allocated`` from the stage's start,
the reward model kept for scoring included; on the CPU the process's peak RSS, which includes the
Python runtime). The plans are the real stages': the reward updater's counts two copies of the base
(it also holds its published model), this script's reward step holds one. Prints human lines, then one JSON line;
writes ``benchmarks/results/gpu-loop-<device>.json`` (the CPU smoke: ``gpu-loop-cpu-smoke-quick.json``,
git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"

# Qwen3-30B-A3B, fewer layers.
GPU_SHAPE = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, expert_inter=768,
                 layers=4, vocab=151936, context=4096)
GPU_RUN = dict(reward_batch=16, reward_len=256, reward_pairs=64, reward_updates=2, rollout_batch=64, minibatch=16,
               prompt_words=48, prompt_tokens=128, new_tokens=128, ppo_epochs=1, steps=3, lora_rank=16,
               serve_requests=64, serve_batch=32, serve_tokens=128)
SMOKE_SHAPE = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, expert_inter=32,
                   layers=2, vocab=512, context=256)
SMOKE_RUN = dict(reward_batch=4, reward_len=48, reward_pairs=8, reward_updates=1, rollout_batch=4, minibatch=2,
                 prompt_words=8, prompt_tokens=32, new_tokens=6, ppo_epochs=1, steps=1, lora_rank=4,
                 serve_requests=4, serve_batch=4, serve_tokens=6)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + ' <|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def device_tag(name: str) -> str:
    """"NVIDIA H200" -> "cuda-nvidia-h200", the device part of a results file name."""
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` tokens with a ChatML-style template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["system", "user", "assistant"] + [f"w{i}" for i in range(vocab_size - len(SPECIALS) - 3)]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                  padding_side="right", model_max_length=1 << 16)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_base(shape: dict, out: Path, device: str, seed: int = 0) -> int:
    """Random-weight Qwen3-MoE checkpoint + tokenizer in ``out``; returns its parameter count."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    transformers.utils.logging.disable_progress_bar()
    tok = build_tokenizer(shape["vocab"])
    config = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
        moe_intermediate_size=shape["expert_inter"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        num_experts=shape["experts"], num_experts_per_tok=shape["top_k"], norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=shape["context"],
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # every weight explicitly: norms at 1, matrices N(0, 0.02) (no uninitialised experts)
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return n


def write_prompts(path: Path, n: int, words: int, vocab: int, rng: random.Random) -> Path:
    """Conversations with a system prompt, as .jsonl (``policy.prompts_file``)."""
    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 16)}" for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"messages": [{"role": "system", "content": text(8)},
                                             {"role": "user", "content": text(words)}]}) + "\n")
    return path


class Meter:
    """Peak memory of one stage: CUDA allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1024 ** 3
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def bench_reward(cfg, run: dict, meter: Meter, rng: random.Random):
    from looprl.ops.core.chat import Chat
    from looprl.policy.memory import GiB
    from looprl.policy.model import check_memory
    from looprl.reward.data import Example
    from looprl.reward.model import RewardModel, encode_answer
    from looprl.reward.train import train

    from datetime import datetime, timezone

    est = check_memory(cfg, "reward")
    meter.reset()
    rm = RewardModel.fresh(cfg)
    vocab = len(rm.tokenizer)
    answer = run["reward_len"] // 2

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 16)}" for _ in range(k))

    now = datetime.now(timezone.utc)
    examples = [Example(f"p{i}", "preference", Chat.user(text(answer // 2)), now, chosen=" " + text(answer),
                        rejected=" " + text(answer)) for i in range(run["reward_pairs"])]
    tokens = sum(len(encode_answer(rm.tokenizer, ex.prompt, c, rm.max_seq_len))
                 for ex in examples for c in (ex.chosen, ex.rejected))
    times = []
    for u in range(run["reward_updates"] + 1):  # the first update warms up (allocations, kernels)
        meter.sync()
        t0 = time.perf_counter()
        stats = train(rm, examples, lr=cfg.reward.learning_rate, batch_size=run["reward_batch"], epochs=1, seed=u)
        meter.sync()
        if u:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    out = {"tokens_per_s": tokens / s, "update_s": s, "steps_per_update": stats.steps, "loss": stats.loss,
           "peak_gb": meter.peak_gb(), "estimate_gb": est.total / GiB}
    return out, rm


class RewardScorer:
    """The reward model trained in step 1 as the PPO scorer (already in memory: not counted again)."""

    version = "bench:gpu-loop-reward"

    def __init__(self, rm):
        self.rm = rm

    def score(self, prompts, completions):
        return self.rm.score(prompts, completions)


def bench_ppo(cfg, scorer, steps: int, meter: Meter) -> tuple[dict, object]:
    from looprl.policy.memory import GiB, plan
    from looprl.policy.model import check_memory
    from looprl.policy.prompts import PromptSampler, configured_prompts
    from looprl.policy.trainer import LocalBackend, _one_step

    check_memory(cfg, "policy", reward_copies=0)  # the reward model is already resident
    est = plan(cfg, "policy", reward_copies=1)  # `looprl policy train`'s plan, its reward model included
    meter.reset()
    backend = LocalBackend(cfg, scorer)
    sampler = PromptSampler(configured_prompts(cfg), cfg.policy.seed)
    _one_step(backend, sampler, cfg, 0)  # warm-up: kernel compilation, first-call allocations
    rows = [_one_step(backend, sampler, cfg, s) for s in range(1, steps + 1)]
    tokens = sum(r["tokens"] for r in rows)
    out = {
        "step_s": statistics.median(r["step_s"] for r in rows),
        "rollout_tokens_per_s": tokens / sum(r["rollout_s"] for r in rows),
        "learner_tokens_per_s": tokens / sum(r["learn_wall_s"] for r in rows),
        "step_tokens_per_s": tokens / sum(r["step_s"] for r in rows),
        "completion_tokens_per_step": tokens / len(rows),
        "share": {k: sum(r[key] for r in rows) / sum(r["step_s"] for r in rows)
                  for k, key in (("rollout", "rollout_s"), ("score", "score_s"), ("learn", "learn_wall_s"))},
        "peak_gb": meter.peak_gb(), "estimate_gb": est.total / GiB,
        "kernels": {"moe_lora": cfg.kernels.moe_lora, "logprob": cfg.kernels.logprob},
    }
    return out, backend


def bench_serving(cfg, adapter_dir: Path, run: dict, meter: Meter, rng: random.Random) -> dict:
    from looprl.ops.core.chat import Chat
    from looprl.policy.memory import GiB
    from looprl.policy.model import base_checksum, check_memory, model_device, render_prompt_ids
    from looprl.serving.sampling import SamplingParams
    from looprl.serving.server import build_service, serving_moe_lora
    from looprl.storage.registry import Registry

    version = Registry(cfg.registry_dir).publish("policy", adapter_dir, base_checksum=base_checksum(cfg.base_path),
                                                 reason="gpu_loop benchmark").version
    est = check_memory(cfg, "serving")
    meter.reset()
    service = build_service(cfg)
    engine = service.engine
    try:
        service.load("bench", str(cfg.registry_dir / "policy" / version))
        vocab = len(engine.tokenizer)
        chats = [Chat.from_messages([{"role": "system", "content": "w1 w2 w3"},
                                     {"role": "user", "content": " ".join(f"w{rng.randrange(vocab - 16)}"
                                                                          for _ in range(run["prompt_words"]))}])
                 for _ in range(run["serve_requests"])]
        ids = [render_prompt_ids(engine.tokenizer, c) for c in chats]
        params = SamplingParams(max_tokens=run["serve_tokens"], temperature=1.0, ignore_eos=True)
        for adapter in (None, "bench"):  # warm-up: kernel compilation on both paths
            engine.generate(ids[0], SamplingParams(max_tokens=2, ignore_eos=True), adapter=adapter)
        adapters = [None if i % 2 else "bench" for i in range(len(ids))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(ids)) as pool:
            done = list(pool.map(lambda a: engine.generate(a[0], params, adapter=a[1], timeout=600.0), zip(ids, adapters)))
        wall = time.perf_counter() - t0
        failed = [d.error for d in done if d.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{len(failed)} served requests failed, e.g. {failed[0]}")
        tokens = sum(d.completion_tokens for d in done)
        return {"tokens_per_s": tokens / wall, "wall_s": wall, "requests": len(ids), "completion_tokens": tokens,
                "peak_gb": meter.peak_gb(), "estimate_gb": est.total / GiB,
                "moe_lora": serving_moe_lora(cfg.serving.moe_lora, model_device(engine.model))}
    finally:
        engine.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check the script end to end")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (4-8 on a GPU; default 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed PPO steps per kernel setting (after 1 warm-up)")
    ap.add_argument("--keep", type=Path, default=None, help="build the base and workspace here and keep them")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the results file goes")
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu_loop: no CUDA device (torch.cuda.is_available() is False): this benchmark measures a GPU. "
              "Run it on a GPU machine, or `python benchmarks/gpu_loop.py --cpu-smoke` to check the script "
              "on tiny shapes.", file=sys.stderr)
        return 2
    smoke = args.cpu_smoke
    shape = dict(SMOKE_SHAPE if smoke else GPU_SHAPE)
    run = dict(SMOKE_RUN if smoke else GPU_RUN)
    if args.layers is not None:
        if not smoke and not 4 <= args.layers <= 8:
            print("gpu_loop: --layers must be 4 to 8", file=sys.stderr)
            return 2
        shape["layers"] = args.layers
    if args.steps is not None:
        run["steps"] = max(1, args.steps)
    device = "cpu" if smoke else "cuda"

    from looprl.ops.core.config import load_config
    from looprl.ops.core.log import setup_logging
    from looprl.policy.model import resolve_placement

    setup_logging("WARNING")
    torch.set_num_threads(min(4, os.cpu_count() or 1) if smoke else max(1, (os.cpu_count() or 2) // 2))
    work = args.keep or Path(tempfile.mkdtemp(prefix="looprl-gpu-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    meter = Meter(cuda and not smoke)
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        params = build_base(shape, work / "base", device)
        build_s = time.perf_counter() - t0
        prompts = write_prompts(work / "prompts.jsonl", 256, run["prompt_words"], shape["vocab"], rng)
        common = dict(
            environ={},
            model={"base_path": str(work / "base"), "device": device, "dtype": "auto"},
            reward={"batch_size": run["reward_batch"], "max_seq_len": run["reward_len"], "lora_rank": run["lora_rank"],
                    "lora_alpha": 2 * run["lora_rank"]},
            policy={"prompts_file": str(prompts), "recent_prompts": 0, "rollout_batch_size": run["rollout_batch"],
                    "minibatch_size": run["minibatch"], "max_new_tokens": run["new_tokens"],
                    "max_prompt_tokens": run["prompt_tokens"], "ppo_epochs": run["ppo_epochs"],
                    "lora_rank": run["lora_rank"], "lora_alpha": 2 * run["lora_rank"],
                    "torch_threads": torch.get_num_threads()},
            serving={"max_batch_size": run["serve_batch"], "max_lora_rank": run["lora_rank"],
                     "max_context_tokens": run["prompt_tokens"] + run["serve_tokens"] + 16,
                     "torch_threads": torch.get_num_threads(), "log_responses": False},
        )
        fused = {"moe_lora": "auto", "logprob": "auto"} if not smoke else {"moe_lora": "torch", "logprob": "chunked"}
        cfgs = {name: load_config(workspace=work / f"ws-{name}", kernels=k, **common)
                for name, k in (("fused", fused), ("peft", {"moe_lora": "peft", "logprob": "naive"}))}
        placement = resolve_placement(cfgs["fused"].model)
        name = torch.cuda.get_device_name(placement.device) if placement.is_cuda else "CPU (smoke test)"
        from looprl.kernels import resolve_auto

        resolved = resolve_auto(fused["moe_lora"], fused["logprob"], placement.device)
        cfgs["fused"] = cfgs["fused"].model_copy(update={"kernels": cfgs["fused"].kernels.model_copy(
            update={"moe_lora": resolved[0], "logprob": resolved[1]})})
        print(f"device: {name}; {placement.describe()}; torch {torch.__version__}")
        print(f"base: Qwen3-MoE, {params / 1e6:,.1f}M parameters: hidden {shape['hidden']}, {shape['layers']} layers, "
              f"{shape['experts']} experts top-{shape['top_k']} of {shape['expert_inter']}, vocab {shape['vocab']} "
              f"(built and saved in {build_s:.1f}s)")
        print(f"run: rollout batch {run['rollout_batch']} x {run['new_tokens']} new tokens, minibatch {run['minibatch']}, "
              f"{run['steps']} timed PPO steps per setting, LoRA rank {run['lora_rank']}")

        reward, rm = bench_reward(cfgs["fused"], run, meter, rng)
        print(f"reward updates: {reward['tokens_per_s']:10.0f} tokens/s, {reward['update_s']:.2f}s per update "
              f"({reward['steps_per_update']} steps); peak {reward['peak_gb']:.2f} GB (estimate {reward['estimate_gb']:.2f})")
        scorer = RewardScorer(rm)
        ppo, adapter_dir = {}, work / "adapter"
        for mode in ("fused", "peft"):
            r, backend = bench_ppo(cfgs[mode], scorer, run["steps"], meter)
            ppo[mode] = r
            if mode == "fused":
                backend.export(adapter_dir)
            del backend
            k = r["kernels"]
            print(f"PPO {mode:5s} (moe_lora={k['moe_lora']}, logprob={k['logprob']}): step {r['step_s']:.2f}s; "
                  f"rollout {r['rollout_tokens_per_s']:8.0f} tokens/s, learner {r['learner_tokens_per_s']:8.0f} tokens/s; "
                  f"peak {r['peak_gb']:.2f} GB (estimate {r['estimate_gb']:.2f})")
        del scorer, rm
        serving = bench_serving(cfgs["fused"], adapter_dir, run, meter, rng)
        print(f"serving ({serving['requests']} concurrent requests, half on the adapter, moe_lora={serving['moe_lora']}): "
              f"{serving['tokens_per_s']:8.0f} tokens/s; peak {serving['peak_gb']:.2f} GB "
              f"(estimate {serving['estimate_gb']:.2f})")
        f, p = ppo["fused"], ppo["peft"]
        ratios = {"ppo_step_speedup_fused_vs_peft": p["step_s"] / f["step_s"],
                  "learner_tokens_per_s_fused_over_peft": f["learner_tokens_per_s"] / p["learner_tokens_per_s"],
                  "rollout_tokens_per_s_fused_over_peft": f["rollout_tokens_per_s"] / p["rollout_tokens_per_s"],
                  "peak_memory_fused_over_peft": f["peak_gb"] / p["peak_gb"]}
        print(f"fused vs plain peft: PPO step {ratios['ppo_step_speedup_fused_vs_peft']:.2f}x faster, learner "
              f"{ratios['learner_tokens_per_s_fused_over_peft']:.2f}x tokens/s, peak memory "
              f"{ratios['peak_memory_fused_over_peft']:.2f}x   [{time.perf_counter() - t_start:.0f}s]")

        def rounded(x):
            if isinstance(x, dict):
                return {k: rounded(v) for k, v in x.items()}
            return round(x, 4) if isinstance(x, float) else x

        out = rounded({
            "benchmark": "gpu_loop", "measured_on_gpu": not smoke, "device": name,
            "dtype": str(placement.dtype).removeprefix("torch."), "torch": torch.__version__,
            "base": {**shape, "parameters": params}, "run": run,
            "reward": reward, "ppo": ppo, "serving": serving, "ratios": ratios,
            "memory": "peak_gb: torch.cuda.max_memory_allocated per stage" if not smoke
                      else "peak_gb: process peak RSS (CPU smoke test)",
            "seconds": time.perf_counter() - t_start,
        })
        args.results.mkdir(parents=True, exist_ok=True)
        dest = args.results / ("gpu-loop-cpu-smoke-quick.json" if smoke else f"gpu-loop-{device_tag(name)}.json")
        dest.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results: {dest}")
        print(json.dumps(out))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
