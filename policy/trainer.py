"""The PPO job: rollout -> score -> learn, checkpointed, ending in a registry candidate.

    for step in range(start, steps):
        prompts  = sampler.batch(step)                    # a function of (seed, step) only
        rollouts = backend.rollout(shards(prompts))       # current adapter, scored by the pinned reward model
        rollouts += served.batch(step)                    # labelled served answers (policy.offpolicy)
        stats    = backend.learn(rollouts, step)          # PPO epochs on the learner
        every checkpoint_every steps: checkpoint          # atomic; SIGKILL-safe
    publish the adapter as a candidate policy version     # the offline gate decides what happens next

`backend` is `LocalBackend` (everything in this process; used by tests and benchmarks) or
`RayBackend` (actors; `looprl policy train`). Both run the same worker classes, seeded the same
way, so they compute the same numbers.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from looprl.ops.core.config import LooprlConfig, PolicyConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.version import version_number
from looprl.policy import metrics, served as served_answers
from looprl.policy.model import MemoryBudgetError, base_checksum, check_memory
from looprl.policy.placement import resolve_device
from looprl.policy.checkpoint import CheckpointError, RunDir, latest_unfinished, runs_root
from looprl.policy.families import family_of_dir
from looprl.policy.lora import base_policy_targets
from looprl.policy.prompts import PromptSampler, build_pool, event_log
from looprl.policy.rollout import Rollout
from looprl.policy.scoring import RegistryScorer, registry_scorer
from looprl.policy.vllm_layout import LayoutError, export_vllm
from looprl.policy.workers import Learner, RolloutWorker
from looprl.storage.registry import Manifest, Registry
from looprl.storage.releases import KIND, VLLM_DIR, continue_point, lineage

log = get_logger(__name__)

KL_STOP_WINDOW = 5  # steps of rollout KL the KL stop averages (policy.stop_kl)
# Per-step figures kept in the candidate's manifest (the curve, not every diagnostic).
_CURVE_KEYS = ("reward_mean", "kl", "kl_coef", "kl_coef_next", "clip_fraction", "entropy", "value_loss",
               "explained_variance", "tokens_per_s", "expert_load_max_over_mean", "offpolicy_samples",
               "offpolicy_is_weight_mean", "degenerate_fraction")


class LocalBackend:
    """Learner and rollout workers in this process, sharing one model (no copies, no Ray)."""

    def __init__(self, cfg: LooprlConfig, scorer):
        torch.set_num_threads(cfg.policy.torch_threads)
        self.learner = Learner(cfg)
        self.worker = RolloutWorker(cfg, scorer, model=self.learner.model, tok=self.learner.tok)

    def rollout(self, shards: list[list[str]], seeds: list[tuple]) -> list[Rollout]:
        # The worker shares the learner's model, so there are no weights to broadcast.
        return [self.worker.rollout(None, s, seed) for s, seed in zip(shards, seeds)]

    def learn(self, rollouts: list[Rollout], step: int) -> dict:
        return self.learner.learn(rollouts, step)

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def load_weights(self, lora: dict, value_head: dict | None, kl_coef: float | None = None) -> None:
        self.learner.load_weights(lora, value_head, kl_coef)

    def export(self, out_dir: Path) -> list[str]:
        return self.learner.export(out_dir)

    def close(self, keep: bool = True) -> None:
        pass


def shard(prompts: list, n: int) -> list[list]:
    """Contiguous, near-equal shards (the same split with or without Ray)."""
    n = max(1, min(n, len(prompts)))
    k, r = divmod(len(prompts), n)
    out, i = [], 0
    for j in range(n):
        m = k + (1 if j < r else 0)
        out.append(prompts[i:i + m])
        i += m
    return out


@dataclass
class TrainResult:
    run_id: str
    manifest: Manifest | None
    history: list[dict] = field(default_factory=list)


def _new_run_id(seed: int) -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f") + f"-s{seed}"


def _open_run(cfg: LooprlConfig, run_id: str | None, resume: bool) -> tuple[RunDir, bool]:
    root = runs_root(cfg.state_dir)
    if run_id is not None:
        run = RunDir(root / run_id)
        return run, (run.path / "run.json").is_file()
    if resume:
        run = latest_unfinished(cfg.state_dir)
        if run is not None:
            return run, True
    return RunDir(root / _new_run_id(cfg.policy.seed)), False


def run_training(cfg: LooprlConfig, **kwargs) -> Manifest:
    """`train` that publishes: the entry point of `looprl policy train` and of the scheduler.

    Returns the manifest of the published candidate (status "candidate"; run the gate next)."""
    kwargs["publish"] = True
    result = train(cfg, **kwargs)
    if result.manifest is None:
        raise RuntimeError(f"run {result.run_id} finished earlier without publishing a candidate")
    return result.manifest


def train(
    cfg: LooprlConfig,
    *,
    run_id: str | None = None,
    resume: bool = True,
    steps: int | None = None,
    scorer=None,
    use_ray: bool = True,
    progress: bool = False,
    publish: bool = True,
    on_step: Callable[[int, dict, object], None] | None = None,
) -> TrainResult:
    """Run (or resume) one PPO job and publish its adapter as a candidate policy version.

    run_id: resume that run if it exists, else start it under that id. Without a run_id and with
    `resume`, the newest unfinished run resumes; otherwise a new run starts. A resumed run uses the
    policy config, prompt pool and reward version recorded when it started.
    scorer: anything with `.score(prompts, completions)` and `.version`; default: the newest
    reward model in the registry (pinned for the run). on_step(step, stats, backend): test hook.
    """
    run, resuming = _open_run(cfg, run_id, resume)
    lock = run.lock()
    try:
        return _train_locked(cfg, run, resuming, steps, scorer, use_ray, progress, publish, on_step)
    finally:
        lock.release()


def _start_meta(cfg: LooprlConfig, run: RunDir, scorer, checksum: str, use_ray: bool, con) -> tuple[dict, list]:
    """A new run's metadata and prompt pool; saves its served answers (``con``: `event_log`)."""
    pool, watermark = build_pool(cfg, con=con)
    reg = Registry(cfg.registry_dir)
    parent = continue_point(reg, cfg.policy.continue_from)
    meta = {
        "run_id": run.run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "base_checksum": checksum,
        "reward_version": scorer.version,
        "parent": parent,
        "init_from": _init_source(cfg, parent, checksum),
        "init_kl_coef": cfg.policy.init_kl_coef,
        "watermark": watermark,
        "policy": cfg.policy.model_dump(mode="json"),
        "kernels": cfg.kernels.model_dump(mode="json"),
    }
    _check_memory(cfg, scorer, use_ray)  # before the run is recorded: a refused run is never resumed
    if meta["init_from"]:  # continue the KL controller too, not just the parent's weights
        last = _newest_kl_coef(reg, checksum)
        if last is not None:
            meta["init_kl_coef"] = last
    # before run.json: a run that exists has its served answers (resuming never re-reads the log)
    # staleness counts the generations an answer's version lies behind the start on its line
    line = lineage(reg, meta["init_from"])
    generations = {version_number(v): i for i, v in enumerate(line)} | {0: len(line)}
    served_pool = served_answers.load_pool(cfg, version_number(meta["init_from"]), generations, con=con)
    if served_pool:
        served_answers.save_pool(run.path, served_pool)
    return meta, pool


def _newest_kl_coef(reg: Registry, checksum: str) -> float | None:
    """The KL coefficient the newest run on this base ended with: the controller is one across
    runs. Not the parent's: a sibling the gate rejected over its KL cap had raised it, and a run
    restarting from the parent's lower one overshot again (6 of 12 candidates in one sparse demo,
    ops/README.md)."""
    for m in reversed(reg.list(KIND)):
        last = m.metrics.get("kl_coef_last")
        if m.base_checksum == checksum and isinstance(last, (int, float)) and last > 0:
            return float(last)
    return None


def _train_locked(cfg: LooprlConfig, run: RunDir, resuming: bool, steps: int | None, scorer, use_ray: bool,
                  progress: bool, publish: bool, on_step) -> TrainResult:
    if resuming and run.is_done():
        info = run.done_info()
        log.info("run already finished", run_id=run.run_id, version=info.get("version"))
        m = Registry(cfg.registry_dir).manifest(KIND, info["version"]) if info.get("version") else None
        return TrainResult(run.run_id, m)

    checksum = base_checksum(cfg.base_path)
    if resuming:
        meta, pool = run.read_meta()
        if meta["base_checksum"] != checksum:
            raise CheckpointError(
                f"run {run.run_id} was started on base {meta['base_checksum'][:12]}, the configured base is "
                f"{checksum[:12]}: start a new run"
            )
        # the run's own hyper-parameters, so resuming reproduces the uninterrupted run
        cfg = cfg.model_copy(update={"policy": PolicyConfig.model_validate(meta["policy"])})
        if scorer is None:
            if str(meta["reward_version"]).startswith("programmatic:"):
                raise ValueError(f"run {run.run_id} used scorer {meta['reward_version']}: pass the same scorer")
            scorer = RegistryScorer(cfg, meta["reward_version"])
        elif scorer.version != meta["reward_version"]:
            raise ValueError(f"run {run.run_id} trained against reward {meta['reward_version']}, not {scorer.version}")
        try:
            _check_memory(cfg, scorer, use_ray)
        except MemoryBudgetError as e:
            raise MemoryBudgetError(f"{e} (run {run.run_id} resumes with the policy.* settings it started with; "
                                    "`looprl policy train --new` starts a run with the current ones)") from None
    else:
        if steps is not None:
            cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"steps": steps})})
        scorer = scorer if scorer is not None else registry_scorer(cfg)
        reads_log = cfg.policy.recent_prompts > 0 or served_answers.offpolicy_disabled(cfg) is None
        with event_log(cfg, needed=reads_log) as con:  # read twice: the prompt pool, the served answers
            meta, pool = _start_meta(cfg, run, scorer, checksum, use_ray, con)
        run.write_meta(meta, pool)
    p = cfg.policy
    sampler = PromptSampler(pool, p.seed)
    served = served_answers.ServedPool(
        served_answers.read_pool(run.path) if served_answers.offpolicy_disabled(cfg) is None else [], p.seed)

    backend = None
    ended_well = False
    history: list[dict] = []
    try:
        if use_ray:
            # lazy: ray takes a second to import, and local runs (tests, benchmarks, --no-ray) never need it
            from looprl.policy.ray_backend import RayBackend

            backend = RayBackend(cfg, scorer)
        else:
            backend = LocalBackend(cfg, scorer)
        start = 0
        if resuming and run.latest_step() is not None:
            start, state, saved = run.load()
            backend.load_state_dict(state)
            history = list(saved.get("history", []))
            log.info("resumed", run_id=run.run_id, step=start, steps=p.steps)
        else:
            if meta.get("init_from"):
                backend.load_weights(*_init_weights(cfg, meta["init_from"], meta["base_checksum"]),
                                     kl_coef=meta.get("init_kl_coef"))
            log.info("run started", run_id=run.run_id, steps=p.steps, reward_version=scorer.version,
                     prompts=len(sampler.train), served=len(served), ray=use_ray, init_from=meta.get("init_from"))

        bar = None
        if progress:
            bar = tqdm(total=p.steps, initial=start, desc=f"ppo {run.run_id}", unit="step")
        # KL stop (policy.stop_kl): every checkpoint saved while the trailing KL stayed under the
        # stop is one to fall back to; `good` is the newest.
        good = start if start > 0 and _under_stop_kl(history, p.stop_kl) else None
        stopped = None
        for step in range(start, p.steps):
            stats = _one_step(backend, sampler, cfg, step, served)
            history.append({k: stats[k] for k in _CURVE_KEYS if k in stats} | {"step": step})
            metrics.record_step(stats)
            log.info("ppo step", run_id=run.run_id, **stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward_mean']:.2f}", kl=f"{stats['kl']:.3f}")
            if on_step is not None:
                on_step(step, stats, backend)
            done = step + 1
            if good is not None and not _under_stop_kl(history, p.stop_kl):
                stopped = {"step": done, "trailing_kl": _trailing_kl(history), "published_step": good}
                log.info("KL stop: the run publishes its last checkpoint under policy.stop_kl", run_id=run.run_id,
                         stop_kl=p.stop_kl, **stopped)
                _, state, _ = run.load(good)
                backend.load_weights(state["lora"], state["value_head"])  # the coefficient stays raised
                break
            if done % p.checkpoint_every == 0 or done == p.steps:
                run.save(done, backend.state_dict(), extra={"history": history})
                if _under_stop_kl(history, p.stop_kl):
                    good = done
        if bar is not None:
            bar.close()

        manifest = _publish(cfg, backend, run, meta, history, stopped) if publish else None
        run.mark_done({"version": manifest.version if manifest else None,
                       "finished_at": datetime.now(timezone.utc).isoformat()})
        ended_well = True
        return TrainResult(run.run_id, manifest, history)
    except Exception as e:
        metrics.RUN_FAILURES.labels(reason=type(e).__name__).inc()
        last = run.latest_step() if run.path.exists() else None
        log.error("ppo run failed", run_id=run.run_id, error=str(e), last_checkpoint_step=last)
        raise
    finally:
        if backend is not None:
            backend.close(keep=ended_well)  # kept Ray actors stay only after a job that ended well


def _check_memory(cfg: LooprlConfig, scorer, use_ray: bool) -> None:
    """The start-up memory check of the processes this machine runs (``looprl.policy.memory``):
    in-process, the policy and (for a registry scorer) one reward model; on a local CPU Ray, the
    learner's and every rollout worker's copies. With GPUs (or a remote cluster) the colocated
    learner actor checks its own device instead (``policy/ray_backend.py``)."""
    loads = int(getattr(scorer, "loads_reward_model", False))
    if not use_ray:
        check_memory(cfg, "policy", reward_copies=loads)
    elif cfg.policy.ray_address is None and resolve_device(cfg.model.device).type == "cpu":
        from looprl.policy.ray_backend import actor_key, kept_actors, keeps_actors

        n = cfg.policy.num_rollout_workers
        # kept actors already hold their copies of the base (counted as used, not as available)
        new = 0 if keeps_actors(cfg) and kept_actors(actor_key(cfg)) else 1 + n
        check_memory(cfg, "policy", policy_copies=new, reward_copies=n * loads)


def _init_source(cfg: LooprlConfig, parent: str | None, checksum: str) -> str | None:
    """The version to continue from (``policy.continue_from``), if it is a LoRA of the same shape
    on the same base."""
    if not cfg.policy.init_from_promoted or parent is None:
        return None
    reg = Registry(cfg.registry_dir)
    try:
        _, d = reg.open(KIND, parent, base_checksum=checksum)
        acfg = json.loads((d / "adapter_config.json").read_text())
    except Exception as e:  # a broken parent version must not block training from scratch
        log.warning("cannot continue from the parent adapter; starting fresh", parent=parent, error=str(e))
        return None
    p = cfg.policy
    targets = base_policy_targets(cfg.base_path, p)  # "auto" resolved for this base, as attach_lora does
    same = (acfg.get("r") == p.lora_rank and acfg.get("lora_alpha") == p.lora_alpha
            and set(acfg.get("target_modules") or []) == set(targets.target_modules)
            and set(acfg.get("target_parameters") or []) == set(targets.target_parameters))
    if not same:
        log.info("parent adapter has another LoRA shape; starting fresh", parent=parent)
        return None
    return parent


def _init_weights(cfg: LooprlConfig, version: str, checksum: str) -> tuple[dict, dict | None]:
    _, d = Registry(cfg.registry_dir).open(KIND, version, base_checksum=checksum)
    vh = d / "value_head.safetensors"
    return load_file(str(d / "adapter_model.safetensors")), (load_file(str(vh)) if vh.is_file() else None)


def _one_step(backend, sampler: PromptSampler, cfg: LooprlConfig, step: int,
              served: "served_answers.ServedPool | None" = None) -> dict:
    """One PPO step: rollouts of the current policy (plus, from ``served``, this step's labelled
    served answers) -> the learner."""
    p = cfg.policy
    t0 = time.perf_counter()
    shards = shard(sampler.batch(step, p.rollout_batch_size), p.num_rollout_workers)
    seeds = [(p.seed, step, "rollout", i) for i in range(len(shards))]
    rollouts = backend.rollout(shards, seeds)
    extra = served.batch(step, p.offpolicy_samples) if served is not None and p.offpolicy else None
    t1 = time.perf_counter()
    stats = backend.learn(rollouts + ([extra] if extra is not None else []), step)
    if served is not None and p.offpolicy:
        stats.setdefault("offpolicy_samples", 0)
    t2 = time.perf_counter()
    gen = sum(r.timings.get("rollout_s", 0.0) for r in rollouts)
    score = sum(r.timings.get("score_s", 0.0) for r in rollouts)
    stats.update(
        rollout_s=gen, score_s=score, rollout_wall_s=t1 - t0, learn_wall_s=t2 - t1, step_s=t2 - t0,
        tokens_per_s=stats["tokens"] / max(t2 - t0, 1e-9),
        sample_completion=rollouts[0].completions[0] if rollouts and rollouts[0].completions else "",
    )
    return stats


def _export_vllm_copy(cfg: LooprlConfig, d: Path) -> None:
    """The adapter in vLLM's layout beside it (``vllm/``, checksummed with the version): what the
    serving controller loads on vLLM endpoints (``looprl.policy.vllm_layout``)."""
    try:
        export_vllm(d, d / VLLM_DIR, family_of_dir(cfg.base_path))
    except LayoutError as e:  # the version still serves on `looprl serving serve`
        log.warning("no vLLM-layout copy of the candidate; vLLM endpoints would get the peft layout", error=str(e))


def _trailing_kl(history: list[dict]) -> float:
    """Mean rollout KL of the last KL_STOP_WINDOW steps: one step's 16 answers swing it by several nats."""
    kls = [h["kl"] for h in history[-KL_STOP_WINDOW:]]
    return sum(kls) / len(kls) if kls else 0.0


def _under_stop_kl(history: list[dict], stop_kl: float | None) -> bool:
    return stop_kl is None or _trailing_kl(history) < stop_kl


def _publish(cfg: LooprlConfig, backend, run: RunDir, meta: dict, history: list[dict],
             stopped: dict | None = None) -> Manifest:
    """``stopped``: the KL stop's record; the published weights are those of its checkpoint, so
    the reward and KL at the end are read there (the KL coefficient is the newest: the child
    continues with the leash the controller raised)."""
    kept = [h for h in history if h["step"] < stopped["published_step"]] if stopped else history
    tail = kept[-3:] if kept else []
    head = history[:3] if history else []
    last = history[-1:] if history else []

    def avg(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    p = cfg.policy
    metrics_out = {
        "steps": len(history),
        "reward_first": avg(head, "reward_mean"),
        "reward_last": avg(tail, "reward_mean"),
        "kl_last": avg(tail, "kl"),
        "kl_coef_last": last[-1].get("kl_coef_next", last[-1]["kl_coef"]) if last else None,
        "tokens_per_s": avg(history, "tokens_per_s"),
        "curve": history,
        "kl_stop": stopped,
    }
    extra = {
        "reward_version": meta["reward_version"],
        "run_id": run.run_id,
        "seed": p.seed,
        "lora_rank": p.lora_rank,
        "lora_alpha": p.lora_alpha,
        "value_head": "value_head.safetensors",
        "kernels": meta.get("kernels"),
    }
    reg = Registry(cfg.registry_dir)
    for m in reversed(reg.list(KIND)):  # a crash after publishing, before done.json: publish once
        if m.extra.get("run_id") == run.run_id:
            log.info("candidate already published by this run", version=m.version, run_id=run.run_id)
            return m
    with tempfile.TemporaryDirectory(prefix="looprl-candidate-") as d:
        backend.export(Path(d))
        _export_vllm_copy(cfg, Path(d))
        acfg = json.loads((Path(d) / "adapter_config.json").read_text())  # the targets really trained
        extra.update(target_modules=sorted(acfg.get("target_modules") or []),
                     target_parameters=sorted(acfg.get("target_parameters") or []))
        m = reg.publish(
            KIND, d, base_checksum=meta["base_checksum"], base_family=family_of_dir(cfg.base_path),
            parent=meta.get("parent"),
            watermark=meta.get("watermark") or {}, metrics=metrics_out, status="candidate",
            reason=f"PPO run {run.run_id}", extra=extra,
        )
    log.info("candidate published", version=m.version, run_id=run.run_id, **{k: v for k, v in metrics_out.items() if k != "curve"})
    return m
