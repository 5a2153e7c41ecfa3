"""A base's checksum is computed from each file's digest, and a digest is reused only while its
file is unchanged (looprl.storage.digests): a changed file is always hashed again."""

from __future__ import annotations

import json
import os
import time

import pytest

import looprl.storage.digests as digests
from looprl.storage.registry import checksum_dir

HOUR_NS = 3600 * 10**9


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed (not taken from a cache), in order; this process's memory starts empty.
    The racy window is off (the test files' ctime is always fresh) except where a test sets it."""
    monkeypatch.setattr(digests, "RACY_SECONDS", 0.0)
    calls: list[str] = []
    real = digests.sha256_file

    def spy(path, *a, **kw):
        calls.append(os.path.basename(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(digests, "sha256_file", spy)
    monkeypatch.setattr(digests, "_MEMO", {})
    return calls


def _checkpoint(d, old: bool = True):
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "notes.md").write_text("not part of the identity")
    if old:  # last written an hour ago: past the racy window
        for p in d.iterdir():
            past = time.time_ns() - HOUR_NS
            os.utime(p, ns=(past, past))
    return d


def test_unchanged_files_are_hashed_once_across_processes(tmp_path, hashed, monkeypatch):
    ck, cache = _checkpoint(tmp_path / "base"), tmp_path / "cache.json"
    first = checksum_dir(ck, cache)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert checksum_dir(ck, cache) == first and len(hashed) == 2  # this process remembers
    monkeypatch.setattr(digests, "_MEMO", {})  # another process: the JSON cache
    assert checksum_dir(ck, cache) == first and len(hashed) == 2
    entries = json.loads(cache.read_text())
    assert set(entries) == {os.path.realpath(ck / "config.json"), os.path.realpath(ck / "model.safetensors")}


def test_a_file_changed_in_place_with_the_same_size_is_hashed_again(tmp_path, hashed):
    ck, cache = _checkpoint(tmp_path / "base"), tmp_path / "cache.json"
    first = checksum_dir(ck, cache)
    weights = ck / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    with open(weights, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # even with an older mtime
    assert (weights.stat().st_size, weights.stat().st_ino) == (st.st_size, st.st_ino)
    assert checksum_dir(ck, cache) != first
    assert hashed[-1] == "model.safetensors"


def test_a_rewritten_file_is_hashed_again_and_the_others_are_not(tmp_path, hashed):
    ck, cache = _checkpoint(tmp_path / "base"), tmp_path / "cache.json"
    first = checksum_dir(ck, cache)
    (ck / "config.json").write_text('{"model_type": "mixtral"}')
    assert checksum_dir(ck, cache) != first
    assert hashed.count("config.json") == 2 and hashed.count("model.safetensors") == 1


def test_files_changed_within_the_racy_window_are_never_cached(tmp_path, hashed, monkeypatch):
    monkeypatch.setattr(digests, "RACY_SECONDS", 2.0)
    ck, cache = _checkpoint(tmp_path / "base"), tmp_path / "cache.json"  # ctime: just now
    assert checksum_dir(ck, cache) == checksum_dir(ck, cache)
    assert sorted(hashed) == ["config.json", "config.json", "model.safetensors", "model.safetensors"]
    assert not cache.exists()


def test_a_corrupt_or_unwritable_cache_only_costs_a_rehash(tmp_path, hashed, monkeypatch):
    ck = _checkpoint(tmp_path / "base")
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    expected = checksum_dir(ck, cache)
    monkeypatch.setattr(digests, "_MEMO", {})
    assert checksum_dir(ck, tmp_path / "no-such-dir" / "file-is-a-dir" / "c.json") == expected
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setattr(digests, "_MEMO", {})
    assert checksum_dir(ck, blocked / "c.json") == expected
    assert json.loads(cache.read_text())  # rewritten whole


def test_default_cache_follows_xdg_cache_home(tmp_path, monkeypatch, hashed):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ck = _checkpoint(tmp_path / "base")
    checksum_dir(ck)
    assert (tmp_path / "xdg" / "looprl" / "file-digests.json").is_file()
