"""An administrator in a real headless Chromium: the console and the audit log, and a policy
change (refused without a reason, then saved and audited).
"""

from __future__ import annotations

import pytest

from tests.browser.dashboard_site import CHROMIUM

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)"
)


def test_admin_console_in_the_browser(system, open_as) -> None:  # type: ignore[no-untyped-def]
    ui = open_as("boss")
    page = ui.page
    page.click("#nav-console")
    page.wait_for_selector("#throughput-chart")
    bars = page.eval_on_selector_all("#throughput-chart g.bar", "b => b.map(g => +g.dataset.done)")
    scored = sum(1 for _, cls in system.order() if cls is not None)
    assert len(bars) == 60 and sum(bars) == scored
    assert page.inner_text('[data-tile="workers"] .big') == "0"  # Redis answers; no worker here
    assert "rejected" in page.inner_text("#problems") or not system.real
    ui.shot("admin.png")
    page.click("#nav-audit")
    page.wait_for_selector("#audit")
    assert page.inner_text("#audit tbody tr:first-child td.action") == "login"
    ui.self_contained()


def test_admin_changes_the_policy_in_the_browser(open_as) -> None:  # type: ignore[no-untyped-def]
    ui = open_as("boss")
    page = ui.page
    page.click("#nav-policy")
    page.wait_for_selector("#active")
    assert page.get_attribute("#active", "data-version") == "0"
    assert page.inner_text("#max-wait") == "48 h"
    page.fill("#policy-form input[name=max_wait_h]", "24")
    page.fill("#policy-form input[name=reads_per_hour]", "12")
    page.click("#save-policy")  # no reason: refused, nothing saved
    page.wait_for_selector(".flash")
    assert "say why" in page.inner_text(".flash")
    assert page.get_attribute("#active", "data-version") == "0"
    page.fill("#policy-form input[name=max_wait_h]", "24")
    page.fill("#policy-form input[name=reads_per_hour]", "12")
    page.fill("#policy-form input[name=reason]", "night shift: one radiologist")
    page.click("#save-policy")
    page.wait_for_selector('#active[data-version="1"]')
    assert page.inner_text("#max-wait") == "24 h" and page.inner_text("#reads-per-hour") == "12.0"
    assert page.inner_text('#history tr[data-version="1"]').count("night shift") == 1
    page.click("#propose")  # too few reviewed studies here: the page says so
    page.wait_for_selector("#no-proposal")
    assert "at least 20 of each" in page.inner_text("#no-proposal")
    ui.shot("policy.png")
    page.click("#nav-console")
    page.wait_for_selector("#drift")
    assert page.get_attribute("#drift", "data-alarm") == "no"
    page.click("#nav-audit")
    page.wait_for_selector("#audit")
    assert page.inner_text("#audit tbody tr:first-child td.action") == "policy_change"
    ui.self_contained()
