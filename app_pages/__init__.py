"""Thin Streamlit pages of the workbench app (see app.py)."""
