"""Ray placement of the PPO roles: rollout workers and the learner as actors with declared resources.

Two layouts, chosen by `ray_plan` from ``model.device`` and the GPUs the cluster reports:

- separate (CPU): a learner actor and ``policy.num_rollout_workers`` rollout-worker actors, each
  with its own copy of the base. Each step the learner's LoRA state dict is `ray.put` once and
  every rollout worker reads it (the base weights never travel). Rollout workers are restartable:
  a call carries everything it needs (weights, prompts, seed), so after a worker is killed Ray
  restarts it and re-runs the call (`max_restarts`, `max_task_retries`).
- colocated (GPU): when the cluster has GPUs and ``model.device`` is not "cpu", one actor with
  ``num_gpus=1`` holds the learner and samples its own rollouts (`workers.ColocatedLearner`):
  rollout and learner share one copy of the base on one GPU and no weights are copied at all. The
  batch is still cut into ``policy.num_rollout_workers`` shards with the same seeds, so the
  numbers are those of the separate layout. This is the smallest change that shares the base: a
  rollout actor on the same GPU would need the learner's weights through CUDA IPC, and a second
  GPU per rollout worker would hold a second base; the actor checks its memory (`check_memory`)
  before loading.

The learner is not restartable: its death fails the job with a message naming the last checkpoint,
and re-running the job resumes from it. Every `ray.get` has a timeout, so nothing waits forever on
a dead node.

Kept actors (``policy.keep_actors``). Starting the actors (a process each, imports, a copy of the
base) takes longer than a short job's PPO steps on a small CPU machine. When the job runs on a
local Ray that it did not start (the scheduler's: every job there is a task on one cluster), the
actors are named, detached and left running when the job ends well; the next job with the same
`actor_key` (base, model, kernels, LoRA shape, worker count) finds them and `start_job` resets them
to its settings, seed and reward, so it computes what new actors would. A job that fails kills
them; a job with another key kills the kept ones first. They end with the cluster. A remote
cluster (``policy.ray_address``) never keeps actors: its lifetime is not the scheduler's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError, RayActorError

from looprl.ops.core.config import ConfigError, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy.model import MemoryBudgetError, base_checksum
from looprl.policy.rollout import Rollout
from looprl.policy.workers import ColocatedLearner, Learner, PPOJob, RolloutWorker

log = get_logger(__name__)

# AF_UNIX paths are limited to 107 bytes; Ray puts "session_<date>_<pid>/sockets/plasma_store"
# (~70 bytes) under its temp dir.
_MAX_TEMP_DIR_CHARS = 36
LOOPBACK = "127.0.0.1"
# Kept actors live in this namespace, named KEPT_PREFIX + role + "-" + actor_key.
KEPT_NAMESPACE = "looprl"
KEPT_PREFIX = "looprl-ppo-"


class PolicyJobError(RuntimeError):
    """A PPO job failed (dead actor, timeout); the message says what and how to resume."""


def ray_temp_dir(cfg: LooprlConfig) -> Path:
    """cfg.ray_dir, or a short directory under /tmp when the workspace path is too long for sockets."""
    wanted = cfg.ray_dir.resolve()
    if len(str(wanted)) <= _MAX_TEMP_DIR_CHARS:
        return wanted
    short = Path(tempfile.gettempdir()) / ("looprl-ray-" + hashlib.sha1(str(wanted).encode()).hexdigest()[:8])
    log.info("workspace path too long for Ray's unix sockets; using a short temp dir",
             wanted=str(wanted), temp_dir=str(short))
    return short


def init_ray(cfg: LooprlConfig, num_cpus: int) -> bool:
    """Connect to cfg.policy.ray_address, or start a small local Ray. True if this call started it."""
    if ray.is_initialized():
        return False
    if cfg.policy.ray_address:
        ray.init(address=cfg.policy.ray_address, log_to_driver=False)
        log.info("connected to ray cluster", address=cfg.policy.ray_address)
        return True
    _local_ray_token()
    # Ray starts its workers at niceness 15, under everything else on the machine. The local
    # cluster's workers are the PPO learner and rollouts, sharing a small machine with the serving
    # tier and the reward updater: at 15 they got the CPU only when both left some idle, and on a
    # busier machine PPO runs crawled (ops/README.md, "PPO workers' priority"). An explicit
    # RAY_worker_niceness is kept.
    os.environ.setdefault("RAY_worker_niceness", "0")
    temp = ray_temp_dir(cfg)
    temp.mkdir(parents=True, exist_ok=True)
    _start_loopback_ray(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=str(temp),
        object_store_memory=cfg.policy.ray_object_store_mb * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    log.info("started local ray", temp_dir=str(temp), num_cpus=num_cpus, address=ray.get_runtime_context().gcs_address)
    return True


def _local_ray_token() -> None:
    """Token auth for the local cluster too: every user of this machine reaches 127.0.0.1.

    Ray >= 2.59 turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise,
    reading the token from RAY_AUTH_TOKEN before ~/.ray/auth_token; a fresh one in the environment,
    which the cluster's processes inherit, keeps Ray from writing a long-lived token to the home
    directory.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE is not 'token': the local Ray accepts connections from every user of this machine",
                    ray_auth_mode=mode)


def _start_loopback_ray(**init_kwargs) -> None:
    """Start a one-machine Ray whose servers (GCS, raylet, object manager, workers, agents) all
    listen on 127.0.0.1 only.

    Ray binds them to loopback only when the node IP is exactly 127.0.0.1, and on Linux ray.init
    swaps a loopback ``_node_ip_address`` for the machine's routable IP: it keeps loopback only
    where its multi-node switch ``ENABLE_RAY_CLUSTER`` is off (macOS, Windows). The switch is off
    while the head starts; the address the cluster came up on is checked, never assumed.
    """
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled
    address = ray.get_runtime_context().gcs_address
    if address.rpartition(":")[0] != LOOPBACK:
        ray.shutdown()
        raise PolicyJobError(f"local Ray came up on {address}, not on {LOOPBACK}: refusing to run jobs on a "
                             "cluster other machines can reach (set policy.ray_address for a real cluster)")


@dataclass(frozen=True)
class RayPlan:
    """How the PPO actors are placed (see the module docstring)."""

    colocated: bool  # one actor: the learner samples its own rollouts
    num_gpus: float  # GPUs requested by the (learner) actor
    device: str  # model.device inside the actors (Ray sets CUDA_VISIBLE_DEVICES to the granted GPU)


def ray_plan(device: str, cluster_resources: Mapping[str, float]) -> RayPlan:
    """The actor layout for ``model.device`` on a cluster reporting ``cluster_resources``
    (``ray.cluster_resources()``): GPUs are requested when the cluster has them and the device is
    not "cpu"; "cuda" on a cluster without GPUs is a ``ConfigError``."""
    gpus = float(cluster_resources.get("GPU", 0) or 0)
    if device == "cpu":
        return RayPlan(colocated=False, num_gpus=0, device="cpu")
    if gpus > 0:
        # one granted GPU is cuda:0 inside the actor, whatever model.device's index
        return RayPlan(colocated=True, num_gpus=min(1.0, gpus), device="cuda")
    if device == "auto":
        return RayPlan(colocated=False, num_gpus=0, device="cpu")
    raise ConfigError(f"config key 'model.device' is {device!r} but the Ray cluster reports no GPU resources "
                      f"({dict(cluster_resources)}): set model.device to \"auto\" or \"cpu\", or add GPU nodes")


def actor_key(cfg: LooprlConfig) -> str:
    """What a kept actor was built for: the base, the model and kernel settings, the LoRA shape and
    the number of workers. Everything else in cfg is per job (`workers.PPOJob`)."""
    p = cfg.policy
    built_for = {
        "base": base_checksum(cfg.base_path), "model": cfg.model.model_dump(mode="json"),
        "kernels": cfg.kernels.model_dump(mode="json"), "workers": p.num_rollout_workers,
        "lora": [p.lora_rank, p.lora_alpha, p.target_modules, p.target_parameters], "threads": p.torch_threads,
    }
    return hashlib.sha1(json.dumps(built_for, sort_keys=True, default=str).encode()).hexdigest()[:12]


def keeps_actors(cfg: LooprlConfig) -> bool:
    """Whether a job now would keep its actors: asked, and on a local Ray that is already up."""
    return cfg.policy.keep_actors and cfg.policy.ray_address is None and ray.is_initialized()


def kept_actors(key: str | None = None) -> list[str]:
    """Names of the kept actors alive on the connected cluster (of one `actor_key`, or all)."""
    if not ray.is_initialized():
        return []
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == KEPT_NAMESPACE and a["name"].startswith(KEPT_PREFIX)]
    return sorted(n for n in names if key is None or n.endswith("-" + key))


def kill_kept_actors(keep_key: str | None = None) -> list[str]:
    """Kill the kept actors, except those of ``keep_key``; their names."""
    killed = []
    for name in kept_actors():
        if keep_key is not None and name.endswith("-" + keep_key):
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=KEPT_NAMESPACE), no_restart=True)
            killed.append(name)
        except ValueError:  # died in between
            pass
    if killed:
        log.info("killed kept ppo actors", names=killed)
    return killed


class RayBackend:
    """Learner + N rollout workers (or one colocated learner on a GPU) as Ray actors; same
    interface as `trainer.LocalBackend`."""

    def __init__(self, cfg: LooprlConfig, scorer):
        self.cfg, self.timeout = cfg, cfg.policy.ray_timeout_s
        n = cfg.policy.num_rollout_workers
        self.keep = keeps_actors(cfg)  # before init_ray: a Ray this job starts ends with it
        self.started = init_ray(cfg, num_cpus=max(2, n + 1))
        self.plan = ray_plan(cfg.model.device, ray.cluster_resources())
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": self.plan.device})})
        self.job = PPOJob(secrets.token_hex(8), cfg, scorer)
        log.info("ray placement", colocated=self.plan.colocated, num_gpus=self.plan.num_gpus, device=self.plan.device,
                 keep_actors=self.keep)
        self.learner, self.workers, self.key = None, [], None
        try:
            if not self.keep:
                self._start_actors(cfg, scorer, None)
                return
            key = self.key = actor_key(self.cfg)  # the configured device: what users and tests ask about
            kill_kept_actors(keep_key=key)
            reused = bool(kept_actors(key))
            try:
                self._start_actors(cfg, scorer, key)
            except PolicyJobError:
                if not reused:
                    raise
                # a kept actor that cannot start the job (dead, stuck): new ones, once
                log.warning("kept ppo actors did not answer; starting new ones", key=key)
                kill_kept_actors()
                self._start_actors(cfg, scorer, key)
            log.info("ppo actors", reused=reused, key=key)
        except BaseException:
            self.close(keep=False)  # detached actors outlive this process: never leave them half-started
            raise

    def _start_actors(self, cfg: LooprlConfig, scorer, key: str | None) -> None:
        threads = cfg.policy.torch_threads

        def remote(cls, role: str, **opts):
            actor = ray.remote(**opts)(cls)
            if key is None:
                return actor
            return actor.options(name=f"{KEPT_PREFIX}{role}-{key}", namespace=KEPT_NAMESPACE,
                                 lifetime="detached", get_if_exists=True)

        if self.plan.colocated:
            learner_cls = remote(ColocatedLearner, "learner", num_cpus=1, num_gpus=self.plan.num_gpus, max_restarts=0)
            self.learner = learner_cls.remote(cfg, scorer, threads=threads)
            self.workers = []
        else:
            learner_cls = remote(Learner, "learner", num_cpus=1, max_restarts=0)
            self.learner = learner_cls.remote(cfg, threads=threads)
            self.workers = [remote(RolloutWorker, f"rollout{i}", num_cpus=1, max_restarts=2,
                                   max_task_retries=2).remote(cfg, scorer, threads=threads)
                            for i in range(cfg.policy.num_rollout_workers)]
        # Actor start (imports, model load) gets its own allowance: a short per-call timeout must
        # not fail a job whose actors are merely slow to boot on busy cores. The job begins on
        # every actor (a kept one resets to it), the workers' calls carry it too (a restarted
        # worker is built with its first job's settings).
        self._get([self.learner.start_job.remote(self.job)] + [w.start_job.remote(self.job) for w in self.workers],
                  "actor start", timeout=max(self.timeout, 300.0))

    def _get(self, refs, what: str, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise PolicyJobError(f"{what}: no answer within {timeout}s (policy.ray_timeout_s={self.timeout})") from None
        except RayActorError as e:
            text = str(e)
            # an actor refused at start by its configuration (its device, its memory check): the same
            # error as in-process, so the CLI reports it as one (exit 2)
            refused = re.search(r"\b(MemoryBudgetError|ConfigError): (.+)", text)
            if refused:
                raise (MemoryBudgetError if refused.group(1) == "MemoryBudgetError" else ConfigError)(
                    refused.group(2)) from None
            raise PolicyJobError(f"{what}: actor died ({type(e).__name__}: {text.splitlines()[0]})") from e

    def worker_pids(self) -> list[int]:
        return self._get([w.pid.remote() for w in self.workers], "worker pid")

    def learner_pid(self) -> int:
        return self._get(self.learner.pid.remote(), "learner pid")

    def rollout(self, shards: list[list[str]], seeds: list[tuple]) -> list[Rollout]:
        if self.plan.colocated:  # the learner's own model samples: no weights to broadcast
            return self._get(self.learner.rollout_shards.remote(shards, seeds), "rollout")
        weights = ray.put(self._get(self.learner.lora_state.remote(), "learner weights"))
        return self._get([w.rollout.remote(weights, s, seed, self.job)
                          for w, s, seed in zip(self.workers, shards, seeds)], "rollout")

    def learn(self, rollouts: list[Rollout], step: int) -> dict:
        return self._get(self.learner.learn.remote(rollouts, step), f"learn step {step}")

    def state_dict(self) -> dict:
        return self._get(self.learner.state_dict.remote(), "learner state")

    def load_state_dict(self, state: dict) -> None:
        self._get(self.learner.load_state_dict.remote(state), "learner restore")

    def load_weights(self, lora: dict, value_head: dict | None, kl_coef: float | None = None) -> None:
        self._get(self.learner.load_weights.remote(lora, value_head, kl_coef), "learner init weights")

    def export(self, out_dir: Path) -> list[str]:
        files = self._get(self.learner.export_files.remote(), "export adapter")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out_dir / Path(name).name).write_bytes(data)
        return sorted(files)

    def close(self, keep: bool = True) -> None:
        """End the job: kept actors stay for the next one when it ended well (``keep``)."""
        if self.keep and keep:
            log.info("ppo actors kept for the next job", names=kept_actors(self.key))
        else:
            for a in [self.learner, *self.workers]:
                if a is None:
                    continue
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already dead
                    pass
        if self.started:
            ray.shutdown()
