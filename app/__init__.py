"""The Streamlit dashboard (entry point: app/main.py)."""
