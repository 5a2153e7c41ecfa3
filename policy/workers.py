"""The two roles of a PPO job: rollout workers and the learner.

Both are plain classes so the PPO loop runs and is tested without Ray; `policy/ray_backend.py`
wraps the same classes as Ray actors. A rollout worker is stateless between calls: each call
brings the adapter weights to use (and, on Ray, the job: its settings and reward), so a restarted
worker (after a crash) can redo a call exactly. The learner owns everything that must survive a
restart, and `state_dict()` is what the checkpoint stores.

Loading the base is what makes an actor slow to start, so an actor may serve job after job
(``policy.keep_actors``): `start_job` makes it start a job exactly as a new actor would.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy import ppo
from looprl.policy.model import (
    check_memory, enable_gradient_checkpointing, load_base, model_device, resolve_placement, stop_token_ids,
)
from looprl.policy.forward import ValueHead, apply_kernels, expert_load, policy_forward
from looprl.policy.lora import (
    attach_lora, load_lora_state, lora_state, reset_lora, save_adapter, trainable_lora_parameters,
)
from looprl.policy.prompts import generator
from looprl.policy.rollout import Rollout, answer_tokens, degenerate_flags, sample

log = get_logger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass(frozen=True)
class PPOJob:
    """One PPO job as an actor sees it: its settings and its reward. ``token`` tells a kept actor
    that a new job has begun."""

    token: str
    cfg: LooprlConfig
    scorer: object


def build_policy(cfg: LooprlConfig):
    """Base model from cfg.base_path + a fresh LoRA adapter (drawn from cfg.policy.seed) + the
    configured expert kernel, on cfg.model's device and dtype (LoRA in float32), decoder layers
    checkpointed when cfg.model.gradient_checkpointing is set."""
    placement = resolve_placement(cfg.model)
    base, tok = load_base(cfg.base_path, device=placement.device, dtype=placement.dtype)
    with torch.random.fork_rng(devices=_cuda_indices(placement.device)):  # peft's own draws: global RNG untouched
        model = attach_lora(base, cfg.policy)
    reset_lora(model, cfg.policy.seed)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    apply_kernels(model, cfg.kernels)
    return model, tok


class RolloutWorker:
    """Samples completions with given adapter weights and scores them with the (pinned) reward model."""

    def __init__(self, cfg: LooprlConfig, scorer, model: nn.Module | None = None, tok=None, threads: int = 1):
        if model is None:  # its own copy (a Ray actor); local mode shares the learner's model
            torch.set_num_threads(threads)
            model, tok = build_policy(cfg)
        self.cfg, self.scorer, self.model, self.tok = cfg, scorer, model, tok
        self.stop_ids = stop_token_ids(tok, model, cfg.model.stop_tokens)
        self.job_token: str | None = None

    def pid(self) -> int:
        return os.getpid()

    def start_job(self, job: PPOJob) -> None:
        """Serve ``job`` from now on: its sampling settings and its reward model (the previous
        job's reward model is let go)."""
        if job.token != self.job_token:
            self.cfg, self.scorer, self.job_token = job.cfg, job.scorer, job.token

    def rollout(self, lora: dict[str, torch.Tensor] | None, prompts: list[str], seed_parts: tuple,
                job: PPOJob | None = None) -> Rollout:
        if job is not None:
            self.start_job(job)
        p = self.cfg.policy
        if lora is not None:
            load_lora_state(self.model, lora)
        t0 = time.perf_counter()
        r = sample(self.model, self.tok, prompts, p.max_new_tokens, p.temperature, generator(*seed_parts),
                   p.max_prompt_tokens, self.stop_ids)
        t1 = time.perf_counter()
        r.scores = self.scorer.score(r.prompts, r.completions).detach().float().cpu().reshape(-1)
        if r.scores.shape[0] != len(prompts):
            raise ValueError(f"scorer {self.scorer.version} returned {r.scores.shape[0]} scores for {len(prompts)} completions")
        if not torch.isfinite(r.scores).all():
            raise ValueError(f"scorer {self.scorer.version} returned non-finite scores")
        g = self.cfg.gate  # the gate's rule: policy.degenerate_penalty keeps training from where the gate rejects
        short, repetitive = degenerate_flags(answer_tokens(r, self.stop_ids), r.completions,
                                             g.min_answer_tokens, g.min_distinct_token_ratio)
        r.degenerate = torch.tensor([a or b for a, b in zip(short, repetitive)], dtype=torch.bool)
        r.timings = {"rollout_s": t1 - t0, "score_s": time.perf_counter() - t1}
        return r


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One batch from several workers' rollouts: re-pad prompts on the left to a common length."""
    plen = max(r.prompt_len for r in parts)
    ids, masks = [], []
    for r in parts:
        extra = plen - r.prompt_len
        ids.append(torch.nn.functional.pad(r.input_ids, (extra, 0), value=0))  # masked out: any id will do
        masks.append(torch.nn.functional.pad(r.attention_mask, (extra, 0), value=0))
    n = max(r.response_mask.shape[1] for r in parts)
    ids = [torch.nn.functional.pad(x, (0, n + plen - x.shape[1]), value=0) for x in ids]
    masks = [torch.nn.functional.pad(x, (0, n + plen - x.shape[1]), value=0) for x in masks]
    rmask = [torch.nn.functional.pad(r.response_mask, (0, n - r.response_mask.shape[1]), value=0.0) for r in parts]
    out = Rollout(
        prompts=[p for r in parts for p in r.prompts],
        completions=[c for r in parts for c in r.completions],
        input_ids=torch.cat(ids), attention_mask=torch.cat(masks), response_mask=torch.cat(rmask),
        prompt_len=plen, scores=torch.cat([r.scores for r in parts]),
    )
    out.timings = {k: sum(r.timings.get(k, 0.0) for r in parts) for k in ("rollout_s", "score_s")}
    if any(r.degenerate is not None for r in parts):
        out.degenerate = torch.cat([r.degenerate if r.degenerate is not None
                                    else torch.zeros(r.response_mask.shape[0], dtype=torch.bool) for r in parts])
    if any(r.labels is not None for r in parts):  # served answers in the batch (policy/served.py)
        rows = [r.response_mask.shape[0] for r in parts]
        out.labels = torch.cat([r.labels if r.labels is not None else torch.full((b,), float("nan"))
                                for r, b in zip(parts, rows)])
        out.behaviour_logprobs = torch.cat([
            torch.nn.functional.pad(r.behaviour_logprobs, (0, n - r.behaviour_logprobs.shape[1]))
            if r.behaviour_logprobs is not None else torch.zeros((b, n)) for r, b in zip(parts, rows)])
    return out


@dataclass
class Evaluation:
    """Per-token quantities of a batch under the current (old) policy and the base."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    expert_load: torch.Tensor


class Learner:
    """Holds the trainable adapter, the value head, the optimizer and the KL controller."""

    def __init__(self, cfg: LooprlConfig, model: nn.Module | None = None, tok=None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if model is None:
            model, tok = build_policy(cfg)
        self.model, self.tok = model, tok
        self.device = model_device(self.model)
        self.top_k = int(getattr(self.model.get_base_model().config, "num_experts_per_tok", 1))
        self.job_token: str | None = None
        self.reset(cfg)

    def reset(self, cfg: LooprlConfig) -> None:
        """A fresh start on the loaded base with cfg.policy's settings: a new adapter and value
        head drawn from its seed, a new optimizer, KL controller and score statistics. Every
        learner starts here, so a kept one starts its next job exactly as a new one would."""
        self.cfg = cfg
        p = cfg.policy
        reset_lora(self.model, p.seed)
        hidden = self.model.get_base_model().config.hidden_size
        with torch.random.fork_rng(devices=_cuda_indices(self.device)):  # value-head init: same numbers every run
            torch.manual_seed(p.seed + 1)
            self.value_head = ValueHead(hidden).to(self.device)  # float32 whatever the model's dtype
        self.params = [q for _, q in trainable_lora_parameters(self.model)] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=p.learning_rate, weight_decay=0.0, eps=1e-6)
        self.kl_ctl = ppo.AdaptiveKLController(p.init_kl_coef, p.target_kl, p.kl_horizon, p.min_kl_coef)
        self.score_stats = ppo.RunningMoments()

    def start_job(self, job: PPOJob) -> None:
        """Begin ``job`` (once per token): `reset` to its settings."""
        if job.token != self.job_token:
            self.reset(job.cfg)
            self.job_token = job.token

    def pid(self) -> int:
        return os.getpid()

    # ---- weights out ----
    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model)

    def export(self, out_dir: str | Path) -> list[str]:
        """The candidate adapter in peft format, plus the value head beside it."""
        out = save_adapter(self.model, Path(out_dir))
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(out / VALUE_HEAD_FILE))
        return sorted(p.name for p in out.iterdir())

    def export_files(self) -> dict[str, bytes]:
        """`export` as bytes, for a learner on another machine than the driver that publishes."""
        with tempfile.TemporaryDirectory(prefix="looprl-export-") as d:
            names = self.export(d)
            return {n: (Path(d) / n).read_bytes() for n in names}

    # ---- PPO ----
    def _forward(self, ro: Rollout, idx: torch.Tensor, value: bool, routers: bool = False):
        sl = ro.response_labels_slice()
        fo = policy_forward(self.model, ro.input_ids[idx], ro.attention_mask[idx], self.cfg.kernels,
                            self.cfg.policy.temperature, self.value_head if value else None, routers)
        vals = fo.values[:, sl] if fo.values is not None else None
        return fo.logprobs[:, sl], fo.entropy[:, sl], vals, fo.router_logits

    @torch.no_grad()
    def evaluate(self, ro: Rollout) -> Evaluation:
        """Old-policy log-probs and values, base log-probs (adapter disabled: no second model copy).
        Rows go through in minibatches (policy.minibatch_size): the whole batch at once would hold
        its (rows, tokens, vocabulary) logits, the largest tensor of the step on a big vocabulary."""
        n = ro.input_ids.shape[0]
        size = max(1, min(self.cfg.policy.minibatch_size, n))
        chunks = []
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n))
            logp, ent, values, routers = self._forward(ro, idx, value=True, routers=True)
            with self.model.disable_adapter():
                ref, _, _, _ = self._forward(ro, idx, value=False)
            chunks.append((logp, ent, values, ref, routers))
        logp, ent, values, ref = (torch.cat([c[i] for c in chunks]) for i in range(4))
        # per MoE layer, (rows * tokens, E) in row order, as one forward over the batch gives them
        routers = tuple(torch.cat(layer) for layer in zip(*(c[4] for c in chunks))) if chunks[0][4] else None
        # router logits cover every position; count routing of the sampled (completion) tokens only
        tok_mask = torch.zeros_like(ro.attention_mask, dtype=torch.float32)
        tok_mask[:, ro.prompt_len:] = ro.response_mask
        load = expert_load(routers, tok_mask, self.top_k) if routers else torch.ones(1)
        return Evaluation(logp, ref, values, ent, load)

    def learn(self, parts: list[Rollout], step: int) -> dict:
        p = self.cfg.policy
        t0 = time.perf_counter()
        ro = concat_rollouts(parts).to(self.device)
        mask = ro.response_mask
        ev = self.evaluate(ro)
        kl_coef = self.kl_ctl.value
        served = ro.served_rows()  # None: rollouts only, exactly the on-policy step
        on = slice(None) if served is None else ~served  # the rows this policy sampled
        scores = ro.scores
        if p.normalize_scores or served is not None:
            self.score_stats.update(scores[on])
        if served is not None:  # a served answer's reward is its user label on the scores' scale
            from_labels = ppo.label_scores(ro.labels, self.score_stats, p.offpolicy_label_reward).to(scores)
            scores = torch.where(served, from_labels, scores)
        degenerate = ro.degenerate
        if degenerate is not None and p.degenerate_penalty is not None:  # however the reward model scores them
            scores = ppo.cap_degenerate(scores, degenerate, self.score_stats, p.degenerate_penalty)
        if p.normalize_scores:
            scores = self.score_stats.standardize(scores).float()
        # the KL penalty to the base applies to served answers too
        rewards, kl = ppo.token_rewards(scores, ev.logprobs, ev.ref_logprobs, mask, kl_coef)
        adv, returns = ppo.gae(rewards, ev.values, mask, p.gamma, p.gae_lambda)
        adv = ppo.masked_whiten(adv, mask)
        is_w = raw_ratio = None
        if served is not None:
            # pi_old / pi_behaviour per served token, truncated; rollout rows compare pi_old with itself: 1
            behaviour = torch.where(served[:, None], ro.behaviour_logprobs, ev.logprobs)
            is_w, raw_ratio = ppo.truncated_is_weights(ev.logprobs, behaviour, mask, p.offpolicy_is_cap)

        bsz = mask.shape[0]
        mb = min(p.minibatch_size, bsz)
        sums: dict[str, float] = {}
        n_updates = 0
        for epoch in range(p.ppo_epochs):
            perm = torch.randperm(bsz, generator=generator(p.seed, step, "shuffle", epoch))
            for start in range(0, bsz, mb):
                idx = perm[start:start + mb]
                logp, ent, values, _ = self._forward(ro, idx, value=True)
                out = ppo.ppo_loss(logp, ev.logprobs[idx], adv[idx], values, ev.values[idx], returns[idx],
                                   ent, mask[idx], p.clip_range, p.value_clip_range, p.vf_coef, p.ent_coef,
                                   is_weights=None if is_w is None else is_w[idx])
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, p.max_grad_norm)
                self.optimizer.step()
                n_updates += 1
                for k, v in (("policy_loss", out.policy_loss), ("value_loss", out.value_loss),
                             ("entropy", out.entropy), ("clip_fraction", out.clip_fraction),
                             ("approx_kl", out.approx_kl), ("grad_norm", grad_norm)):
                    sums[k] = sums.get(k, 0.0) + float(v.detach())

        # per-completion KL to the base (k1 estimator, nats) of this policy's own samples: the served
        # answers' tokens were drawn by another policy, so their log-ratio does not estimate it
        seq_kl = kl[on].sum(1)
        mean_kl = float(seq_kl.mean())
        n_on = seq_kl.shape[0]
        self.kl_ctl.update(mean_kl, n_on)
        load = ev.expert_load
        stats = {k: v / max(n_updates, 1) for k, v in sums.items()}
        on_scores = ro.scores[on]
        stats.update(
            step=step,
            reward_mean=float(on_scores.mean()),
            reward_std=float(on_scores.std()) if n_on > 1 else 0.0,
            score_norm_mean=self.score_stats.mean,
            score_norm_std=self.score_stats.std,
            kl=mean_kl,
            kl_coef=kl_coef,
            kl_coef_next=self.kl_ctl.value,
            old_entropy=float(ppo.masked_mean(ev.entropy, mask)),
            explained_variance=ppo.explained_variance(ev.values, returns, mask),
            tokens=int(mask.sum()),
            completion_len=float(mask[on].sum(1).mean()),
            expert_load=[round(float(x), 4) for x in load],
            expert_load_max_over_mean=float(load.max() * load.numel()),
            expert_load_cv=float(load.std(unbiased=False) / load.mean()),
            learn_s=time.perf_counter() - t0,
        )
        if degenerate is not None:
            stats["degenerate_fraction"] = float(degenerate[on].float().mean())
        if served is not None:
            smask = mask * served[:, None]
            stats.update(
                offpolicy_samples=int(served.sum()),
                offpolicy_label_mean=float(ro.labels[served].mean()),
                offpolicy_is_weight_mean=float(ppo.masked_mean(is_w, smask)),
                offpolicy_truncated_fraction=float(ppo.masked_mean((raw_ratio > p.offpolicy_is_cap).float(), smask)),
            )
        return stats

    # ---- checkpoint state ----
    def state_dict(self) -> dict:
        # CPU tensors: the state travels to the driver (Ray) and into checkpoints; loading moves
        # it back to the parameters' device.
        return {
            "lora": self.lora_state(),
            "value_head": {k: v.detach().to("cpu", copy=True) for k, v in self.value_head.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_stats": self.score_stats.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_weights(self, lora: dict[str, torch.Tensor], value_head: dict[str, torch.Tensor] | None = None,
                     kl_coef: float | None = None) -> None:
        """Start from existing adapter weights (the promoted adapter), keeping a fresh optimizer."""
        load_lora_state(self.model, lora)
        if value_head is not None:
            self.value_head.load_state_dict(value_head)
        if kl_coef is not None:
            self.kl_ctl.start_at(kl_coef)

    def load_state_dict(self, state: dict) -> None:
        load_lora_state(self.model, state["lora"])
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_stats.load_state_dict(state["score_stats"])
        torch.set_rng_state(state["rng"])


def _cuda_indices(device: torch.device) -> list[int]:
    # torch.manual_seed also reseeds CUDA: fork_rng must restore the GPU's generator too
    return [device.index or 0] if device.type == "cuda" else []


def _to_cpu(obj):
    """A (nested) state dict with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class ColocatedLearner(Learner):
    """The learner that samples its own rollouts: on a GPU (``policy/ray_backend.py``) rollout and
    learner share one copy of the base on one device, and ``policy.num_rollout_workers`` only
    shards the batch (the same shards and seeds, so the same numbers, as separate workers). The
    memory check runs here, in the process that holds everything, before loading."""

    def __init__(self, cfg: LooprlConfig, scorer, threads: int | None = None):
        check_memory(cfg, "policy", reward_copies=int(getattr(scorer, "loads_reward_model", False)))
        super().__init__(cfg, threads=threads)
        self.worker = RolloutWorker(cfg, scorer, model=self.model, tok=self.tok)

    def start_job(self, job: PPOJob) -> None:
        super().start_job(job)
        self.worker.start_job(job)

    def rollout_shards(self, shards: list[list], seeds: list[tuple]) -> list[Rollout]:
        return [self.worker.rollout(None, s, seed) for s, seed in zip(shards, seeds)]
