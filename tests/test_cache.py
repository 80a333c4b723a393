"""Results cache: round trip, concurrent writers in separate processes, corruption handling."""

import multiprocessing as mp

import pytest
import torch

from workbench.cache import FILES, CorruptEntryError, ResultsCache


def _put(cache, key, value):
    return cache.put(
        key,
        config={"v": value},
        meta={"analysis": "t", "version": 1},
        result={"value": value},
        arrays={"x": torch.full((64, 8), float(value))},
    )


def test_round_trip_and_listing(tmp_path):
    cache = ResultsCache(tmp_path)
    entry = _put(cache, "a" * 64, 3)
    assert entry.result == {"value": 3} and torch.equal(entry.arrays()["x"], torch.full((64, 8), 3.0))
    read = cache.get("a" * 64)  # put returns what get reads back
    assert (entry.path, entry.config, entry.meta, entry.result) == (
        read.path,
        read.config,
        read.meta,
        read.result,
    )
    _put(cache, "b" * 64, 4)
    rows = cache.list()
    assert [r["key"] for r in rows] == ["b" * 64, "a" * 64]  # newest first
    assert cache.list(text='"v": 3')[0]["key"] == "a" * 64
    assert cache.get("c" * 64) is None


def _writer(root, worker, n):
    cache = ResultsCache(root)
    for i in range(n):
        _put(cache, f"{i:064d}", i)  # every worker writes the same keys ...
        _put(cache, f"{worker}{i:063d}", 1000 * worker + i)  # ... and its own


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, 25)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()  # its exit is the event; a clock here failed when importing torch took minutes
        assert p.exitcode == 0
    cache = ResultsCache(tmp_path)
    assert len(cache.list()) == 25 + 2 * 25
    for i in range(25):
        assert cache.get(f"{i:064d}").result == {"value": i}
        for w in (1, 2):
            entry = cache.get(f"{w}{i:063d}")
            assert entry.result == {"value": 1000 * w + i}
            assert torch.equal(entry.arrays()["x"], torch.full((64, 8), float(1000 * w + i)))
    assert not [p for p in (tmp_path / "tmp").iterdir()]  # no leftovers


def test_put_returns_its_entry_while_another_writer_swaps_the_folder(tmp_path, monkeypatch):
    """A writer of the same key replaces the entry folder by two renames (discard, publish); a put
    that read its entry back in between found it missing (None) or half gone (CorruptEntryError)."""
    cache, key = ResultsCache(tmp_path), "e" * 64
    index = cache._index

    def index_while_swapped(fn):
        if cache.entry_dir(key).exists():  # the other writer's discard, before its own rename
            cache.entry_dir(key).rename(tmp_path / "tmp" / "trash-other")
        return index(fn)

    monkeypatch.setattr(cache, "_index", index_while_swapped)
    entry = _put(cache, key, 7)
    assert entry is not None and (entry.config, entry.result) == ({"v": 7}, {"value": 7})
    assert entry.meta["key"] == key and sorted(entry.meta["checksums"]) == sorted(FILES)


@pytest.mark.parametrize("damage", ["truncate_arrays", "garble_result", "delete_meta"])
def test_corrupt_entry_is_detected(tmp_path, damage):
    cache = ResultsCache(tmp_path)
    entry = _put(cache, "d" * 64, 5)
    if damage == "truncate_arrays":
        path = entry.path / "arrays.safetensors"
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garble_result":
        (entry.path / "result.json").write_text('{"value": 6}')
    else:
        (entry.path / "meta.json").unlink()
    with pytest.raises(CorruptEntryError, match="cache entry dddddddddddd"):
        cache.get("d" * 64)
    cache.evict("d" * 64)
    assert cache.get("d" * 64) is None and _put(cache, "d" * 64, 5).result == {"value": 5}
