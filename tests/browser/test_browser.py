"""The dashboard in a real headless Chromium (Debian's binary, driven by Playwright; no browser
download): a radiologist logs in, sees abnormal studies above normal ones, watches a new study
appear without a reload, walks the worklist with the keyboard, opens a study, toggles the CAM
and changes its opacity, marks it read, logs out. Nothing is fetched from any other origin and
no Content-Security-Policy violation is reported.

With ../shared/data present the studies are real radiographs scored by the shipped model;
otherwise generated images and a random model. Set CXR_SCREENSHOTS=docs/screenshots to refresh
the README's screenshots.
"""

from __future__ import annotations

import pytest

from tests.browser.dashboard_site import CHROMIUM, LATE, SEVERITY
from tests.conftest import chest_like, jpeg_bytes

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)"
)


def test_radiologist_worklist_live_keyboard_cam_and_read(system, live_server, open_as) -> None:  # type: ignore[no-untyped-def]
    ui = open_as("rad")
    page = ui.page
    order = system.order()
    assert ui.rows() == [sid for sid, _ in order]
    ranks = [SEVERITY[cls] for _, cls in order]
    assert ranks == sorted(ranks)  # abnormal (critical, urgent, routine) above normal
    if system.real:
        assert {"normal"} < {cls for _, cls in order} and ranks[0] < SEVERITY["normal"]
        assert page.inner_text(f'tr[data-study-id="{order[0][0]}"] td.waiting').endswith("min")
    ui.shot("worklist.png")

    # A study arriving while the page is open appears without a reload, then gets its score.
    late = LATE if system.real else ui.tmp / "late.jpg"
    if not system.real:
        late.write_bytes(jpeg_bytes(chest_like(seed=99)))
    marker = page.evaluate("() => (window.__same_page = true)")
    (study_id,) = system.add([late], classify=False)
    row = f'#worklist tr[data-study-id="{study_id}"]'
    page.wait_for_selector(row, timeout=15_000)
    assert "queued" in page.inner_text(f"{row} td.status")
    with system.factory() as session:
        from pipeline.models import Image

        system.classify([i.id for i in session.query(Image).filter_by(study_id=study_id)])
    page.wait_for_function(
        f"() => document.querySelector('{row} td.status').textContent.startsWith('done')",
        timeout=15_000,
    )
    assert page.evaluate("() => window.__same_page") is marker is True  # never reloaded
    expected = [sid for sid, _ in system.order()]
    assert ui.rows() == expected

    # Keyboard: j, j selects the second row; Enter opens it; k goes to the previous study.
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert ui.selected() == expected[1]
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/studies/{expected[1]}")
    page.keyboard.press("k")
    page.wait_for_url(f"**/studies/{expected[0]}")
    page.keyboard.press("j")
    page.wait_for_url(f"**/studies/{expected[1]}")

    # The CAM: o shows it, the slider sets its opacity; both survive moving to the next study.
    page.wait_for_selector("#radiograph")
    page.eval_on_selector("#radiograph", "i => i.complete || new Promise(r => i.onload = r)")
    assert page.eval_on_selector("#radiograph", "i => i.naturalWidth") > 0
    assert page.is_hidden("#cam")
    page.keyboard.press("o")
    assert page.is_visible("#cam") and page.is_checked("#cam-toggle")
    page.eval_on_selector("#cam", "i => i.complete || new Promise(r => i.onload = r)")
    assert page.eval_on_selector("#cam", "i => getComputedStyle(i).opacity") == "0.45"
    page.eval_on_selector(
        "#cam-opacity", "s => { s.value = 70; s.dispatchEvent(new Event('input')); }"
    )
    assert page.eval_on_selector("#cam", "i => getComputedStyle(i).opacity") == "0.7"
    assert page.inner_text("#cam-opacity-value") == "70 %"
    box = page.eval_on_selector("#cam", "i => [i.offsetWidth, i.offsetHeight]")
    assert box == page.eval_on_selector("#radiograph", "i => [i.offsetWidth, i.offsetHeight]")
    assert "catches" in page.inner_text("#operating-point") or not system.real
    ui.shot("study.png")

    # r marks it read, stored with who; the worklist shows the tick.
    page.keyboard.press("r")
    page.wait_for_selector("li.review")
    assert page.inner_text("li.review").startswith("read by rad")
    page.keyboard.press("o")
    assert page.is_hidden("#cam")
    page.goto(live_server + "/")
    assert page.inner_text(f'tr[data-study-id="{expected[1]}"] td.read') == "✓"

    page.click("text=Log out")
    page.wait_for_url("**/login")
    page.goto(live_server + "/")
    assert "/login" in page.url
    ui.self_contained()
