import pytest

from workbench.sites import UnknownSiteError, resolve_sites, to_rows

NAMES = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.0.mlp.hook_post",
    "blocks.0.mlp.hook_out",
    "blocks.0.attn.hook_out",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_resid_post",
    "blocks.1.mlp.hook_post",
    "blocks.1.mlp.hook_out",
    "blocks.1.attn.hook_out",
    "blocks.10.mlp.hook_post",
]


def test_star_matches_one_component_in_layer_order():
    assert resolve_sites(["blocks.*.mlp.hook_post"], NAMES) == [
        "blocks.0.mlp.hook_post",
        "blocks.1.mlp.hook_post",
        "blocks.10.mlp.hook_post",
    ]
    # `*` must not cross dots: blocks.*.hook_out is not blocks.0.mlp.hook_out
    with pytest.raises(UnknownSiteError):
        resolve_sites(["blocks.*.hook_out"], NAMES)


def test_braces_and_double_star():
    got = resolve_sites("blocks.1.hook_resid_{pre,post}", NAMES)
    assert got == ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"]
    assert set(resolve_sites(["blocks.0.**"], NAMES)) == {n for n in NAMES if n.startswith("blocks.0.")}


def test_unknown_site_lists_valid_names():
    with pytest.raises(UnknownSiteError) as err:
        resolve_sites(["blocks.*.mlp.hook_postt"], NAMES)
    assert "blocks.*.mlp.hook_post" in str(err.value) and "hook_embed" in str(err.value)


def test_to_rows():
    import torch

    pattern = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)  # [batch, head, q, k]
    rows = to_rows("blocks.0.attn.hook_pattern", pattern)
    assert rows.shape == (8, 3, 4) and torch.equal(rows[1], pattern[0, :, 1, :])
    assert to_rows("blocks.0.mlp.hook_post", torch.zeros(2, 5, 7)).shape == (10, 7)


def test_site_lists_split_on_commas_outside_braces():
    from workbench.sites import split_patterns

    readme = "blocks.*.mlp.hook_post,blocks.*.hook_resid_{pre,post}"
    assert split_patterns(readme) == ["blocks.*.mlp.hook_post", "blocks.*.hook_resid_{pre,post}"]
    assert split_patterns(" a ; b.{x,y} ,, ") == ["a", "b.{x,y}"]
    assert resolve_sites(readme, NAMES)[:3] == [
        "blocks.0.hook_resid_post",
        "blocks.0.hook_resid_pre",
        "blocks.0.mlp.hook_post",
    ]
    for bad, why in (("a.{x,y", "'{' without '}'"), ("a.x}", "'}' without '{'")):
        with pytest.raises(UnknownSiteError) as err:
            split_patterns(bad)
        assert str(err.value) == f"malformed site list '{bad}': {why}"


def test_gated_hooks_are_skipped_by_globs_and_named_when_asked_for():
    names = NAMES + ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"]
    gated = {"blocks.0.hook_mlp_in": "use_hook_mlp_in", "blocks.1.hook_mlp_in": "use_hook_mlp_in"}
    assert "blocks.0.hook_mlp_in" not in resolve_sites(["blocks.0.**"], names, gated)
    with pytest.raises(UnknownSiteError, match="only with use_hook_mlp_in switched on"):
        resolve_sites(["blocks.*.hook_mlp_in"], names, gated)


# --- one name per tensor (issue 13 item 8) -------------------------------------------------------


def _tl_alias_names(model) -> set[str]:
    """The canonical names by TransformerLens' own definition: each Bridge component's
    `hook_aliases` keys, prefixed by the component's path (independent of sites.alias_table)."""
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if "_original_component" in prefix or not getattr(module, "hook_aliases", None):
            continue
        names |= {f"{prefix}.{key}" if prefix else key for key in module.hook_aliases}
    return names & set(model.hook_dict)


def test_canonical_is_the_transformerlens_alias_on_every_architecture(tiny_model_dir_any):
    from workbench.models import load_model
    from workbench.sites import alias_table, canonical

    model = load_model(str(tiny_model_dir_any))
    table = alias_table(model.hook_dict)
    # every name that shares its HookPoint with another maps to the TL alias, and only those
    assert {c for n, c in table.items() if n != c} == _tl_alias_names(model)
    assert canonical(model, "blocks.1.hook_out") == "blocks.1.hook_resid_post"
    assert canonical(model.hook_dict, "blocks.0.attn.o.hook_in") == "blocks.0.attn.hook_z"
    assert canonical(model, "blocks.0.mlp.hook_post") == "blocks.0.mlp.hook_post"
    with pytest.raises(UnknownSiteError, match="site 'blocks.0.hook_outt' is no hook of this model"):
        canonical(model, "blocks.0.hook_outt")


def test_globs_expand_to_each_tensor_once(tiny_model):
    from workbench.sites import alias_table, gated_sites, resolve_for_model

    got = resolve_for_model("blocks.0.**", tiny_model)
    points = [id(tiny_model.hook_dict[n]) for n in got]
    assert len(points) == len(set(points))  # no HookPoint twice
    assert "blocks.0.hook_resid_post" in got and "blocks.0.hook_out" not in got
    table, gated = alias_table(tiny_model.hook_dict), gated_sites(tiny_model)  # gated: behind a switch
    assert set(got) == {c for n, c in table.items() if n.startswith("blocks.0.") and c not in gated}
    # an alias and its canonical name asked together are one site
    assert resolve_for_model("blocks.1.hook_out,blocks.1.hook_resid_post", tiny_model) == [
        "blocks.1.hook_resid_post"
    ]


def test_held_name_without_the_model():
    from workbench.sites import held_name

    held = ["blocks.5.hook_resid_post", "blocks.5.attn.hook_z", "blocks.5.mlp.hook_pre_linear"]
    assert held_name("blocks.5.hook_out", held) == "blocks.5.hook_resid_post"
    assert held_name("blocks.5.attn.o.hook_in", held) == "blocks.5.attn.hook_z"
    assert held_name("blocks.5.hook_resid_post", held) == "blocks.5.hook_resid_post"
    assert held_name("blocks.6.hook_out", held) is None
    # mlp.in.hook_out is hook_pre_linear in gated MLPs, hook_pre otherwise: only a recorded table says
    assert held_name("blocks.5.mlp.in.hook_out", held) is None
    recorded = {"blocks.5.mlp.in.hook_out": "blocks.5.mlp.hook_pre_linear"}
    assert held_name("blocks.5.mlp.in.hook_out", held, recorded) == "blocks.5.mlp.hook_pre_linear"


def test_aliases_give_one_stored_tensor_and_are_accepted_on_reading(tiny_store, tiny_model):
    import torch

    store = tiny_store(("blocks.0.hook_out", "blocks.0.hook_resid_post", "blocks.0.mlp.in.hook_out"), 64)
    assert store.sites == ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_pre_linear"]
    assert sorted(p.name for p in (store.root / "acts").iterdir()) == store.sites  # one folder each
    for alias, name in [
        ("blocks.0.hook_out", "blocks.0.hook_resid_post"),
        ("blocks.0.mlp.in.hook_out", "blocks.0.mlp.hook_pre_linear"),  # via run.json's recorded table
    ]:
        assert alias in store.sites and store.site(alias) == name
        assert torch.equal(store.read(alias, 0, 10), store.read(name, 0, 10))
        assert store.shape(alias) == store.shape(name)
    from workbench.store import StoreError

    with pytest.raises(StoreError) as err:
        store.site("blocks.1.hook_out")
    assert str(err.value) == (
        "site 'blocks.1.hook_out' is not in this store; it holds: "
        "blocks.0.hook_resid_post, blocks.0.mlp.hook_pre_linear"
    )


def test_a_dictionary_named_by_an_alias_runs_on_the_canonical_store(tiny_store, tmp_path):
    """A SAE whose cfg says blocks.0.hook_out evaluates on a store of blocks.0.hook_resid_post,
    with the same numbers as one that names the canonical site (planted perfect dictionary)."""
    from conftest import plant_identity
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from workbench import api

    store = tiny_store(("blocks.0.hook_resid_post",), 128)
    rows = {}
    for name in ("blocks.0.hook_out", "blocks.0.hook_resid_post"):
        d = store.shape(name)[0]
        sae = plant_identity(
            StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, metadata=SAEMetadata(hook_name=name)))
        )
        sae.save_model(str(tmp_path / name))
        rows[name] = api.run(
            "sae-eval", dictionary=str(tmp_path / name), store=str(store.root), n_seqs=2
        ).table[0]
    alias, canon = rows["blocks.0.hook_out"], rows["blocks.0.hook_resid_post"]
    assert alias["fvu"] == pytest.approx(0.0, abs=1e-9) and alias["ce_loss_score"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert alias["n_tokens"] == canon["n_tokens"] > 0


def test_dashboards_take_an_alias_site_and_record_the_canonical_one(tiny_store):
    from workbench import api

    store = tiny_store(("blocks.0.hook_resid_post",), 64)
    opts = {"store": str(store.root), "n_top": 2, "latents": 4, "token_batch": 50}
    alias = api.run("dashboards", site="blocks.0.hook_out", **opts)
    canon = api.run("dashboards", site="blocks.0.hook_resid_post", **opts)
    assert alias.site == canon.site == "blocks.0.hook_resid_post"
    assert alias.max_act.tolist() == canon.max_act.tolist()
