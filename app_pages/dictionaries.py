"""Compare dictionaries: every SAE/transcoder trained on a site — L0 vs FVU (with the Pareto
frontier), CE loss recovered, dead fraction — under readable names, from the cached
`compare-dictionaries` analysis (which reads the dictionaries folder and their train/eval results).

URL parameter: site."""

from urllib.parse import urlencode

import streamlit as st

from workbench import api
from workbench.app_pages import _common as ui
from workbench.app_pages import _params as params

st.title("Compare dictionaries")


@st.cache_data(ttl=30, show_spinner="Reading dictionaries and their results…")
def comparison(site: str) -> dict:
    """Rows and figures of the comparison (a cache hit unless a dictionary or result changed)."""
    res = api.run("compare-dictionaries", site=site)
    return {"rows": res.rows, "rule": res.rule, "figures": res.figures(), "key": res.cache_key}


if not api.list_dictionaries():
    st.info("No dictionaries yet: train some with `workbench run train-sae --help`.")
    st.stop()
everything = None
with ui.guard("cannot compare dictionaries"):
    everything = comparison("")
if everything is None:
    st.stop()
site_names = list(dict.fromkeys(r["site"] for r in everything["rows"]))
with st.sidebar:
    site = st.selectbox(
        "Site", site_names, index=site_names.index(params.choice("site", site_names, site_names[0]))
    )
view = comparison(site)
rows = view["rows"]
st.caption(f"{len(rows)} dictionaries reading {site}. {view['rule']}.")
st.dataframe(
    [
        {
            "name": r["name"],
            "frontier": "★" if r["pareto"] else "",
            "L0": r["l0"],
            "FVU": r["fvu"],
            "CE recovered": r["ce_loss_score"],
            "dead": r["frac_dead"],
            "numbers from": r["source"],
            "page": "feature_explorer?" + urlencode({"dictionary": r["path"]}),
        }
        for r in rows
    ],
    hide_index=True,
    width="stretch",
    column_config={
        "page": st.column_config.LinkColumn("Feature explorer", display_text="open"),
        "dead": st.column_config.NumberColumn(format="percent"),
    },
)
figs = view["figures"]
cols = st.columns(2)
for i, name in enumerate(figs):
    with cols[i % 2]:
        st.plotly_chart(figs[name], key=f"cmp-{i}", width="stretch")
