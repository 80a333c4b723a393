"""Patching: pick a task and methods, run (in the background, cached), see AP / AtP / RelP / IG maps
side by side, and click a cell to see that component's score on every prompt."""

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui

NAME = "patching"
METHODS = ["ap", "atp", "relp", "ig"]
COMPONENTS = ["resid_pre", "attn_out", "mlp_out", "heads", "heads_pos"]
METRICS = ["normalized", "logit_diff", "prob", "kl"]

st.title("Patching")
st.caption(
    "Activation patching (ground truth) against attribution patching (AtP), relevance patching "
    "(RelP) and integrated gradients on a prompt-pair task. Tasks: `ioi` (templates), `ioi-shared`, "
    "`ioi-shared-hard`, or a .csv/.jsonl file with columns clean, corrupted, answer, wrong."
)
defaults = {f["name"]: f["default"] for f in api.config_fields(NAME)}

with (
    st.expander("Task and methods · Run", expanded=not api.cached(NAME)),
    st.form("patching-form", border=False),
):
    left, right = st.columns(2)
    with left:
        task = st.text_input("Task", value=defaults["task"])
        model = st.text_input("Model", value=defaults["model"])
        n_prompts = int(st.number_input("Prompts", value=int(defaults["n_prompts"]), min_value=0, step=1))
        skip = st.checkbox("Skip unusable pairs (and list them)", value=False)
        dictionary = st.text_input(
            "Dictionary (optional)",
            value="",
            help="SAE/transcoder folder: also score its latents by AtP/RelP",
        )
    with right:
        methods = st.multiselect("Methods", METHODS, default=METHODS)
        components = st.multiselect("Components", COMPONENTS, default=defaults["components"].split(","))
        metric = st.selectbox("Metric", METRICS)
        direction = st.radio("Direction", ["denoise", "noise"], horizontal=True)
    submitted = st.form_submit_button("Run", type="primary")

if submitted:
    overrides = {
        "task": task,
        "model": model,
        "n_prompts": n_prompts,
        "skip_unusable": skip,
        "methods": ",".join(methods),
        "components": ",".join(components),
        "metric": metric,
        "direction": direction,
        "dictionary": dictionary.strip(),
    }
    with ui.guard("cannot run patching"):
        api.make_config(NAME, **overrides)  # bad options fail here, before a thread starts
        st.session_state["patching-job"] = ui.start_job(NAME, overrides)

ui.follow_job("patching-job", "patching-result", "patching")

key = ui.pick_result(
    NAME, "patching-result", "No patching results yet: pick a task and methods above and press Run."
)

with ui.guard("cannot show this result"):
    result = ui.result(key)
    base = result.baselines
    st.markdown(
        f"**{result.task}** on `{result.model}`: {len(result.prompts)} prompts, metric {result.metric}, "
        f"{result.direction}; logit difference clean {base['ld_clean']:.3f}, corrupted {base['ld_corrupted']:.3f}"
        + (f"; {len(result.skipped)} pairs skipped" if result.skipped else "")
    )
    st.dataframe(result.summary(), hide_index=True)
    if result.skipped:
        with st.expander(f"{len(result.skipped)} skipped pairs"):
            st.dataframe([{"row": r, "reason": why} for r, why in result.skipped], hide_index=True)
    component = st.radio("Component", result.components, horizontal=True)
    fig = ui.figures(key)[f"{component}: methods side by side"]
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key=f"map-{key}-{component}")

    per_head = component in ("heads", "heads_pos")
    limit = result.scores[f"{result.methods[0]}/{component}"].shape[2]
    layer, index = 0, limit - 1
    points = (getattr(event, "selection", None) or {}).get("points", []) if event else []
    clicked = None
    if points:  # a clicked cell: y is the layer, x the position (or head) label
        layer = int(points[0]["y"])
        clicked = int(str(points[0]["x"]).lstrip("H").split(":")[0])
        index = clicked if component != "heads_pos" else 0  # heads_pos maps are summed over heads
    st.subheader("Per-prompt scores of one cell")
    c1, c2, c3 = st.columns(3)
    layer = int(c1.number_input("Layer", 0, result.n_layers - 1, value=layer, key=f"layer-{layer}"))
    what = "Head" if per_head else "Position"
    index = int(c2.number_input(what, 0, limit - 1, value=index, key=f"index-{index}"))
    pos = None
    if component == "heads_pos":
        n_pos = len(result.labels)
        pos = int(c3.number_input("Position", 0, n_pos - 1, value=n_pos - 1 if clicked is None else clicked))
    table = {}
    for m in result.methods:
        for row in result.per_prompt(m, component, layer, index, pos):
            table.setdefault(row["prompt"], {"prompt": row["prompt"]})[m] = round(row["score"], 5)
    st.dataframe(list(table.values()), hide_index=True)
    st.caption(
        "Top heads by AP: " + ", ".join(f"{h['head']} ({h['score']:+.3f})" for h in result.top_heads())
    )
    if result.feature_top:
        st.subheader("Dictionary features")
        st.caption(
            f"`{result.dictionary}` spliced at {result.feature_hooks[-1]}: task-mean score of each latent "
            "and of the error node; latents + error = the site's own score. Links open the Feature explorer."
        )
        st.dataframe(
            result.feature_table(),
            hide_index=True,
            column_config={"url": st.column_config.LinkColumn("dashboard", display_text="open")},
        )
        st.plotly_chart(ui.figures(key)["Feature attribution: top latents"], key=f"features-{key}")
