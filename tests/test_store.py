"""Activation store: parity with run_with_cache, reading, shuffling, damage handling."""

import pytest
import torch

from workbench.capture import CaptureConfig, capture
from workbench.sites import UnknownSiteError, to_rows
from workbench.store import ActivationStore, StoreError

SITES = (
    "blocks.*.mlp.hook_pre",
    "blocks.*.mlp.hook_post",
    "blocks.*.hook_resid_{pre,mid,post}",
    "blocks.*.attn.hook_z",
    "blocks.*.hook_attn_out",
    "blocks.*.attn.hook_pattern",
)


def _capture(model_dir, wikitext, **kw):
    from workbench.models import load_model

    model = load_model(str(model_dir))
    cfg = CaptureConfig(
        model=str(model_dir),
        data=wikitext,
        **{"sites": SITES, "n_tokens": 256, "ctx_len": 32, "batch_size": 2, "shard_tokens": 64, **kw},
    )
    return model, capture(cfg, model=model, progress=False)


def test_store_equals_run_with_cache(tiny_model_dir_any, wikitext):
    model, store = _capture(tiny_model_dir_any, wikitext)
    assert store.complete and store.n_rows == 256 and store.n_shards(store.sites[0]) == 4
    # every pattern resolved for both layers (GPT-NeoX's parallel residual has no resid_mid)
    assert {"blocks.1.mlp.hook_post", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z"} <= set(
        store.sites
    )
    assert len(store.sites) == (14 if "neox" in str(tiny_model_dir_any) else 16)
    tokens = store.token_ids().reshape(-1, 32)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for site in store.sites:
        diff = (store.read(site) - to_rows(site, cache[site])).abs().max().item()
        assert diff <= 1e-5, f"{site}: {diff}"
    # sites in layer 0 only: the forward pass stops early and must still match
    _, early = _capture(
        tiny_model_dir_any, wikitext, sites=("blocks.0.mlp.hook_post", "blocks.0.hook_resid_post")
    )
    for site in early.sites:
        assert (early.read(site) - to_rows(site, cache[site])).abs().max().item() <= 1e-5, site


def test_forward_pass_stops_after_the_last_captured_site(tiny_model_dir_any, wikitext):
    from workbench.models import load_model

    model = load_model(str(tiny_model_dir_any))
    reached: list[str] = []
    for probe in ("blocks.1.hook_resid_pre", "ln_final.hook_normalized", "unembed.hook_out"):
        model.hook_dict[probe].add_hook(lambda act, hook, name=probe: reached.append(name), level=-1)
    try:
        for sites, expected in [
            (("blocks.0.mlp.hook_post",), []),  # only block 0 runs
            (("blocks.*.hook_resid_post",), ["blocks.1.hook_resid_pre"]),  # no final norm, no logits
            (
                ("blocks.0.hook_resid_post", "unembed.hook_out"),
                ["blocks.1.hook_resid_pre", "ln_final.hook_normalized", "unembed.hook_out"],
            ),
        ]:
            reached.clear()
            cfg = CaptureConfig(
                model=str(tiny_model_dir_any),
                sites=sites,
                data=wikitext,
                n_tokens=64,
                ctx_len=32,
                batch_size=2,
            )
            store = capture(cfg, model=model, progress=False)
            assert sorted(set(reached)) == sorted(expected), sites
            assert store.complete and store.n_rows == 64
        reached.clear()
        assert model(torch.tensor([[1, 2, 3]])).shape[-1] == model.cfg.d_vocab  # the model is unharmed
        assert "unembed.hook_out" in reached
    finally:
        for probe in ("blocks.1.hook_resid_pre", "ln_final.hook_normalized", "unembed.hook_out"):
            model.hook_dict[probe].remove_hooks("fwd", level=-1)


def test_token_table_and_bos_policy(tiny_model, tiny_model_dir, wikitext):
    _, store = _capture(tiny_model_dir, wikitext, sites=("blocks.0.mlp.hook_post",))
    table = store.tokens().to_pydict()
    assert table["pos"][:3] == [0, 1, 2] and table["seq"][32] == 1
    bos = tiny_model.tokenizer.bos_token_id
    assert all(t == bos for t, p in zip(table["token"], table["pos"]) if p == 0)
    _, raw = _capture(tiny_model_dir, wikitext, sites=("blocks.0.mlp.hook_post",), bos="none")
    assert raw.token_ids()[0].item() != bos and raw.fingerprint != store.fingerprint


def test_reads_slices_and_seeded_shuffle(tiny_model_dir, wikitext):
    _, store = _capture(tiny_model_dir, wikitext, sites=("blocks.1.mlp.hook_post",))
    site = "blocks.1.mlp.hook_post"
    full = store.read(site)
    assert torch.equal(store.read(site, 50, 130), full[50:130])  # crosses shard boundaries
    a = torch.cat(list(store.batches(site, 48, seed=3, buffer_shards=2)))
    b = torch.cat(list(store.batches(site, 48, seed=3, buffer_shards=2)))
    c = torch.cat(list(store.batches(site, 48, seed=4, buffer_shards=2)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, full)  # shuffled ...
    assert torch.equal(a.sum(0), a.sum(0)) and torch.allclose(
        a.sum(0), full.sum(0), atol=1e-3
    )  # ... same rows


def test_low_precision_dtypes(tiny_model_dir, wikitext):
    _, f32 = _capture(tiny_model_dir, wikitext, sites=("blocks.0.hook_resid_post",))
    _, f16 = _capture(tiny_model_dir, wikitext, sites=("blocks.0.hook_resid_post",), dtype="float16")
    _, bf16 = _capture(tiny_model_dir, wikitext, sites=("blocks.0.hook_resid_post",), dtype="bfloat16")
    assert bf16.read("blocks.0.hook_resid_post").dtype == torch.bfloat16
    x16 = f16.read("blocks.0.hook_resid_post")
    assert x16.dtype == torch.float16
    assert torch.allclose(x16.float(), f32.read("blocks.0.hook_resid_post"), atol=1e-2, rtol=1e-2)


def test_unknown_site_fails_before_compute(tiny_model, tiny_model_dir, wikitext, workbench_home):
    cfg = CaptureConfig(
        model=str(tiny_model_dir), data=wikitext, sites=("blocks.*.mlp.hook_postt",), n_tokens=64, ctx_len=32
    )
    with pytest.raises(UnknownSiteError, match="Valid sites: .*blocks.\\*.mlp.hook_post"):
        capture(cfg, model=tiny_model, progress=False)
    assert (
        not list((workbench_home / "stores").glob("*/run.json"))
        if (workbench_home / "stores").exists()
        else True
    )


def test_truncated_shard_gives_clear_error_and_resume_rewrites_it(tiny_model, tiny_model_dir, wikitext):
    _, store = _capture(tiny_model_dir, wikitext, sites=("blocks.0.mlp.hook_post",))
    good = store.read("blocks.0.mlp.hook_post")
    shard = store.root / "acts" / "blocks.0.mlp.hook_post" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match="shard 2 of site blocks.0.mlp.hook_post is missing or truncated"):
        ActivationStore(store.root).read("blocks.0.mlp.hook_post")
    # The same capture command notices the damage (a stat per shard) and rewrites that shard.
    _, again = _capture(tiny_model_dir, wikitext, sites=("blocks.0.mlp.hook_post",))
    assert torch.equal(again.read("blocks.0.mlp.hook_post"), good)


def test_missing_store_message(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")


def test_other_threads_forward_passes_do_not_leak_into_a_capture(tiny_model_dir, wikitext):
    """The app shares one pooled model between a running capture and e.g. the prompt lens."""
    import threading

    from workbench.models import load_model

    model = load_model(str(tiny_model_dir))
    outputs, reported = [], []

    def other_thread_forward(done: int, total: int) -> None:  # called between capture batches
        reported.append((done, total))
        t = threading.Thread(target=lambda: outputs.append(model(model.to_tokens("A prompt lens call"))))
        t.start()
        t.join()

    cfg = CaptureConfig(
        model=str(tiny_model_dir),
        data=wikitext,
        sites=("blocks.*.hook_resid_post",),
        n_tokens=128,
        ctx_len=32,
        batch_size=2,
        shard_tokens=64,
    )
    store = capture(cfg, model=model, progress=other_thread_forward)
    assert len(outputs) == 2 and store.n_rows == 128
    assert reported == [(64, 128), (128, 128)]  # tokens so far (the bar is off when a callback is given)
    _, cache = model.run_with_cache(store.token_ids().reshape(-1, 32))
    for site in store.sites:
        assert (store.read(site) - to_rows(site, cache[site])).abs().max().item() <= 1e-5, site


def test_verify_finds_a_flipped_byte_also_in_sha256_manifests(tiny_model_dir, wikitext):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    site = "blocks.0.mlp.hook_post"
    _, store = _capture(tiny_model_dir, wikitext, sites=(site,))
    assert store.verify() == [] and store.records(site)[0].checksum.startswith("xxh3_128:")
    shard = store.root / "acts" / site / "shard-00001.safetensors"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(bad))
    assert ActivationStore(store.root).verify() == [f"{site} shard 1"]

    # A manifest from before the checksum column: sha256 hex digests, still verified.
    shard.write_bytes(good)
    rows = pq.read_table(store.root / "manifest.parquet").to_pylist()
    for row in rows:
        path = store.root / "acts" / row["site"] / f"shard-{row['shard']:05d}.safetensors"
        row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        del row["checksum"]
    pq.write_table(pa.Table.from_pylist(rows), store.root / "manifest.parquet")
    assert ActivationStore(store.root).verify() == []
    shard.write_bytes(bytes(bad))
    assert ActivationStore(store.root).verify() == [f"{site} shard 1"]
