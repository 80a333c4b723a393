"""Thin Streamlit pages of the workbench app; main.py is the router (`workbench app` runs it)."""
