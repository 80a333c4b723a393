"""The results index cannot take the cache down: garbled, deleted or stale indexes are rebuilt from
the entry folders, leftovers of killed writers are cleaned, keys cannot address other files, and
entries without checksums are never served."""

import fcntl
import os
import sqlite3
import time

import pytest
import torch
from click.testing import CliRunner

from workbench.cache import TMP_GRACE_S, CacheKeyError, CorruptEntryError, ResultsCache, _is_damage

A, B, C = "a" * 64, "ab" + "0" * 62, "c" * 64


def _put(cache, key, value):
    return cache.put(
        key,
        config={"v": value},
        meta={"analysis": "t", "version": 1, "created": float(value)},
        result={"value": value},
        arrays={"x": torch.full((3,), float(value))},
    )


@pytest.fixture
def cache(tmp_path):
    cache = ResultsCache(tmp_path)
    _put(cache, A, 1)
    _put(cache, B, 2)
    return cache


def _keys(cache):
    return [r["key"] for r in cache.list()]


def _indexed(cache):
    with sqlite3.connect(cache.index_path) as db:
        return sorted(k for (k,) in db.execute("SELECT key FROM entries"))


def test_garbled_index_is_moved_aside_and_rebuilt(cache, caplog):
    garbage = os.urandom(8192)
    cache.index_path.write_bytes(garbage)
    for fresh in (cache, ResultsCache(cache.root)):  # an open instance and a new one
        assert _keys(fresh) == [B, A] and fresh.get(A).result == {"value": 1}
        cache.index_path.write_bytes(garbage)
    assert "was damaged" in caplog.text and "rebuilt from 2 entries" in caplog.text
    aside = sorted(cache.root.glob("index.sqlite.damaged-*"))
    assert len(aside) == 2 and aside[0].read_bytes() == garbage  # kept for inspection, not dropped
    _put(cache, C, 3)  # writing and evicting also repair it
    cache.evict(A)
    assert _keys(cache) == [C, B]


def test_deleted_or_emptied_index_is_rebuilt(cache):
    cache.index_path.unlink()
    assert _keys(cache) == [B, A]
    cache.index_path.write_bytes(b"")  # an empty file is a valid database without the table
    assert _keys(ResultsCache(cache.root)) == [B, A]


def test_entry_published_but_never_indexed_is_indexed_by_a_hit_and_listed(cache):
    with sqlite3.connect(cache.index_path) as db:  # what a kill between publish and index leaves
        db.execute("DELETE FROM entries")
    assert _indexed(cache) == []
    assert cache.get(A).result == {"value": 1}
    assert _indexed(cache) == [A]  # the hit indexed its entry
    assert _keys(cache) == [B, A]  # listing finds the one nobody asked for


def test_rows_whose_folder_is_gone_are_not_listed(cache):
    import shutil

    shutil.rmtree(cache.entry_dir(A))  # removed by hand
    assert _keys(cache) == [B] and cache.get(A) is None


def test_reindex_counts_entries_and_skips_unreadable_ones(cache):
    (cache.entry_dir(B) / "meta.json").write_text("{not json")
    with sqlite3.connect(cache.index_path) as db:
        db.execute("DELETE FROM entries")
    assert cache.reindex() == 1 and _keys(cache) == [A]
    assert cache.entry_dir(B).is_dir()  # never deleted by a rebuild


def test_cli_results_reindex(cache, monkeypatch):
    from workbench.cli import cli

    monkeypatch.setenv("WORKBENCH_HOME", str(cache.root.parent))
    home_cache = ResultsCache(cache.root.parent / "results")
    _put(home_cache, C, 3)
    home_cache.index_path.write_bytes(b"garbage" * 100)
    out = CliRunner().invoke(cli, ["results", "--reindex"])
    assert out.exit_code == 0 and out.output.startswith("indexed 1 cached results\n"), out.output
    assert C[:16] in out.output


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_tmp_leftovers_of_dead_writers_are_cleaned_on_open(tmp_path):
    ResultsCache(tmp_path)
    tmp = tmp_path / "tmp"
    dead, young, held, stray = tmp / "dead", tmp / "young", tmp / "held", tmp / "stray.tmp"
    for folder in (dead, young, held):
        folder.mkdir()
        (folder / "arrays.safetensors").write_bytes(b"x" * 100)
    stray.write_bytes(b"x")
    for path in (dead, held, stray):
        _age(path, TMP_GRACE_S + 60)
    fd = os.open(held, os.O_RDONLY)  # a live writer holds its folder, however old
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ResultsCache(tmp_path)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp.iterdir()) == ["held", "young"]


BAD_KEYS = ["../../x", "/etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "a" * 62 + "/."]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_are_not_64_hex_characters_are_refused(cache, key):
    before = sorted(p.relative_to(cache.root.parent) for p in cache.root.parent.rglob("*"))
    message = f"not a cache key: {key!r} (keys are 64 lowercase hex characters)"
    for call in (cache.get, cache.evict, cache.entry_dir, lambda k: _put(cache, k, 9)):
        with pytest.raises(CacheKeyError) as err:
            call(key)
        assert str(err.value) == message
    assert sorted(p.relative_to(cache.root.parent) for p in cache.root.parent.rglob("*")) == before


def test_resolve_finds_the_one_key_for_a_prefix(cache):
    assert cache.resolve("aa") == A and cache.resolve("AB0") == B and cache.resolve(A) == A
    with pytest.raises(
        CacheKeyError, match=r"^2 cached results start with 'a' \(aaaaaaaaaaaa, ab0000000000\);"
    ):
        cache.resolve("a")
    with pytest.raises(CacheKeyError, match=r"^no cached result matches 'cc'$"):
        cache.resolve("cc")
    for bad in ("../a", "", "a" * 65, "xyz"):
        with pytest.raises(CacheKeyError, match="^not a cache key or key prefix: "):
            cache.resolve(bad)


def _rewrite_meta(entry, **changes):
    import json

    meta = json.loads((entry.path / "meta.json").read_text()) | changes
    (entry.path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("checksums", "message"),
    [
        (None, "meta.json records no checksums, so it cannot be verified"),
        ({}, "meta.json records no checksums, so it cannot be verified"),
        ("partial", "meta.json records no checksum for arrays.safetensors, so it cannot be verified"),
    ],
)
def test_entry_without_checksums_is_corrupt_not_verified(cache, checksums, message):
    entry = cache.get(A)
    if checksums == "partial":
        checksums = {k: v for k, v in entry.meta["checksums"].items() if k != "arrays.safetensors"}
    _rewrite_meta(entry, checksums=checksums)
    with pytest.raises(CorruptEntryError) as err:
        cache.get(A)
    assert str(err.value) == f"cache entry {A[:12]}: {message}"


def test_entry_copied_under_another_key_is_corrupt(cache):
    _rewrite_meta(cache.get(A), key=C)
    with pytest.raises(CorruptEntryError, match=f"its meta.json belongs to key '{C}'"):
        cache.get(A)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_entry_files_follow_the_umask_so_a_group_can_read_them(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        entry = _put(ResultsCache(tmp_path), A, 1)
    finally:
        os.umask(old)
    assert entry.path.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in entry.path.iterdir()} == dict.fromkeys(
        ("config.json", "meta.json", "result.json", "arrays.safetensors"), file_mode
    )


def test_only_a_damaged_file_triggers_a_rebuild():
    assert not _is_damage(sqlite3.OperationalError("database is locked"))
    assert not _is_damage(sqlite3.OperationalError("database or disk is full"))
    assert _is_damage(sqlite3.OperationalError("no such table: entries"))
