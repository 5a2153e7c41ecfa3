"""The one configuration schema of looprl.

Every process reads the same typed config: defaults below, overridden by a TOML file
(`looprl.toml` in the working directory, or the path in ``LOOPRL_CONFIG`` / ``--config``),
overridden by ``LOOPRL_<SECTION>__<KEY>`` environment variables
(e.g. ``LOOPRL_KAFKA__BOOTSTRAP_SERVERS=broker:9092``).

Unknown keys and bad values are errors that name the key: a typo in a config file must never
silently fall back to a default.

Ports: every ``*port`` key (and every ``--port`` / ``--metrics-port`` flag) takes 0 for "a free
port", which the process logs at start (``"<what> listening"`` with ``url`` and ``port``;
``looprl.ops.core.listen``). No port key turns its server off.

Each stage owns one section class below. Add a field to your own section; keep defaults small
enough that the whole loop runs on a 2-core laptop, and document production values in a comment.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from croniter import CroniterError, croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "LOOPRL_"
ENV_NESTED = "__"
# Environment variables with the prefix that are not config keys.
_NON_CONFIG_ENV = {"LOOPRL_CONFIG"}


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names the key."""


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: "localhost", 127.0.0.0/8 (also as
    ::ffff:127.x.x.x), ::1."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def require_token_off_loopback(host: str, token: SecretStr | None, host_key: str, token_key: str) -> None:
    """Refuse to open an endpoint without a token on an address other machines can reach."""
    if token is None and not is_loopback(host):
        raise ConfigError(f"config key '{token_key}' must be set when {host_key}={host!r} is not loopback "
                          "(anyone who can reach the address could call it)")


def _not_blank(v: SecretStr | None) -> SecretStr | None:
    # A blank token would match a request's blank "Authorization: Bearer " header.
    if v is not None and not v.get_secret_value().strip():
        raise ValueError("must not be empty (leave it unset instead)")
    return v


# A bearer token: unset, or a non-blank secret (masked by `looprl config` and in logs).
Token = Annotated[SecretStr | None, AfterValidator(_not_blank)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# Who a Kafka client works for: picks the principal (KafkaConfig.security).
KafkaRole = Literal["ingest", "responses", "feedback"]
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class KafkaSecurity:
    """How one Kafka client connects and authenticates. ``KafkaConfig.security(role)`` makes it
    from the config; a product backend may build one for ``FeedbackClient``/``ResponseLogger``.
    ``looprl.ingest.transport.security_options`` maps it onto kafka-python and librdkafka."""

    protocol: SecurityProtocol = "PLAINTEXT"
    mechanism: SaslMechanism | None = None
    username: str | None = None
    password: SecretStr | None = None  # a plain str is wrapped, so reprs and logs never show it
    cafile: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.password, str):
            object.__setattr__(self, "password", SecretStr(self.password))


class KafkaConfig(Section):
    # None: the workspace's embedded Tansu broker (memory only, dev/CI), run by `looprl ingest broker`
    # or the demo and found through <workspace>/state/broker.json; with none running, a process fails.
    bootstrap_servers: str | None = None
    # With no bootstrap_servers and no running embedded broker, start a private one in this process
    # (it stops, and its events vanish, when the process exits): only for one-process experiments.
    embedded: bool = False
    topic_feedback: str = "looprl.feedback"
    topic_responses: str = "looprl.responses"
    topic_dlq: str = "looprl.dlq"
    # Tansu 0.6 takes ~half the session timeout to complete a group join; keep it short.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(2000, ge=100)
    # Port of the embedded broker (0: a free one); its address goes to <workspace>/state/broker.json,
    # where other processes find it.
    embedded_port: int = Field(0, ge=0, le=65535)
    # Client library of the seam looprl.ingest.transport. confluent (librdkafka): non-blocking sends
    # and ~10x faster consumption (benchmarks/ingest.py); kafka-python: pure Python.
    client: Literal["kafka-python", "confluent"] = "confluent"
    # Topics are created once with this many partitions (Tansu cannot add partitions later).
    topic_partitions: int = Field(3, ge=1)
    # Security of every looprl Kafka client (looprl.ingest.transport.security_options maps it onto
    # kafka-python and librdkafka). PLAINTEXT: no TLS, no authentication: the embedded broker, or a
    # Kafka only the looprl hosts can reach. A shared Kafka: SASL_SSL with SCRAM-SHA-512 and ACLs
    # (ops/README.md, Security). Anything but PLAINTEXT needs kafka.bootstrap_servers.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    # SASL_*: the mechanism and this process's principal (ingest: the consumer, its DLQ producer and
    # topic admin; also the other roles unless they have their own below). Ignored otherwise: an error.
    sasl_mechanism: SaslMechanism | None = Field(None, validate_default=True)
    sasl_username: str | None = Field(None, validate_default=True)
    sasl_password: Token = Field(None, validate_default=True)
    # SSL/SASL_SSL: PEM bundle of the CA(s) that signed the brokers' certificates; None: the system's.
    ssl_cafile: Path | None = None
    # Own principals per role, for a config shared by several roles (SASL_* only; both or neither):
    # the serving tier's response logger writes kafka.topic_responses as responses_username, the
    # feedback writers (collector, the config's FeedbackClient) write kafka.topic_feedback as
    # feedback_username, so an ACL can let the serving principal alone write answers.
    responses_username: str | None = None
    responses_password: Token = Field(None, validate_default=True)
    feedback_username: str | None = None
    feedback_password: Token = Field(None, validate_default=True)

    @field_validator("topic_responses", "topic_dlq")
    @classmethod
    def _distinct_topics(cls, v: str, info) -> str:
        # Ingest takes responses only from topic_responses and feedback only from topic_feedback,
        # and a DLQ shared with either would feed its records back in.
        for other in ("topic_feedback", "topic_responses"):
            if other != info.field_name and info.data.get(other) == v:
                raise ValueError(f"must differ from kafka.{other} (both are {v!r})")
        return v

    @field_validator("security_protocol")
    @classmethod
    def _real_kafka_only(cls, v: str, info) -> str:
        if v != "PLAINTEXT" and not info.data.get("bootstrap_servers"):
            raise ValueError(f"{v} needs kafka.bootstrap_servers: the embedded broker (Tansu) speaks "
                             "PLAINTEXT on loopback only")
        return v

    @field_validator("sasl_username", "responses_username", "feedback_username")
    @classmethod
    def _not_blank_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (leave it unset instead)")
        return v

    @field_validator("sasl_mechanism", "sasl_username", "sasl_password")
    @classmethod
    def _sasl_settings(cls, v: Any, info) -> Any:
        protocol = info.data.get("security_protocol")
        if protocol is None:  # security_protocol itself is wrong: that error is reported
            return v
        if protocol in _SASL_PROTOCOLS and v is None:
            raise ValueError(f"must be set when kafka.security_protocol is {protocol}")
        if protocol not in _SASL_PROTOCOLS and v is not None:
            raise ValueError(f"is set but kafka.security_protocol is {protocol}, which sends no SASL credentials "
                             "(it would be ignored): set kafka.security_protocol to SASL_SSL or SASL_PLAINTEXT, "
                             "or unset this key")
        return v

    @field_validator("ssl_cafile")
    @classmethod
    def _cafile(cls, v: Path | None, info) -> Path | None:
        if v is None:
            return v
        protocol = info.data.get("security_protocol")
        if protocol is not None and protocol not in _TLS_PROTOCOLS:
            raise ValueError(f"is set but kafka.security_protocol is {protocol}, which uses no TLS (it would be "
                             "ignored): set kafka.security_protocol to SSL or SASL_SSL, or unset this key")
        if not v.is_file():
            raise ValueError(f"{v} does not exist or is not a file")
        return v

    @field_validator("responses_password", "feedback_password")
    @classmethod
    def _role_principal(cls, v: SecretStr | None, info) -> SecretStr | None:
        role = info.field_name.removesuffix("_password")
        if f"{role}_username" not in info.data:  # the username itself is wrong: that error is reported
            return v
        user = info.data[f"{role}_username"]
        if (user is None) != (v is None):
            missing = f"kafka.{role}_password" if v is None else f"kafka.{role}_username"
            raise ValueError(f"kafka.{role}_username and kafka.{role}_password are set together: {missing} is not set")
        protocol = info.data.get("security_protocol")
        if v is not None and protocol is not None and protocol not in _SASL_PROTOCOLS:
            raise ValueError(f"kafka.{role}_username/{role}_password are set but kafka.security_protocol is "
                             f"{protocol}, which sends no SASL credentials (they would be ignored)")
        return v

    def security(self, role: KafkaRole = "ingest") -> KafkaSecurity:
        """The security settings of one client. "responses" (the serving tier's ``ResponseLogger``)
        and "feedback" (the collector, ``FeedbackClient``) use their own principal where one is
        configured; "ingest" (consumer, dead-letter producer, topic admin) and the others use
        ``kafka.sasl_username``."""
        user, password = self.sasl_username, self.sasl_password
        if role in ("responses", "feedback"):
            if getattr(self, f"{role}_username") is not None:
                user, password = getattr(self, f"{role}_username"), getattr(self, f"{role}_password")
        elif role != "ingest":
            raise ValueError(f"unknown Kafka client role {role!r} (expected ingest, responses or feedback)")
        return KafkaSecurity(self.security_protocol, self.sasl_mechanism, user, password, self.ssl_cafile)


class IngestConfig(Section):
    group_id: str = "looprl-ingest"
    batch_max_events: int = Field(5000, ge=1)
    batch_max_seconds: float = Field(1.0, gt=0)
    max_text_chars: int = Field(16_000, ge=1)
    max_event_bytes: int = Field(256 * 1024, ge=256)
    metrics_port: int = Field(9101, ge=0, le=65535)
    # Event ids remembered for dedupe (producer resends, replays after a crash); ~140 bytes each.
    # Loaded from the newest Parquet files at start. Must exceed batch_max_events.
    dedupe_max_ids: int = Field(500_000, ge=1000)
    # Accepted event timestamps (`ts`) lie within this window around ingest time; others are
    # dead-lettered (reason ts_out_of_range) or refused by the collector.
    ts_max_past_s: float = Field(30 * 86400, gt=0)
    ts_max_future_s: float = Field(3600, gt=0)
    # A dead-letter record keeps at most this many bytes of the original value (the rest is cut,
    # headers give the original size and sha256): a record too large for the DLQ never blocks a batch.
    dlq_max_bytes: int = Field(512 * 1024, ge=1024)
    # Feedback about a response not in the log waits this long for it (responses come on their own
    # topic and may arrive later); then it is dead-lettered with reason orphan_feedback.
    orphan_timeout_seconds: float = Field(600.0, gt=0)
    # HTTP feedback collector (POST /v1/feedback)
    collector_host: str = "127.0.0.1"
    collector_port: int = Field(8090, ge=0, le=65535)
    collector_token: Token = None
    collector_max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Requests waiting on Kafka acknowledgements at once; beyond it the collector answers 503 with
    # Retry-After (under a Kafka outage requests wait up to the delivery timeout each).
    collector_max_concurrent: int = Field(64, ge=1)
    # Web origins (e.g. "https://app.example.com", or "*") whose pages may POST feedback (CORS); none by default.
    collector_cors_origins: list[str] = []


class ModelConfig(Section):
    # A local Hugging Face checkpoint directory of a supported MoE family (qwen3_moe, mixtral, olmoe,
    # qwen2_moe, deepseek_v3). None: <workspace>/base, built by `looprl init` or a link to the
    # directory given to `looprl init --base PATH`.
    base_path: Path | None = None
    family: Literal["qwen3_moe", "mixtral"] = "qwen3_moe"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    num_experts: int = Field(4, ge=2)
    experts_per_token: int = Field(2, ge=1)
    expert_intermediate_size: int = Field(64, ge=4)
    # Upper bound for the byte-level BPE; the shipped corpus saturates at ~620 tokens (whole words).
    vocab_size: int = Field(1024, ge=300)
    max_position_embeddings: int = Field(256, ge=16)
    pretrain_steps: int = Field(500, ge=0)
    seed: int = 0
    # Extra tokens that end an answer, besides the chat template's end of turn and the eos ids of
    # the tokenizer and generation config (e.g. ["<|endoftext|>"]).
    stop_tokens: list[str] = []
    # Where every stage runs the base: "auto" (the first CUDA GPU when torch sees one, else the CPU),
    # "cpu", "cuda" or "cuda:N" (refused when torch has no CUDA). Resolved by looprl.policy.model.
    device: str = "auto"
    # Weights' precision: "auto" is bfloat16 on a GPU (float16 where it lacks bf16) and float32 on
    # the CPU. LoRA factors, the value and reward heads and the PPO math stay float32 regardless.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Recompute each decoder layer's activations in the backward pass (torch.utils.checkpoint,
    # use_reentrant=False) in the PPO learner and the reward updater: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # Memory (GiB) a stage may plan for at start instead of what the device reports free (CUDA:
    # torch.cuda.mem_get_info; CPU: available RAM): for shared machines and tests. None: reported.
    memory_budget_gb: float | None = Field(None, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda or cuda:N")
        return v


class KernelsConfig(Section):
    # peft: peft's target_parameters path; torch: grouped reference; triton: GPU kernel. auto: triton
    # on a CUDA model when triton is installed, else torch on CUDA, peft on the CPU.
    moe_lora: Literal["auto", "peft", "torch", "triton"] = "auto"
    # naive: full log_softmax; chunked: vocabulary chunks with a custom backward. auto: triton on a
    # CUDA model when triton is installed, else chunked on CUDA, naive on the CPU.
    logprob: Literal["auto", "naive", "chunked", "triton"] = "auto"
    logprob_chunk_size: int = Field(4096, ge=16)


class ScoreSpec(Section):
    """How the values of one score name (``ScoreEvent.name``) become reward labels in [0, 1]."""

    # Numbers in [min, max] map linearly onto [0, 1]; a number outside it is not trained on.
    min: float = 0.0
    max: float = 1.0
    # True: a higher number (and true) is the better answer; false flips the label (e.g. "toxicity").
    higher_is_better: bool = True
    # Category values that train, each with its label in [0, 1]; other categories are not trained on.
    categories: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}

    @field_validator("max")
    @classmethod
    def _max_above_min(cls, v: float, info: Any) -> float:
        lo = info.data.get("min")
        if lo is not None and not v > lo:
            raise ValueError(f"max ({v}) must be greater than min ({lo})")
        return v


class RewardConfig(Section):
    # Optional sequence-classification checkpoint used instead of base+LoRA+head.
    checkpoint_path: Path | None = None
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    # LoRA on the attention projections and on the experts (measured on the tiny base: held-out
    # pair accuracy 0.83 with the experts vs 0.75 without after the same 75 steps, ~10% slower).
    # "auto": discovered per family (looprl.policy.families: attention, routed and shared experts,
    # never the router or a gate); a list: peft module names, each must match a module.
    target_modules: list[str] | Literal["auto"] = "auto"
    # "auto": the fused expert weights (peft target_parameters); a list: parameter names.
    target_parameters: list[str] | Literal["auto"] = "auto"
    learning_rate: float = Field(5e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    epochs_per_update: int = Field(3, ge=1)
    replay_ratio: float = Field(1.0, ge=0)
    max_seq_len: int = Field(128, ge=8)
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    # A candidate is refused only when it is confidently worse than the published version on the
    # same held-out events (paired differences, one-sided at publish_confidence) by more than this.
    publish_margin: float = Field(0.0, ge=0)
    # Confidence of that "worse" verdict: higher publishes more small, noisy increments.
    publish_confidence: float = Field(0.9, gt=0.5, lt=1)
    min_new_events: int = Field(32, ge=1)
    # An update also runs on fewer than min_new_events once the oldest waiting one has waited this
    # long, so sparse feedback is not stuck waiting for a batch (0: off).
    max_wait_seconds: float = Field(60.0, ge=0)
    # Number of scalar heads on the shared LoRA features (bootstrapped ensemble): their spread is
    # the model's uncertainty, their mean its score. 1: a single head, no uncertainty.
    ensemble_heads: int = Field(4, ge=1, le=64)
    # Independent LoRA adapters on the one frozen base, each with its own ensemble_heads heads,
    # trained apart from their own random starts; the score is the mean of all their heads. Heads
    # that share one LoRA agree too readily: separate adapters rank answers better from a few
    # hundred labels (reward/README.md), at A times the training and scoring compute.
    ensemble_adapters: int = Field(1, ge=1, le=16)
    # What the heads read: "echo" (the last token's hidden state, the mean prompt state times the mean
    # answer state, and the answer's states split by whether their token occurs in the question, so
    # preferences that depend on the question are learned), "last_match" (the first two) or "last"
    # (the last token's only); "echo_sum" is "echo" with the two answer sums not divided by the
    # answer's length, so a preference for how much of something an answer says is read as such.
    # A version keeps the features it was trained with.
    features: Literal["last", "last_match", "echo", "echo_sum"] = "echo"
    # Bradley-Terry weight of a correction relative to an ordinary pair: an edit is deliberate
    # work by the user, a stronger and rarer signal than picking one of two given answers.
    correction_weight: float = Field(2.0, gt=0)
    # Bradley-Terry and cross-entropy weight of a thumb relative to a pair. A thumb is one coin flip
    # of the user's P(thumbs-up) for one answer; a pair says which of two answers is better. With a
    # few hundred labels, mostly thumbs, they held the model's ranking near 0.6 (reward/README.md).
    # 0 leaves thumbs out of training; they still count in the prequential and held-out estimates.
    thumbs_weight: float = Field(1.0, ge=0)
    # At most this share of an update's new examples comes from one user; the rest waits for a
    # later update. An update therefore needs at least 1/share users (see reward/README.md).
    max_user_share: float = Field(0.1, gt=0, le=1)
    # The updater remembers consumed event ids for this long behind the newest consumed event;
    # earlier resolved events count as consumed. Feedback that becomes trainable later than that
    # (its response ingested late, or deferred by max_user_share) is never trained on.
    consumed_window_seconds: float = Field(86400.0, gt=0)
    # Score names the reward model trains on, each with how its values map to labels (ScoreSpec);
    # scores of other names are stored but never trained on. See reward/README.md.
    score_names: dict[str, ScoreSpec] = {}
    poll_seconds: float = Field(5.0, gt=0)
    metrics_port: int = Field(9102, ge=0, le=65535)
    seed: int = 0


class PolicyConfig(Section):
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    # LoRA rule of thumb: ~10x the full fine-tuning learning rate.
    learning_rate: float = Field(1e-3, gt=0)
    # LoRA targets, as reward.target_modules: "auto" discovers them per family (attention, routed and
    # shared experts; never the router or a gate), a list names peft modules.
    target_modules: list[str] | Literal["auto"] = "auto"
    # "auto": the fused expert weights (peft target_parameters); a list: parameter names.
    target_parameters: list[str] | Literal["auto"] = "auto"
    prompts_file: Path | None = None
    rollout_batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(8, ge=1)
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # Standardize reward-model scores with their running mean/std, so init_kl_coef and target_kl
    # mean the same for any reward model's scale.
    normalize_scores: bool = True
    init_kl_coef: float = Field(0.3, ge=0)
    # The adaptive controller never takes the coefficient below this, within a run or when a run
    # continues the last run's (policy/ppo.py AdaptiveKLController). 0: no floor.
    min_kl_coef: float = Field(0.0, ge=0)
    # Per-completion KL(policy || base) in nats that the adaptive controller steers towards
    # (Ziegler et al.); horizon in completions (small so short runs adapt; production ~10_000).
    target_kl: float = Field(3.0, gt=0)
    kl_horizon: int = Field(100, ge=1)
    # A rollout the gate would call degenerate (empty or near-empty, or repetitive: gate.min_answer_tokens,
    # gate.min_distinct_token_ratio) is rewarded at most this many standard deviations below the
    # mean reward-model score, whatever the reward model says: a reward model learned from a few
    # labels can score such answers high, and PPO then trains towards candidates the gate rejects.
    # None: the reward model's score stands.
    degenerate_penalty: float | None = Field(None, ge=0)
    # KL stop: once the mean rollout KL of the last 5 steps reaches this, the run ends and publishes
    # its newest checkpoint saved under it (policy/trainer.py), instead of training on into a
    # candidate the gate's gate.max_kl rejects. None: runs always take all their steps.
    stop_kl: float | None = Field(None, gt=0)
    steps: int = Field(20, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    num_rollout_workers: int = Field(1, ge=1)
    # None: local Ray (temp dir inside the workspace). Production: "ray://head:10001" or "auto".
    ray_address: str | None = None
    seed: int = 0
    # Distinct prompts of the most recent served responses added to the rollout prompt pool.
    recent_prompts: int = Field(256, ge=0)
    max_prompt_tokens: int = Field(64, ge=1)
    # Every ray.get waits at most this long: a dead or stuck worker fails the job, never hangs it.
    ray_timeout_s: float = Field(600.0, gt=0)
    ray_object_store_mb: int = Field(128, ge=64)
    # Keep the learner and rollout actors (each with its copy of the base) between jobs that run on a
    # local Ray the job did not start (the scheduler's), so the next job skips their start and model
    # loads (policy/ray_backend.py). Never on a remote cluster (ray_address).
    keep_actors: bool = True
    metrics_port: int = Field(9103, ge=0, le=65535)
    # Start from an earlier adapter (same rank/targets) so training is continual across runs.
    init_from_promoted: bool = True
    # Which one (storage/releases.py `continue_point`): "promoted", the version serving all traffic;
    # "newest_gated", the trainer's own line: the newest version that passed the gate and descends
    # from the promoted one through gated versions only (one the users rolled back ends its line),
    # else the promoted one. Serving follows the line through the gate and the canary, so a run
    # builds on the runs before it while users still judge an older one.
    continue_from: Literal["promoted", "newest_gated"] = "promoted"
    # Torch threads per trainer process/actor. 1 for the tiny CPU model: more threads on busy
    # cores make torch's thread pool spin and run many times slower.
    torch_threads: int = Field(1, ge=1)
    # Off-policy learning (policy/served.py): add labelled served answers that carry their token
    # ids and log-probs to every PPO batch. False: on-policy rollouts only.
    offpolicy: bool = True
    # The labels that make a served answer a sample: thumbs, ratings, comparisons of two served
    # answers (chosen 1, rejected 0), corrections (the corrected answer 0).
    offpolicy_kinds: list[Literal["thumbs", "rating", "preference", "correction"]] = Field(
        default_factory=lambda: ["thumbs", "rating", "preference", "correction"])
    # Served answers added to each step's batch (on top of rollout_batch_size rollouts).
    offpolicy_samples: int = Field(8, ge=0)
    # Newest labelled served answers a run reads from the event log, once, when it starts.
    offpolicy_pool: int = Field(256, ge=0)
    # Drop answers served by an adapter more than this many versions behind the one the run starts
    # from: generations back on its line (parent 1), else by version number.
    offpolicy_max_staleness: int = Field(3, ge=0)
    # Truncation of the per-token importance weight pi_old / pi_behaviour (truncated IS).
    offpolicy_is_cap: float = Field(2.0, ge=1)
    # A served answer's reward: running mean of reward-model scores + this * (2 * label - 1) * their std.
    offpolicy_label_reward: float = Field(1.0, ge=0)


class GateConfig(Section):
    min_win_rate: float = Field(0.55, ge=0, le=1)
    # Per-completion KL to base (nats), same estimator as training: a cap well above
    # policy.target_kl, which the adaptive controller overshoots for a while.
    max_kl: float = Field(8.0, gt=0)
    # Samples per contender, split between the two suites (policy/gate.py).
    heldout_prompts: int = Field(32, ge=1)
    # Share of gate.heldout_prompts given to the held-out-forms suite (question forms training never
    # samples); the rest go to hash-held-out pool prompts of the training forms. 0 turns the suite off.
    heldout_forms_share: float = Field(0.5, ge=0, le=1)
    # The held-out-forms suite: one prompt per line, or JSONL like policy.prompts_file; None: the
    # base's shipped held-out prompts. Prompts that are also training prompts are dropped.
    heldout_suite_file: Path | None = None
    # Reject a candidate whose mean reward on held-out forms is below the incumbent's by more than
    # this many standard deviations of the incumbent's rewards, whatever it gains on training forms.
    max_heldout_regression: float = Field(0.25, ge=0)
    # An answer with fewer tokens than this (end of turn not counted) is empty or near-empty.
    min_answer_tokens: int = Field(2, ge=1)
    # An answer of 4+ tokens whose distinct tokens are fewer than this share of its length is repetitive.
    min_distinct_token_ratio: float = Field(0.5, gt=0, le=1)
    # Reject when, on either suite, the candidate's share of degenerate answers (empty, near-empty or
    # repetitive) exceeds the incumbent's by more than this.
    max_degenerate_increase: float = Field(0.1, ge=0, le=1)


class ServingConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Guards the admin endpoints of `looprl serving serve` (adapter load/unload, alias, state);
    # the controller sends it to embedded looprl endpoints.
    admin_token: Token = None
    # vLLM's --api-key, the inference key every client of a vLLM endpoint holds. vLLM checks this
    # one key on all /v1 routes, its adapter load/unload included, so the controller sends it there.
    vllm_api_key: Token = None
    max_batch_size: int = Field(16, ge=1)
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    default_max_tokens: int = Field(32, ge=1)
    served_model_name: str = "base"
    alias: str = "policy"
    # Endpoints the adapter controller drives (embedded servers or vLLM).
    endpoints: list[str] = ["http://127.0.0.1:8000"]
    controller_poll_seconds: float = Field(2.0, gt=0)
    controller_metrics_port: int = Field(9104, ge=0, le=65535)
    # Base checkpoint served; None: the workspace base (cfg.base_path).
    base_path: Path | None = None
    # Requests queued beyond the running batch before answering 503 (production: ~10x batch).
    max_queue: int = Field(256, ge=1)
    # Consecutive failed requests after which an adapter is unhealthy: the controller rolls it back.
    unhealthy_after: int = Field(3, ge=1)
    # Torch intra-op threads of the engine: 1 for the tiny CPU model (more spin on busy cores).
    torch_threads: int = Field(1, ge=1)
    # Log every answer to kafka.topic_responses (skipped with a warning if Kafka is unreachable);
    # false behind `looprl gateway`, which logs them.
    log_responses: bool = True
    # Controller: per-call HTTP timeout, attempts per call, previous promoted versions kept loaded.
    controller_timeout_seconds: float = Field(10.0, gt=0)
    controller_retries: int = Field(3, ge=1)
    keep_previous: int = Field(1, ge=0)
    # A version the routing file stopped naming (a canary rolled back, a promoted one replaced)
    # stays loaded this much longer, so gateways, which re-read that file every
    # gateway.routing_poll_seconds, and requests they already sent to it are answered, not 404.
    unload_grace_seconds: float = Field(2.0, ge=0)
    # LoRA on fused MoE experts at serving time: "torch"/"triton" = looprl.kernels fused side path
    # (fast, mixed-adapter batches), "peft" = peft's re-parametrised weights (reference); "auto":
    # triton on a CUDA model when triton is installed, else torch.
    moe_lora: Literal["auto", "peft", "torch", "triton"] = "auto"
    # Longest prompt + answer the engine accepts, in tokens (a longer request is refused); bounds
    # the KV cache the start-up memory check plans for. None: the base's max_position_embeddings.
    max_context_tokens: int | None = Field(None, ge=2)
    # A /v1/completions prompt is the user's turn, rendered with the base's chat template as the
    # trainer renders it; false: raw OpenAI completion semantics (the prompt is the model's input).
    # Chat requests always go through the chat template.
    render_prompts: bool = True
    # A request body over max_body_bytes is refused (413) before it is parsed; a prompt (or a chat's
    # messages) over max_prompt_chars characters is refused (400) before it is tokenized.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(128_000, ge=1)
    # Targeted comparisons for chat requests that do not set looprl_compare: "auto" may answer with
    # a second candidate when the reward ensemble disagrees (serving/README.md), "never" does not.
    compare: Literal["auto", "never"] = "never"
    # While the alias has a canary, a comparison's second candidate comes from the other arm (the
    # canary's answer beside the control's, to the same user and question): the canary counts the
    # user's choice as a paired vote (canary.count_pairs). So comparisons show the canary to users
    # beyond canary.traffic_share, as the second answer only. False: both from the user's own arm.
    compare_across_canary: bool = True
    # Ask only when the share of reward-ensemble members preferring one candidate is at most this.
    compare_max_confidence: float = Field(0.75, ge=0.5, le=1.0)
    # Comparisons asked per hour and server at most, on average (a token bucket); 0: none.
    compare_per_hour: float = Field(60.0, ge=0)
    # Seconds between checks of the registry's reward "latest" pointer, to serve the newest reward model.
    compare_reload_seconds: float = Field(10.0, gt=0)


class GatewayConfig(Section):
    """`looprl gateway`: the OpenAI-compatible proxy product backends call instead of vLLM."""

    # Address and port product traffic reaches the gateway on.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Upstream OpenAI servers (vLLM or `looprl serving serve` replicas); empty: serving.endpoints.
    upstreams: list[str] = []
    # Bearer tokens clients must send (any one of them); required when host is not loopback.
    # Separate from serving.admin_token: a client token opens only the inference routes.
    client_tokens: list[Annotated[SecretStr, AfterValidator(_not_blank)]] = []
    # Prometheus /metrics of the gateway (on metrics_host), apart from product traffic.
    metrics_port: int = Field(9106, ge=0, le=65535)
    # Seconds between upstream health checks (GET /health); a failed request marks its upstream down at once.
    health_interval_seconds: float = Field(2.0, gt=0)
    # A connection not made within this time is tried on another replica.
    connect_timeout_seconds: float = Field(2.0, gt=0)
    # Longest wait for an upstream's next byte (a whole non-streamed answer, or one streamed chunk).
    read_timeout_seconds: float = Field(600.0, gt=0)
    # Replicas tried per request, only while no byte has reached the client.
    max_attempts: int = Field(3, ge=1)
    # Pooled connections to all upstreams together (keep-alive, reused across requests).
    max_connections: int = Field(512, ge=1)
    # How often the controller's routing file (state/serving_routing.json) is checked for changes.
    routing_poll_seconds: float = Field(0.5, gt=0)
    # Log every answer as a ResponseEvent to kafka.topic_responses (run `looprl serving serve`
    # upstreams with serving.log_responses = false, or answers are logged twice).
    log_responses: bool = True
    # Answers held in memory for Kafka while it is unreachable (buffered plus in flight); beyond it
    # they are dropped and counted (looprl_gateway_response_logs_dropped_total), never the request.
    max_buffered_logs: int = Field(10_000, ge=1)
    # Ask every upstream (vLLM or looprl serve) for the served token ids and their log-probs, to log
    # them for off-policy learning; a client that did not ask for them gets its answer without them.
    request_token_ids: bool = True
    # A request body over this size is refused (413) before it is read further.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)

    @field_validator("client_tokens", mode="before")
    @classmethod
    def _one_token(cls, v: Any) -> Any:
        # LOOPRL_GATEWAY__CLIENT_TOKENS=<token> (one token, no JSON list) is the usual deployment.
        return [v] if isinstance(v, str) else v


class SchedulerConfig(Section):
    interval_seconds: float = Field(300.0, gt=0)
    # A cron expression (UTC; croniter syntax, e.g. "*/30 * * * *"); replaces interval_seconds.
    cron: str | None = None
    feedback_trigger_events: int = Field(200, ge=1)
    accuracy_drop_trigger: float = Field(0.1, ge=0, le=1)
    max_retries: int = Field(3, ge=0)
    backoff_seconds: float = Field(5.0, ge=0)
    poll_seconds: float = Field(2.0, gt=0)
    metrics_port: int = Field(9105, ge=0, le=65535)
    # Jobs are `looprl` subcommands; "ray": run them as Ray tasks (policy.ray_address or a local
    # cluster), "subprocess": plain local subprocesses.
    jobs: list[Literal["reward", "policy"]] = ["reward", "policy"]
    reward_command: list[str] = ["reward", "update"]
    policy_command: list[str] = ["policy", "train", "--gate"]
    runner: Literal["ray", "subprocess"] = "ray"
    # With runner "ray": modules the next job's worker imports while the current job runs, so a job
    # starts with them loaded ([]: nothing; the worker still starts ahead).
    preload_modules: list[str] = ["torch", "transformers", "peft", "looprl.policy.trainer", "looprl.policy.gate",
                                  "looprl.reward.updater"]
    job_timeout_seconds: float = Field(3600.0, gt=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    # 1: jobs run back to back (2-core machines); production may run reward and policy jobs together.
    max_concurrent_jobs: int = Field(1, ge=1)
    # PPO continues from the promoted adapter, so a run waits while a canary may still replace it.
    policy_waits_for_canary: bool = True
    # PPO waits until the reward model's ranking skill (pair accuracy and thumbs/points AUC of its
    # held-out and recent prequential results, pooled) has a lower confidence bound at least this
    # (0: no condition). 0.5 is chance; thumbs are noisy, so even a perfect model's AUC is well below 1.
    policy_min_reward_skill: float = Field(0.0, ge=0, le=1)
    # ... or until the newest reward version has read this many feedback events (its watermark),
    # whichever comes first (0: the bound alone). With sparse labels the bound reads the users' coin
    # flips on a few dozen of them and can lag a model that already ranks well by minutes.
    policy_start_after_labels: int = Field(0, ge=0)
    # One-sided confidence of that lower bound.
    policy_reward_confidence: float = Field(0.9, gt=0.5, lt=1)
    # The prequential part of that evidence: the newest reward updates that together hold at least
    # this many labels (at least 3 updates, at most 50), so sparse feedback pools enough of them.
    policy_reward_window_labels: int = Field(200, ge=1)
    # Deprecated (pairs only; use policy_min_reward_skill): still honoured when set, so existing
    # configs keep working. PPO also waits for this held-out and prequential pair accuracy ...
    policy_min_reward_pair_accuracy: float = Field(0.0, ge=0, le=1)
    # ... on at least this many pairs (deprecated too).
    policy_min_reward_pairs: int = Field(0, ge=0)

    @field_validator("cron")
    @classmethod
    def _cron_fires(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                croniter(v).get_next(float)  # also refuses dates that never come, e.g. "0 0 31 2 *"
            except CroniterError as e:
                raise ValueError(f"{v!r} is not a cron expression that ever fires: {e}") from None
        return v


class CanaryConfig(Section):
    traffic_share: float = Field(0.2, gt=0, lt=1)
    min_samples: int = Field(50, ge=1)
    # Posterior probability thresholds of the Beta-Binomial test on thumbs-up rate.
    promote_probability: float = Field(0.9, gt=0.5, lt=1)
    # 0.99: with a look every 10 votes, ~7% false rollbacks of an equal candidate (0.95: ~23%).
    rollback_probability: float = Field(0.99, gt=0.5, lt=1)
    # The test ends when both arms have this many votes (the smaller arm decides: at traffic_share
    # 0.2 the control has four times as many by then).
    max_samples: int = Field(400, ge=1)
    # At max_samples without a significant regression: True promotes (a guardrail canary: the
    # offline gate already judged the candidate better), False decides by P(better) >=
    # max_samples_promote_probability.
    promote_on_no_regression: bool = True
    # With promote_on_no_regression False: the P(better) a candidate needs at max_samples, else it is
    # rolled back and the incumbent serves on. 0.5: the version the users liked more, however
    # slightly. Higher keeps the incumbent when the votes barely lean: a candidate can be as good
    # on the canary's traffic and worse on questions that traffic does not hold.
    max_samples_promote_probability: float = Field(0.5, ge=0.5, lt=1)
    # At most this share of an arm's counted thumbs comes from one user, so an arm needs votes
    # from at least 1/share users (production: 0.1 or less; the demo's 8 users need ~0.4).
    max_user_share: float = Field(0.1, gt=0, le=1)
    # A canary still undecided this many seconds after it started ends as on_deadline says, so a
    # canary without votes never holds PPO forever (production: a day or more at low traffic).
    deadline_seconds: float = Field(86400.0, gt=0)
    # At the deadline: "end" takes the candidate off traffic without a verdict (status rolled_back,
    # decision "end"); "rollback" counts it as a failed canary (decision "rollback", which alerts).
    on_deadline: Literal["end", "rollback"] = "end"
    # Count paired votes: users' choices between the two arms' answers to one question (a
    # comparison while the canary runs, serving.compare_across_canary), as evidence beside the
    # thumbs (ops/canary.py). False: thumbs alone.
    count_pairs: bool = True


class MetricsConfig(Section):
    # Prometheus Pushgateway (e.g. "http://pushgateway:9091") that short jobs (`looprl policy train`,
    # `policy gate`, `reward update`, so the scheduler's runs too) push their final metrics to when
    # they end; None: no push. A failed push is logged and never fails the job.
    pushgateway_url: str | None = None
    # The `instance` of the pushed group: each job's push replaces its previous one (give each
    # deployment sharing one Pushgateway its own).
    push_instance: str = Field("looprl", min_length=1)
    # Longest wait for the Pushgateway's answer to one push.
    push_timeout_seconds: float = Field(5.0, gt=0)


class DemoConfig(Section):
    minutes: float = Field(15.0, gt=0)
    users: int = Field(8, ge=1)
    preference: str = "looprl.ops.sim.preference:default_preference"
    # Simulator traffic. Eval users (held-out prompts, no feedback sent) measure learning.
    eval_user_prefix: str = "eval-"
    eval_fraction: float = Field(0.15, ge=0, le=1)
    base_eval_fraction: float = Field(0.25, ge=0, le=1)  # share of eval requests sent to the base model
    # Most users never click: thumbs on a share of answers; comparisons of two answers ("regenerate")
    # are the most informative feedback for the reward model, and noisy thumbs slow it down.
    # How much the simulated users tell the loop (`looprl demo --feedback`): "generous" (the
    # fractions below as defaulted), "sparse" (5% thumbs, 5% comparisons, 1% corrections) or
    # "targeted" (5% thumbs, 1% corrections, comparisons only when serving offers one). A profile
    # sets only the fractions the user did not set (looprl.toml / LOOPRL_DEMO__* win).
    feedback: Literal["generous", "sparse", "targeted"] = "generous"
    thumbs_fraction: float = Field(0.25, ge=0, le=1)
    preference_fraction: float = Field(1.0, ge=0, le=1)
    # Share of answers the user edits into one they like better (a correction event): they write
    # correction_candidates answers on the question's topic and send the one they like most, if
    # they like it more than the served answer.
    correction_fraction: float = Field(0.0, ge=0, le=1)
    # Candidate answers a correcting user writes before keeping their favourite.
    correction_candidates: int = Field(8, ge=1)
    # Send `looprl_compare: "auto"` with product requests and answer the comparisons serving
    # offers (`looprl_comparison`): the targeted profile turns it on.
    request_comparisons: bool = False
    # Comparisons per hour serving may ask for in the targeted profile (serving.compare_per_hour);
    # None: as many as the sparse profile's comparisons would be at max_requests_per_second.
    comparisons_per_hour: float | None = Field(None, gt=0)
    collector_fraction: float = Field(0.3, ge=0, le=1)  # feedback sent by HTTP instead of the Kafka SDK
    max_requests_per_second: float = Field(8.0, gt=0)
    max_tokens: int = Field(16, ge=1)
    target_improvement: float = Field(0.25, ge=0, le=1)
    # Eval answers a version needs before the report calls its rate the served model's (about +-9
    # points at 95%); one promoted in the last minute has a few dozen: the report then measures
    # the version promoted before it, and says so.
    report_min_eval: int = Field(100, ge=1)
    # The simulated users' random draws (eval prompts, coin flips, feedback); None: drawn afresh
    # each time the simulator starts, and shown in the report (set it to replay a run's draws).
    seed: int | None = None
    # Failure watch (ops/health.py): the demo stops with a non-zero exit, printing the first error
    # line and the log path, when serving answers more than failure_rate of its requests with an
    # error for failure_seconds, or a stage restarts more than max_restarts times within
    # restart_window_seconds.
    failure_rate: float = Field(0.2, ge=0, lt=1)
    failure_seconds: float = Field(60.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    restart_window_seconds: float = Field(300.0, gt=0)
    # A stage that died is restarted after this delay, doubled at each restart (up to 20 s) and
    # reset once it has run for 30 s: a crash loop backs off instead of spinning.
    restart_backoff_seconds: float = Field(1.0, gt=0)


class LooprlConfig(Section):
    workspace: Path = Path("looprl-workspace")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Log lines on stderr: "auto" is human-readable on a terminal and JSON otherwise; "json" / "human" force one.
    log_format: Literal["auto", "human", "json"] = "auto"
    # Interface every process's /metrics server binds: loopback on a laptop; "0.0.0.0" in
    # containers so Prometheus can scrape them (docker-compose sets LOOPRL_METRICS_HOST).
    metrics_host: str = "127.0.0.1"
    kafka: KafkaConfig = KafkaConfig()
    ingest: IngestConfig = IngestConfig()
    model: ModelConfig = ModelConfig()
    kernels: KernelsConfig = KernelsConfig()
    reward: RewardConfig = RewardConfig()
    policy: PolicyConfig = PolicyConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    gateway: GatewayConfig = GatewayConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    canary: CanaryConfig = CanaryConfig()
    metrics: MetricsConfig = MetricsConfig()
    demo: DemoConfig = DemoConfig()

    # ---- derived paths (one place for the workspace layout; see README) ----
    @property
    def base_path(self) -> Path:
        return self.model.base_path or self.workspace / "base"

    @property
    def events_dir(self) -> Path:
        return self.workspace / "events"

    @property
    def registry_dir(self) -> Path:
        return self.workspace / "registry"

    @property
    def state_dir(self) -> Path:
        return self.workspace / "state"

    @property
    def ray_dir(self) -> Path:
        return self.workspace / "ray"

    @property
    def reports_dir(self) -> Path:
        return self.workspace / "reports"

    def redacted(self) -> dict[str, Any]:
        """The whole effective config as plain data, secrets masked (`looprl config`, DEBUG logs)."""
        return self.model_dump(mode="json")

    def summary(self) -> dict[str, Any]:
        """What tells one deployment from another, for the one start-up log line of every process."""
        return {
            "workspace": str(self.workspace),
            "base_model": str(self.base_path),
            "kafka": self.kafka.bootstrap_servers or "embedded",
            "ports": {"serving": self.serving.port, "collector": self.ingest.collector_port,
                      "ingest_metrics": self.ingest.metrics_port, "reward_metrics": self.reward.metrics_port,
                      "policy_metrics": self.policy.metrics_port,
                      "controller_metrics": self.serving.controller_metrics_port,
                      "gateway": self.gateway.port, "gateway_metrics": self.gateway.metrics_port,
                      "scheduler_metrics": self.scheduler.metrics_port},
        }


def _set_nested(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def _env_overrides(environ: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NON_CONFIG_ENV:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split(ENV_NESTED)]
        value: Any = raw
        # Lists are given as JSON in the environment (e.g. '["http://a:8000"]').
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"environment variable {name}: not valid JSON: {e}") from e
        _set_nested(tree, keys, value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_error(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"config key '{key}': {msg} (from {origin})")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> LooprlConfig:
    """Defaults < TOML file < LOOPRL_* environment < keyword overrides (used by tests)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is None:
        path = env.get("LOOPRL_CONFIG")
        if path is None and Path("looprl.toml").is_file():
            path = "looprl.toml"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: {e}") from e
        origin = str(p)
    env_tree = _env_overrides(env)
    if env_tree:
        origin += " + environment"
    data = _merge(data, env_tree)
    data = _merge(data, overrides)
    try:
        return LooprlConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from None
