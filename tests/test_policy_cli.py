"""`looprl policy train` and `looprl policy gate` through the real command line parser."""

import json

import pytest

from looprl.ops.cli import build_parser, main
from looprl.storage.registry import Registry


@pytest.fixture
def cli_env(monkeypatch, tmp_path, policy_base):
    for k, v in {
        "LOOPRL_MODEL__BASE_PATH": str(policy_base),
        "LOOPRL_POLICY__ROLLOUT_BATCH_SIZE": "8",
        "LOOPRL_POLICY__MINIBATCH_SIZE": "4",
        "LOOPRL_POLICY__MAX_NEW_TOKENS": "6",
        "LOOPRL_POLICY__RECENT_PROMPTS": "0",
        "LOOPRL_POLICY__METRICS_PORT": "0",
        "LOOPRL_GATE__HELDOUT_PROMPTS": "8",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "ws"


def test_train_policy_then_gate(cli_env, capsys):
    ws = str(cli_env)
    assert main(["--workspace", ws, "policy", "train", "--scorer", "cheerful", "--no-ray", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == "v1" and out["run_id"]
    reg = Registry(cli_env / "registry")
    assert reg.manifest("policy", "v1").metrics["steps"] == 2

    rc = main(["--workspace", ws, "policy", "gate", "v1", "--scorer", "cheerful"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["decision"] in ("gated", "rejected") and rc == (0 if res["decision"] == "gated" else 1)
    assert reg.manifest("policy", "v1").status == res["decision"]
    assert {"win_rate", "kl_to_base"} <= set(res["numbers"])

    # a second `policy train` with nothing unfinished starts a new run (v2), never re-publishes v1
    assert main(["--workspace", ws, "policy", "train", "--scorer", "cheerful", "--no-ray", "--steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == "v2"


def test_gate_unknown_version_is_a_clear_error(cli_env, capsys):
    assert main(["--workspace", str(cli_env), "policy", "gate", "v7", "--scorer", "cheerful"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("looprl policy gate: ") and "v7" in last


def test_train_takes_its_options():
    args = build_parser().parse_args(["policy", "train", "--steps", "3", "--no-ray", "--gate"])
    assert (args.command, args.action) == ("policy", "train")
    assert args.steps == 3 and args.no_ray and args.gate and callable(args.func)


def test_train_without_a_reward_model_says_so(cli_env, capsys):
    assert main(["--workspace", str(cli_env), "policy", "train", "--no-ray", "--steps", "1"]) == 2
    assert "no reward model published" in capsys.readouterr().err
