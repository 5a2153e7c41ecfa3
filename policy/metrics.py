"""Prometheus metrics of the policy stage (``looprl_policy_<what>_<unit>``, bounded labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("looprl_policy_steps_total", "PPO steps completed")
TOKENS = Counter("looprl_policy_sampled_tokens_total", "completion tokens sampled by rollout workers")
REWARD = Gauge("looprl_policy_reward_mean_score", "mean reward-model score of the last step's completions")
KL = Gauge("looprl_policy_kl_nats", "mean per-completion KL(policy || base) of the last step")
KL_COEF = Gauge("looprl_policy_kl_coef_ratio", "adaptive KL penalty coefficient")
CLIP = Gauge("looprl_policy_clip_fraction_ratio", "share of tokens whose PPO ratio was clipped")
ENTROPY = Gauge("looprl_policy_entropy_nats", "mean per-token policy entropy")
VALUE_LOSS = Gauge("looprl_policy_value_loss_mse", "value-head loss")
EXPLAINED_VAR = Gauge("looprl_policy_explained_variance_ratio", "explained variance of returns by the value head")
TOKENS_PER_S = Gauge("looprl_policy_tokens_per_second", "completion tokens per second of a full PPO step")
EXPERT_LOAD = Gauge("looprl_policy_expert_load_ratio", "share of sampled-token routes per expert", ["expert"])
OFFPOLICY = Gauge("looprl_policy_offpolicy_samples", "labelled served answers in the last step's batch")
DEGENERATE = Gauge("looprl_policy_degenerate_ratio",
                   "share of the last step's rollouts the gate would call degenerate (empty or looping)")
IS_WEIGHT = Gauge("looprl_policy_offpolicy_is_weight_ratio", "mean truncated importance weight of the last step's served tokens")
PHASE = Histogram("looprl_policy_phase_seconds", "time per PPO step phase", ["phase"],
                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
GATE = Counter("looprl_policy_gate_decisions_total", "offline gate decisions", ["decision"])
RUN_FAILURES = Counter("looprl_policy_run_failures_total", "PPO jobs that failed", ["reason"])

_MAX_EXPERT_LABELS = 64  # bound the label set even for a large MoE

# A job's "last step" values are unknown until it has taken one: NaN, not 0, so a run that fails
# before its first step pushes no made-up KL or reward (looprl.ops.core.metrics.push_metrics).
for _gauge in (REWARD, KL, KL_COEF, CLIP, ENTROPY, VALUE_LOSS, EXPLAINED_VAR, TOKENS_PER_S, OFFPOLICY, IS_WEIGHT,
               DEGENERATE):
    _gauge.set(float("nan"))


def record_step(stats: dict) -> None:
    STEPS.inc()
    TOKENS.inc(stats.get("tokens", 0))
    REWARD.set(stats["reward_mean"])
    KL.set(stats["kl"])
    KL_COEF.set(stats["kl_coef"])
    CLIP.set(stats["clip_fraction"])
    ENTROPY.set(stats["entropy"])
    VALUE_LOSS.set(stats["value_loss"])
    EXPLAINED_VAR.set(stats["explained_variance"])
    TOKENS_PER_S.set(stats.get("tokens_per_s", 0.0))
    OFFPOLICY.set(stats.get("offpolicy_samples", 0))
    if stats.get("degenerate_fraction") is not None:
        DEGENERATE.set(stats["degenerate_fraction"])
    if stats.get("offpolicy_is_weight_mean") is not None:  # no served answers this step: keep it unknown
        IS_WEIGHT.set(stats["offpolicy_is_weight_mean"])
    for i, share in enumerate(stats.get("expert_load", [])[:_MAX_EXPERT_LABELS]):
        EXPERT_LOAD.labels(expert=str(i)).set(share)
    for phase in ("rollout", "score", "learn"):
        if f"{phase}_s" in stats:
            PHASE.labels(phase=phase).observe(stats[f"{phase}_s"])
