"""Operator moments only a real server shows: the port it serves on (real Streamlit, headless Chromium)."""

from __future__ import annotations

import pytest
from test_dashboard_browser import Dashboard, browser, dashboard, no_exception, open_page, page  # noqa: F401

pytestmark = pytest.mark.browser


def test_environment_tab_shows_the_port_actually_served(page, dashboard: Dashboard) -> None:  # noqa: F811
    from playwright.sync_api import expect

    port = dashboard.url.rsplit(":", 1)[1]
    open_page(page, dashboard, "settings?settings_tab=Environment", "Settings")
    # The fixture serves on a free port and leaves IMAGEWORKS_DASHBOARD_PORT unset (its default is 8501).
    expect(page.get_by_text(f"This dashboard serves on port {port}")).to_be_visible()
    no_exception(page)
