"""Rank Studio: the Streamlit entry point. It only routes; the pages live in pages/.

Start it with `streamlit run app/main.py` (the workspace is $RANK_STUDIO_WORKSPACE,
default ./workspace). The server settings live in app/.streamlit/config.toml, next to
this script, where Streamlit reads them whatever the working directory: the dashboard
listens on localhost only unless `--server.address` asks otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts only app/ on sys.path; the project root holds `core` and `app`.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import ui  # noqa: E402
from core.errors import UserError  # noqa: E402

st.set_page_config(page_title="Rank Studio", page_icon=":material/tune:", layout="wide")
page = st.navigation(ui.nav_pages())
try:
    st.sidebar.caption(f"Workspace: `{ui.workspace()}`")
    page.run()
except UserError as exc:  # e.g. the job store stayed locked: a message on the page, not a traceback
    st.error(str(exc), icon=":material/error:")
