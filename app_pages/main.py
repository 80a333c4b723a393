"""The browser workbench: `workbench app` (or `streamlit run app.py`).

An `st.navigation` router over thin pages in `app_pages/`; every page talks to the library only
through `workbench.api`, so whatever it computes is a cache hit for the CLI and Jupyter too.
"""

import streamlit as st

st.set_page_config(page_title="MI workbench", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/prompt_lens.py", title="Prompt lens", icon=":material/text_fields:"),
    st.Page("app_pages/neuron_explorer.py", title="Neuron explorer", icon=":material/neurology:"),
    st.Page("app_pages/feature_explorer.py", title="Feature explorer", icon=":material/extension:"),
    st.Page("app_pages/analyses.py", title="Analyses", icon=":material/analytics:"),
]

st.navigation(PAGES).run()
