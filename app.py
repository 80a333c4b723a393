"""The browser workbench: `workbench app` (or `streamlit run app.py`).

An `st.navigation` router over thin pages in `app_pages/`; every page talks to the library only
through `workbench.api`, so whatever it computes is a cache hit for the CLI and Jupyter too.
"""

import streamlit as st

st.set_page_config(page_title="MI workbench", page_icon="🔬", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("app_pages/prompt_lens.py", title="Prompt lens", icon="🔎"),
    st.Page("app_pages/neuron_explorer.py", title="Neuron explorer", icon="🧠"),
    st.Page("app_pages/feature_explorer.py", title="Feature explorer", icon="🧩"),
    st.Page("app_pages/analyses.py", title="Analyses", icon="📊"),
]

st.navigation(PAGES).run()
