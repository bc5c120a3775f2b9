"""ImageWorks dashboard entry point (placeholder: the registry table; pages grow with later issues)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from imageworks_core.errors import RegistryError
from imageworks_core.registry import load_registry
from imageworks_core.settings import get_settings

st.set_page_config(page_title="ImageWorks Models", layout="wide")
st.title("ImageWorks Models")
settings = get_settings()
try:
    registry = load_registry(settings=settings)
except RegistryError as exc:
    st.error("Registry failed to load:\n\n" + "\n".join(f"- {line}" for line in exc.lines()))
    st.stop()
rows = [
    {
        "name": e.name,
        "backend": e.backend,
        "served id": e.effective_served_id,
        "roles": ", ".join(e.roles),
        "capabilities": ", ".join(e.capabilities.enabled()),
        "weights": "n/a" if not e.download_path else ("present" if registry.weights_present(e.name) else "missing"),
    }
    for e in registry
]
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption(f"Root: {settings.root}")
