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
