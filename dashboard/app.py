"""ImageWorks dashboard: ``streamlit run dashboard/app.py`` (or ``imageworks-dashboard`` / ``make run``).

Pages (runbook wording): **Models** → Registry, Active Model, Vision Probe; **Settings** (with the Backends tab
holding **Reload registry**). The deployment root comes from ``IMAGEWORKS_ROOT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
# The pages import the shared modules next to this file (``ui``, ``jobs``), under AppTest as under `streamlit run`.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ui  # noqa: E402

st.set_page_config(page_title="ImageWorks Models", page_icon="🖼️", layout="wide")

PAGES = {
    "Models": [
        st.Page(HERE / "pages" / "registry.py", title="Registry", icon=":material/table_view:", default=True),
        st.Page(
            HERE / "pages" / "active_model.py", title="Active Model", icon=":material/memory:", url_path="active_model"
        ),
        st.Page(
            HERE / "pages" / "vision_probe.py",
            title="Vision Probe",
            icon=":material/visibility:",
            url_path="vision_probe",
        ),
    ],
    "Settings": [st.Page(HERE / "pages" / "settings.py", title="Settings", icon=":material/settings:")],
}

page = st.navigation(PAGES)
st.sidebar.caption(f"Root: `{ui.settings().root}`")
page.run()
