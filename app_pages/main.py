"""The browser workbench: `workbench app` (or `streamlit run app_pages/main.py` in a checkout).

An `st.navigation` router over thin pages in this folder; every page talks to the library only
through `workbench.api`, so whatever it computes is a cache hit for the CLI and Jupyter too. Page
paths are absolute (from this file), so the router works wherever the package is installed and
whatever the working directory; `.streamlit/config.toml` beside it (Streamlit's script-level
config) keeps the server on loopback when it is started with `streamlit run` from anywhere.
"""

from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="MI workbench", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page(HERE / "home.py", title="Home", icon=":material/home:", default=True),
    st.Page(HERE / "prompt_lens.py", title="Prompt lens", icon=":material/text_fields:"),
    st.Page(HERE / "neuron_explorer.py", title="Neuron explorer", icon=":material/neurology:"),
    st.Page(HERE / "feature_explorer.py", title="Feature explorer", icon=":material/extension:"),
    st.Page(HERE / "dictionaries.py", title="Compare dictionaries", icon=":material/scatter_plot:"),
    st.Page(HERE / "analyses.py", title="Analyses", icon=":material/analytics:"),
    st.Page(HERE / "patching.py", title="Patching", icon=":material/compare_arrows:"),
    st.Page(HERE / "factual.py", title="Factual recall", icon=":material/lightbulb:"),
    st.Page(HERE / "bigram.py", title="Bigram subnetworks", icon=":material/account_tree:"),
    st.Page(HERE / "snmf.py", title="SNMF features", icon=":material/join_inner:"),
    st.Page(HERE / "steering.py", title="Steering playground", icon=":material/tune:"),
]

st.navigation(PAGES).run()
