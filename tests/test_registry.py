"""The model registry: atomic versions, pointers, status history, and refusal of bad contents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from looprl.storage.registry import (ChecksumError, Manifest, Registry, RegistryError, atomic_write_text,
                                     checksum_dir, sha256_file)

BASE = "b" * 64


def make_src(path, weights: bytes = b"w" * 32, **extra_files) -> object:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    for name, text in extra_files.items():
        (path / name).write_text(text)
    return path


def test_publish_versions_and_latest(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.versions("policy") == [] and reg.latest("policy") is None
    m1 = reg.publish("policy", make_src(tmp_path / "a", b"one"), base_checksum=BASE, metrics={"x": 1},
                     watermark={"events": 10})
    m2 = reg.publish("policy", make_src(tmp_path / "b", b"two"), base_checksum=BASE, parent="v1")
    assert (m1.version, m2.version) == ("v1", "v2") and m2.parent == "v1"
    assert reg.versions("policy") == ["v1", "v2"] and reg.latest("policy").version == "v2"
    m, d = reg.open("policy", "v1", base_checksum=BASE)
    assert (d / "adapter_model.safetensors").read_bytes() == b"one"
    assert m.metrics == {"x": 1} and m.watermark == {"events": 10}
    assert m.files["adapter_model.safetensors"] == sha256_file(d / "adapter_model.safetensors")
    assert [h.status for h in m.history] == ["candidate"]
    # The source directory is copied, not moved.
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    # set_latest=False publishes without moving the pointer.
    reg.publish("policy", make_src(tmp_path / "c"), base_checksum=BASE, set_latest=False)
    assert reg.pointer("policy") == "v2" and reg.versions("policy")[-1] == "v3"
    # Versions sort numerically, not lexically (v10 after v9).
    for i in range(7):
        reg.publish("policy", make_src(tmp_path / f"n{i}"), base_checksum=BASE)
    assert reg.versions("policy")[-2:] == ["v9", "v10"] and reg.pointer("policy") == "v10"


def test_pointers_and_status_history(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("policy", make_src(tmp_path / "a"), base_checksum=BASE)
    reg.publish("policy", make_src(tmp_path / "b"), base_checksum=BASE)
    reg.set_pointer("policy", "promoted", "v1")
    reg.set_pointer("policy", "canary", "v2")
    assert (reg.pointer("policy", "promoted"), reg.pointer("policy", "canary")) == ("v1", "v2")
    reg.set_pointer("policy", "canary", None)
    assert reg.pointer("policy", "canary") is None
    with pytest.raises(RegistryError, match="v7 does not exist"):
        reg.set_pointer("policy", "promoted", "v7")
    reg.set_status("policy", "v2", "gated", "win rate 0.6", {"win_rate": 0.6})
    reg.set_status("policy", "v2", "promoted", "canary won")
    m = reg.verify("policy", "v2")  # rewriting the manifest keeps the files verifiable
    assert m.status == "promoted" and [h.status for h in m.history] == ["candidate", "gated", "promoted"]
    assert m.history[1].numbers == {"win_rate": 0.6}


def test_refuses_pickles_unknown_files_and_missing_weights(tmp_path):
    reg = Registry(tmp_path / "reg")
    for bad in ("pytorch_model.bin", "model.pt", "x.pkl", "state.ckpt"):
        src = make_src(tmp_path / bad.replace(".", "_"))
        (src / bad).write_bytes(b"pickle")
        with pytest.raises(RegistryError, match=f"{bad}: pickle-based formats are refused"):
            reg.publish("reward", src, base_checksum=BASE)
    src = make_src(tmp_path / "exe")
    (src / "run.sh").write_text("echo")
    with pytest.raises(RegistryError, match=r"run.sh: file type .sh is not allowed"):
        reg.publish("reward", src, base_checksum=BASE)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no .safetensors weights"):
        reg.publish("reward", empty, base_checksum=BASE)
    assert reg.versions("reward") == [] and not list((tmp_path / "reg" / "reward").glob(".tmp-*"))


def test_names_are_validated(tmp_path):
    reg = Registry(tmp_path)
    for kind in ("../evil", "Policy", "", "a/b"):
        with pytest.raises(RegistryError, match="invalid registry kind"):
            reg.versions(kind)
    for version in ("1", "v0", "v01", "latest", "v1/../v2"):
        with pytest.raises(RegistryError, match="invalid version"):
            reg.manifest("policy", version)
    with pytest.raises(RegistryError, match="reward/v3 does not exist"):
        reg.open("reward", "v3")


def test_corruption_and_base_mismatch_are_refused_by_name(tmp_path):
    reg = Registry(tmp_path)
    reg.publish("policy", make_src(tmp_path / "a"), base_checksum=BASE)
    d = reg.version_dir("policy", "v1")
    (d / "adapter_config.json").write_text(json.dumps({"r": 64}))
    with pytest.raises(ChecksumError, match="policy/v1: checksum mismatch for adapter_config.json"):
        reg.open("policy", "v1")
    reg.publish("policy", make_src(tmp_path / "b"), base_checksum=BASE)
    (reg.version_dir("policy", "v2") / "adapter_model.safetensors").unlink()
    with pytest.raises(ChecksumError, match="file adapter_model.safetensors is missing"):
        reg.open("policy", "v2")
    reg.publish("policy", make_src(tmp_path / "c"), base_checksum=BASE)
    with pytest.raises(RegistryError, match="trained on base bbbbbbbbbbbb, but the configured base is cccccccccccc"):
        reg.open("policy", "v3", base_checksum="c" * 64)
    (reg.version_dir("policy", "v3") / "manifest.json").write_text("{not json")
    with pytest.raises(RegistryError, match="policy/v3: unreadable manifest"):
        reg.manifest("policy", "v3")


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path):
    reg = Registry(tmp_path)
    kdir = tmp_path / "reward"
    kdir.mkdir()
    leftover = kdir / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "reward_model.safetensors").write_bytes(b"half")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    reg.publish("reward", make_src(tmp_path / "src"), base_checksum=BASE)
    assert not leftover.exists()  # removed by the next publish
    assert reg.versions("reward") == ["v1"]


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    root = tmp_path / "reg"
    src = make_src(tmp_path / "src")
    code = textwrap.dedent(f"""
        from looprl.storage.registry import Registry
        reg = Registry({str(root)!r})
        print(" ".join(reg.publish("policy", {str(src)!r}, base_checksum="{BASE}").version for _ in range(5)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    got = sorted(v for o in outs for v in o)
    assert len(got) == 15 and len(set(got)) == 15
    reg = Registry(root)
    assert reg.versions("policy") == [f"v{i}" for i in range(1, 16)]
    for v in reg.versions("policy"):
        reg.verify("policy", v)


def test_checksum_dir_and_atomic_write(tmp_path):
    d = make_src(tmp_path / "m", notes="ignored text file")
    c1 = checksum_dir(d)
    (d / "notes").write_text("changed")  # not weights or config: not part of the identity
    (d / ".hidden.json").write_text("{}")
    assert checksum_dir(d) == c1
    (d / "adapter_config.json").write_text("{}")
    assert checksum_dir(d) != c1
    atomic_write_text(tmp_path / "sub" / "p.txt", "v3\n")
    assert (tmp_path / "sub" / "p.txt").read_text() == "v3\n"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.txt"]  # no temp file left


def test_manifest_round_trip(tmp_path):
    reg = Registry(tmp_path)
    m = reg.publish("reward", make_src(tmp_path / "a"), base_checksum=BASE, extra={"update": 3})
    again = Manifest.model_validate_json((reg.version_dir("reward", "v1") / "manifest.json").read_text())
    assert again == m and again.number == 1 and again.extra == {"update": 3}


def test_a_slow_publishers_temp_survives_a_concurrent_publish(tmp_path, monkeypatch):
    """The temp cleanup once went by age (60 s): a publisher still copying a large adapter lost
    its directory to another publisher's cleanup. Now a live publisher's temp is never removed."""
    reg = Registry(tmp_path / "reg")
    copying, go_on = threading.Event(), threading.Event()
    real_copy = shutil.copyfile
    slow_thread = []

    def copyfile(src, dst, *a, **k):
        if threading.current_thread() in slow_thread:
            copying.set()
            assert go_on.wait(30)
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    result: dict = {}
    slow = threading.Thread(target=lambda: result.update(m=reg.publish("policy", make_src(tmp_path / "slow", b"slow"),
                                                                       base_checksum=BASE)))
    slow_thread.append(slow)
    slow.start()
    assert copying.wait(30)
    (tmp,) = [p for p in (tmp_path / "reg" / "policy").glob(".tmp-*") if p.is_dir()]
    old = time.time() - 3600  # looks abandoned by its age
    os.utime(tmp, (old, old))
    fast = reg.publish("policy", make_src(tmp_path / "fast", b"fast"), base_checksum=BASE)
    assert tmp.is_dir()  # the concurrent publish (and its cleanup) left it alone
    go_on.set()
    slow.join(30)
    assert fast.version == "v1" and result["m"].version == "v2"
    for v in ("v1", "v2"):
        reg.verify("policy", v)
    assert [p.name for p in (tmp_path / "reg" / "policy").iterdir() if p.name.startswith(".tmp-")] == []


def test_a_dead_publishers_temp_is_removed_at_once(tmp_path):
    kdir = tmp_path / "reg" / "policy"
    kdir.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import os, signal, pathlib
        from looprl.storage.temps import claim
        tmp = pathlib.Path({str(kdir / ".tmp-child")!r})
        claim(tmp)
        tmp.mkdir()
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-publish, holding its temp's lock
    """)
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    assert (kdir / ".tmp-child").is_dir() and (kdir / ".tmp-child.lock").is_file()
    Registry(tmp_path / "reg").publish("policy", make_src(tmp_path / "src"), base_checksum=BASE)
    assert sorted(p.name for p in kdir.iterdir()) == [".lock", "latest", "v1"]
