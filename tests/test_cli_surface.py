"""What every user of the `looprl` command meets: `--version`, help on every option, global
options after the command as before it, log lines a person can read at a terminal and JSON
everywhere else. `--help` and `--version` load none of the heavy libraries."""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
from importlib.metadata import version

import pytest

from looprl.ops.cli import DEPRECATED, build_parser, main, parsers, undeprecate

HEAVY = ("torch", "transformers", "peft")
# what the actions with a required positional need to parse
_REQUIRED = {"looprl policy gate": ["v1"], "looprl canary promote": ["v1"], "looprl scheduler trigger": ["policy"],
             "looprl events query": ["SELECT 1"]}


def _leaf_commands() -> list[list[str]]:
    out = []
    for prog, p in parsers(build_parser()):
        if p.get_default("func") is not None:
            out.append(prog.split()[1:])
    return out


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")}


def test_version_and_help_import_none_of_the_heavy_libraries():
    code = ("import sys, json\nfrom looprl.ops.cli import main\n"
            "for argv in (['--version'], ['--help'], ['serving', 'serve', '--help'], ['policy', 'train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert json.loads(lines[-1]) == []
    assert lines[0] == f"looprl {version('looprl')}"
    assert lines[1].startswith(f"torch {version('torch')}, transformers {version('transformers')}, "
                               f"peft {version('peft')}; Python ")


def test_the_installed_entry_point_prints_the_version():
    exe = os.path.join(os.path.dirname(sys.executable), "looprl")
    if not os.path.exists(exe):
        pytest.skip("no looprl script next to this interpreter")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == f"looprl {version('looprl')}", r.stderr


def test_every_option_and_argument_of_every_command_has_help():
    missing = []
    for prog, p in parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                missing += [f"{prog} {c.dest}" for c in a._choices_actions if not c.help]
            elif not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


def test_the_walk_reaches_every_command():
    commands = {" ".join(w) for w in _leaf_commands()}
    assert {"config", "init", "serving serve", "serving control", "ingest collect", "policy train", "canary promote",
            "scheduler runs", "events query", "demo"} <= commands
    assert len(commands) >= 25


@pytest.mark.parametrize("words", _leaf_commands(), ids=" ".join)
def test_global_options_are_accepted_after_every_command(words):
    req = _REQUIRED.get(" ".join(["looprl", *words]), [])
    after = build_parser().parse_args([*words, *req, "--workspace", "W", "--config", "c.toml", "--log-level", "DEBUG",
                                       "--log-format", "human"])
    before = build_parser().parse_args(["--workspace", "W", "--config", "c.toml", "--log-level", "DEBUG",
                                        "--log-format", "human", *words, *req])
    for ns in (after, before):
        assert (ns.workspace, ns.config, ns.log_level, ns.log_format) == ("W", "c.toml", "DEBUG", "human")
    # given before and not after: kept; given in both places: the later one wins
    ns = build_parser().parse_args(["--workspace", "A", *words, *req])
    assert ns.workspace == "A"
    ns = build_parser().parse_args(["--workspace", "A", *words, *req, "--workspace", "B", "--log-level", "warning"])
    assert (ns.workspace, ns.log_level) == ("B", "WARNING")
    assert build_parser().parse_args([*words, *req]).workspace is None


def test_old_spellings_take_global_options_after_the_command_too():
    for old, new in DEPRECATED.items():
        argv, notice = undeprecate([*old, "--workspace", "W"])
        ns = build_parser().parse_args([*argv, *_REQUIRED.get(" ".join(["looprl", *new]), [])])
        assert notice and ns.workspace == "W" and (ns.command, ns.action) == new


def _cli_lines(err: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in err.splitlines() if x.startswith("{")) if r["logger"] == "looprl.ops.cli"]


@pytest.fixture
def restore_logging():
    yield
    from looprl.ops.core.log import setup_logging

    setup_logging("INFO", "json")


def test_a_workspace_given_after_the_command_is_the_one_used(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("LOOPRL_")]:
        monkeypatch.delenv(k)
    ws = str(tmp_path / "after")
    assert main(["--workspace", str(tmp_path / "before"), "events", "stats", "--json", "--workspace", ws,
                 "--log-level", "DEBUG"]) == 0
    lines = _cli_lines(capsys.readouterr().err)
    assert [r["level"] for r in lines] == ["info", "debug"]  # --log-level after the command applied too
    assert lines[0]["workspace"] == ws and lines[1]["config"]["workspace"] == ws


def test_piped_stderr_gets_json_and_log_format_human_overrides(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("LOOPRL_")]:
        monkeypatch.delenv(k)
    ws = str(tmp_path / "ws")
    assert main(["events", "stats", "--json", "--workspace", ws]) == 0  # capsys: not a terminal
    assert len(_cli_lines(capsys.readouterr().err)) == 1
    assert main(["events", "stats", "--json", "--workspace", ws, "--log-format", "human"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if " ops.cli " in x)
    assert not line.startswith("{") and "\x1b[" not in line  # no colour codes off a terminal
    assert f" INFO    ops.cli  config  command=\"events stats\" workspace={ws} " in line
    monkeypatch.setenv("LOOPRL_LOG_FORMAT", "human")  # the config key does the same
    assert main(["events", "stats", "--json", "--workspace", ws]) == 0
    assert " ops.cli  config  " in capsys.readouterr().err


def _run_on_terminal(argv: list[str], cwd) -> str:
    """Run `looprl argv` with stderr on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd, env=_env())
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(60) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_human_lines_unless_json_is_asked_for(tmp_path):
    ws = str(tmp_path / "ws")
    err = _run_on_terminal(["events", "stats", "--json", "--workspace", ws], tmp_path)
    line = next(x for x in err.splitlines() if "ops.cli" in x)
    assert not line.lstrip().startswith("{")
    assert "\x1b[32mINFO   \x1b[0m ops.cli  config  command=\"events stats\"" in line  # coloured level
    err = _run_on_terminal(["events", "stats", "--json", "--workspace", ws, "--log-format", "json"], tmp_path)
    assert _cli_lines(err.replace("\r\n", "\n"))[0]["workspace"] == ws
