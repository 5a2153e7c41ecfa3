"""The demo report: numbers from the simulator log, registry and decisions; plots are real PNGs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from looprl.ops.core.config import load_config
from looprl.ops.report import summarize, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_interactions(rates: dict[str, float], n: int = 200, t0: float = 1_000.0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i, (version, p) in enumerate(rates.items()):
        for j in range(n):
            model = "base" if version == "base" else "policy"
            out.append({"ts": t0 + i * 100 + j * 0.5, "kind": "eval", "user": f"eval-{j}", "model": model,
                        "version": version, "p": p, "up": rng.random() < p, "prompt": "how is the park",
                        "completion": "x"})
            out.append({"ts": t0 + i * 100 + j * 0.5, "kind": "train", "user": f"user-{j % 5}", "model": "policy",
                        "version": version, "p": p, "up": rng.random() < p})
    return out


def test_summary_measures_the_served_version_against_the_base():
    rows = fake_interactions({"base": 0.2, "v1": 0.35, "v3": 0.6})
    s = summarize(rows, promoted="v3")
    assert s["served_version"] == "v3"
    assert s["improvement_p"] == pytest.approx(0.4)
    exp = sum(r["up"] for r in rows if r["kind"] == "eval" and r["version"] == "v3") / 200 - \
        sum(r["up"] for r in rows if r["kind"] == "eval" and r["version"] == "base") / 200
    assert s["improvement_rate"] == pytest.approx(exp)
    assert list(s["eval"]) == ["base", "v1", "v3"] and s["eval"]["v1"]["n"] == 200


def test_the_eval_answers_length_is_shown_per_version(tmp_path):
    """A policy that learnt to please a reward model's spurious length feature shows as answers
    that shrank or grew against the base's (ops/README.md): the report gives each version's mean."""
    rows = fake_interactions({"base": 0.2, "v1": 0.45}, n=20)
    for i, r in enumerate(r for r in rows if r["kind"] == "eval" and r["version"] == "v1"):
        r["completion"] = " the park is great." if i % 2 else " the park is great. we love the park."
    s = summarize(rows, promoted="v1", min_eval=10)
    assert s["eval"]["base"]["answer_words"] == 1 and s["eval"]["v1"]["answer_words"] == pytest.approx(6.0)
    assert "answer_words" not in s["train"]["v1"]  # the simulator keeps no text of train answers
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    (cfg.state_dir / "simulator").mkdir(parents=True)
    (cfg.state_dir / "simulator" / "interactions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gate = cfg.state_dir / "gate"
    gate.mkdir()
    (gate / "decisions.jsonl").write_text(json.dumps({"version": "v1", "decision": "gated", "numbers": {
        "win_rate": 0.7, "train_forms_answer_tokens": 4.5, "train_forms_incumbent_answer_tokens": 9.25}}))
    out, _ = write_report(cfg, tmp_path / "report", min_eval=10)
    md = (out / "report.md").read_text()
    assert "| version | n | rate | expected | answer words |" in md
    assert "| 45.0% | 6.0 |" in md and "| 20.0% | 1.0 |" in md
    assert "| version | decision | win rate | train forms answer tokens | train forms incumbent answer tokens |" in md
    assert "| v1 | gated | 0.700 | 4.500 | 9.250 |" in md


def test_summary_falls_back_when_the_promoted_version_has_few_eval_samples():
    rows = fake_interactions({"base": 0.2, "v2": 0.5}) + fake_interactions({"v4": 0.9}, n=5, t0=5000)
    s = summarize(rows, promoted="v4", min_eval=20)
    assert s["served_version"] == "v2"
    # promoted late, after a canary that was rolled back: the version users had before it, not the
    # newest with enough answers
    rows = (fake_interactions({"base": 0.2, "v2": 0.5, "v3": 0.3}, n=150)
            + fake_interactions({"v5": 0.9}, n=60, t0=5000))
    s = summarize(rows, promoted="v5", promotions=["v1", "v2", "v5"])
    assert s["served_version"] == "v2" and s["min_eval"] == 100
    assert summarize(rows, promoted="v5", promotions=["v1", "v2", "v5"], min_eval=60)["served_version"] == "v5"
    assert summarize(rows, promoted="v5", promotions=["v5"])["served_version"] is None
    s = summarize(fake_interactions({"v2": 0.5}), promoted="v2")
    assert s["improvement_rate"] is None  # no base measurement: no claim


def publish(reg, tmp_path, curve, **metrics):
    src = tmp_path / f"src{random.random()}"
    src.mkdir()
    save_file({"w": torch.zeros(1)}, str(src / "adapter_model.safetensors"))
    return reg.publish("policy", src, base_checksum="b",
                       metrics={"curve": curve, "kl_last": curve[-1]["kl"], **metrics},
                       extra={"reward_version": "v1"}).version


def test_write_report(tmp_path):
    from looprl.ops.canary import CanaryManager
    from looprl.storage.registry import Registry

    cfg = load_config(environ={}, workspace=tmp_path / "ws", demo={"target_improvement": 0.25})
    sim = cfg.state_dir / "simulator"
    sim.mkdir(parents=True)
    rows = fake_interactions({"base": 0.2, "v1": 0.6})
    (sim / "interactions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"torn")
    (cfg.state_dir / "reward_history.jsonl").write_text("\n".join(json.dumps(
        {"update": i, "version": f"v{i}", "decision": "published", "new_events": 50,
         "prequential": {"pair_accuracy": 0.5 + 0.05 * i, "thumbs_auc": 0.6}, "candidate": {"score": 0.7}})
        for i in (1, 2, 3)) + "\n" + json.dumps(
        {"update": 4, "version": None, "decision": "rejected", "new_events": 40, "prequential": {},
         "candidate": {"score": 0.72}, "current": {"score": 0.781}, "current_version": "v3"}) + "\n")
    reg = Registry(cfg.registry_dir)
    v1 = publish(reg, tmp_path, [{"kl": 0.1 * i, "reward_mean": 0.2} for i in range(5)])
    reg.set_status("policy", v1, "gated", "test")
    mgr = CanaryManager(cfg, counts=lambda versions, since: {})
    mgr.step()
    mgr.manual_promote(v1, by="test")
    # a run the KL stop ended: its row says where, and which checkpoint it published
    publish(reg, tmp_path, [{"kl": 2.0 * i, "reward_mean": 0.3} for i in range(8)], kl_last=5.0,
            kl_stop={"step": 8, "trailing_kl": 12.4, "published_step": 5})

    out, summary = write_report(cfg, tmp_path / "report")
    for name in ("thumbs_up.png", "reward_accuracy.png", "kl.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["served_version"] == "v1" and saved["promoted"] == "v1"
    assert saved["target_met"] == (saved["improvement_rate"] >= 0.25)
    assert saved["improvement_rate"] > 0.25  # 0.6 vs 0.2 with n=200
    assert saved["reward_updates"] == 4 and saved["policy_versions"] == 2 and saved["decisions"] == 2
    md = (out / "report.md").read_text()
    assert "| v1 | promoted | v1 | 5 | - | 0.400 |" in md
    assert "| v2 | candidate | v1 | 8 | after step 8, published step 5 | 5.000 |" in md
    assert "Improvement: 0." in md and "manual_promote" in md and "| 3 | 50 | 0.650 |" in md
    assert "was promoted last" not in md
    # too few answers for the report's bar, and nothing promoted before it: no claim, and why
    out, summary = write_report(cfg, tmp_path / "strict", min_eval=300)
    assert summary["served_version"] is None and summary["improvement_rate"] is None
    assert ("v1 was promoted last, with 200 eval answers, fewer than the 300 a served version's rate needs here; "
            "no promoted version has that many.") in (out / "report.md").read_text()
    # A rejection is explained by the published version's score on the same held-out set.
    assert "| 4 | 40 | - | - | 0.720 | 0.781 (v3) | rejected | - |" in md
    assert "![thumbs-up rate](thumbs_up.png)" in md


def test_report_shows_the_labels_spent_and_the_lift_per_1000_labels(tmp_path):
    from looprl.ops.report import label_counts

    cfg = load_config(environ={}, workspace=tmp_path / "ws", demo={"feedback": "sparse"})
    sim = cfg.state_dir / "simulator"
    sim.mkdir(parents=True)
    rows = fake_interactions({"base": 0.2, "v1": 0.6})
    labels = [{"thumbs": 1}, {}, {"preference": 1, "correction": 1}, {"thumbs": 1, "preference": 1}]
    train = [r for r in rows if r["kind"] == "train"]
    for i, r in enumerate(train):
        r["labels"] = labels[i % 4]  # 100 each of the four: 200 thumbs, 200 comparisons, 100 corrections
    (sim / "interactions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the status counts this simulator process only (a restart starts it again): the rows win
    (sim / "status.json").write_text(json.dumps({"feedback_sent": {"thumbs": 3}, "seed": 123457, "feedback": {
        "profile": "sparse", "thumbs_fraction": 0.05, "preference_fraction": 0.05, "correction_fraction": 0.01}}))
    (cfg.state_dir / "canary").mkdir()  # v1 was promoted (what the report measures)
    (cfg.state_dir / "canary" / "decisions.jsonl").write_text(json.dumps(
        {"at": 1.0, "action": "promote", "version": "v1", "control": "base", "reason": "test", "numbers": {
            "candidate_ups": 5, "candidate_n": 20, "control_ups": 4, "control_n": 15, "pair_wins": 22, "pair_n": 27}})
        + "\n")
    gate = cfg.state_dir / "gate"
    gate.mkdir()
    (gate / "decisions.jsonl").write_text(json.dumps({"version": "v1", "decision": "gated", "reasons": [], "numbers": {
        "win_rate": 0.7, "train_forms_win_rate": 0.8, "heldout_forms_win_rate": 0.61,
        "heldout_forms_degenerate_share": 0.05, "incumbent": "base"}}) + "\n" + json.dumps(
        {"version": "v2", "decision": "rejected", "numbers": {"win_rate": 0.4}}) + "\n{\"torn")

    out, summary = write_report(cfg, tmp_path / "report")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["labels"] == {"thumbs": 200, "preference": 200, "correction": 100, "total": 500}
    assert saved["lift_per_1000_labels"] == pytest.approx(saved["improvement_rate"] / 500 * 1000)
    assert saved["expected_lift_per_1000_labels"] == pytest.approx(0.4 / 500 * 1000)
    assert saved["feedback"]["profile"] == "sparse"
    assert [g["numbers"].get("heldout_forms_win_rate") for g in saved["gate"]] == [0.61, None]
    md = (out / "report.md").read_text()
    assert "Feedback profile: **sparse** (5.0% thumbs, 5.0% comparisons, 1.0% corrections)" in md
    assert saved["simulator_seed"] == 123457 and "Simulated users' seed: 123457 (`demo.seed=123457`" in md
    assert f"| 500 | 200 | 200 | 100 | {saved['improvement_rate']:.3f} | {saved['lift_per_1000_labels']:.3f} |" in md
    assert ("| version | decision | win rate | train forms win rate | heldout forms win rate | "
            "heldout forms degenerate share |") in md
    assert "| v1 | gated | 0.700 | 0.800 | 0.610 | 0.050 |" in md and "| v2 | rejected | 0.400 | - | - | - |" in md
    assert "| promote | v1 | base | thumbs 5/20 vs 4/15; pairs won 22/27 | test |" in md  # the canary's votes
    # a log from before interactions recorded their labels: the status's counts
    old = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    assert label_counts(old, {"feedback_sent": {"thumbs": 3, "preference": 9}}) == {
        "thumbs": 3, "preference": 9, "correction": 0, "total": 12}
    assert label_counts(old, {})["total"] == 0
