"""Feedback profiles of the simulated users (`looprl demo --feedback generous|sparse|targeted`).

A profile says how much the users tell the loop. ``generous`` is the schema's defaults (a thumb on
a quarter of the answers, a comparison on every request): the demo as it always ran. ``sparse``
is what a product really gets: a thumb on 5% of answers, a comparison on 5%, an edited answer on
1%. ``targeted`` keeps sparse's thumbs and corrections, but its comparisons come only when the
serving tier offers one (``looprl_compare: "auto"``: where the reward model is least sure),
within a budget per hour sized to sparse's comparisons at the demo's request rate.

A profile sets only the ``demo.*`` fields the user did not set: looprl.toml, ``LOOPRL_DEMO__*``
and keyword overrides always win (pydantic's ``model_fields_set`` tells which were given).
"""

from __future__ import annotations

from typing import Any

from looprl.ops.core.config import DemoConfig, LooprlConfig

PROFILES: dict[str, dict[str, Any]] = {
    "generous": {},
    "sparse": {"thumbs_fraction": 0.05, "preference_fraction": 0.05, "correction_fraction": 0.01},
    "targeted": {"thumbs_fraction": 0.05, "preference_fraction": 0.0, "correction_fraction": 0.01,
                 "request_comparisons": True},
}


def profile_settings(demo: DemoConfig) -> dict[str, Any]:
    """The ``demo.*`` values ``demo.feedback``'s profile sets: those the user left unset."""
    return {k: v for k, v in PROFILES[demo.feedback].items() if k not in demo.model_fields_set}


def with_feedback(cfg: LooprlConfig, profile: str) -> LooprlConfig:
    """``cfg`` with ``demo.feedback = profile`` (`--feedback`), counted as set by the user."""
    demo = cfg.demo.model_copy()
    demo.feedback = profile  # validated: demo.feedback's choices
    return cfg.model_copy(update={"demo": demo})


def resolve_demo(demo: DemoConfig) -> DemoConfig:
    """``demo`` with its feedback profile applied."""
    return demo.model_copy(update=profile_settings(demo))


def comparisons_per_hour(demo: DemoConfig) -> float:
    """The targeted profile's budget: ``demo.comparisons_per_hour``, else as many comparisons as
    the sparse profile asks for on product requests at ``demo.max_requests_per_second``."""
    if demo.comparisons_per_hour is not None:
        return demo.comparisons_per_hour
    share = PROFILES["sparse"]["preference_fraction"]
    return share * demo.max_requests_per_second * (1.0 - demo.eval_fraction) * 3600.0


def describe(demo: DemoConfig) -> dict[str, Any]:
    """What the simulator ran with (written to its status; the report shows it)."""
    d = resolve_demo(demo)
    out: dict[str, Any] = {"profile": d.feedback, "thumbs_fraction": d.thumbs_fraction,
                           "preference_fraction": d.preference_fraction,
                           "correction_fraction": d.correction_fraction,
                           "request_comparisons": d.request_comparisons}
    if d.request_comparisons:
        out["comparisons_per_hour"] = round(comparisons_per_hour(d), 1)
    return out
