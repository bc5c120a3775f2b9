"""Driving dashboard pages in Streamlit's AppTest: one set of helpers for every AppTest module."""

from __future__ import annotations

import re
from typing import Any

from conftest import REPO
from streamlit.testing.v1 import AppTest

APP = REPO / "dashboard" / "app.py"
TIMEOUT_S = 90


def run(at: AppTest) -> AppTest:
    """Run and insist the page raised nothing: an error must be an st.error, never an exception."""
    at.run(timeout=TIMEOUT_S)
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page(page: str | None = None, tab: str | None = None) -> AppTest:
    """Open a page (default: Models → Registry), optionally on one of its tabs (as a click on the tab does)."""
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))
    if page:
        at.switch_page(f"pages/{page}.py")
        run(at)
    if tab:
        open_tab(at, "settings_tab" if page == "settings" else "registry_tab", tab)
    return at


def open_tab(at: AppTest, key: str, tab: str) -> AppTest:
    at.session_state[key] = tab
    return run(at)


def widget(widgets: Any, label: str | re.Pattern[str]) -> Any:
    """The first widget whose label is ``label`` (or matches it, for a pattern)."""
    found = [w for w in widgets if (label.search(w.label) if isinstance(label, re.Pattern) else w.label == label)]
    assert found, f"no widget {label!r}; have {[w.label for w in widgets]}"
    return found[0]


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def joined(elements: Any) -> str:
    return "\n".join(texts(elements))


def table(at: AppTest, index: int = 0) -> Any:
    return at.dataframe[index].value
