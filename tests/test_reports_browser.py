"""The HTML worklist in a real browser: Debian's chromium, headless, driven by Playwright.

The page comes from `cxr worklist --format html` on a database of 20 studies screened by
the real intake and worker code. Where chromium or Playwright is missing the test skips,
except under CI=true (.ci/run installs both), where it fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests import reportdb
from tests.conftest import IN_CI
from tests.stack import clean_env, cxr

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def need(what: str, how: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true installs {what}, but it is missing: {how}")
    pytest.skip(f"{what} is missing: {how}")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        need("chromium", "apt-get install -y chromium (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright", "pip install -e '.[test]'")
    exe = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def worklist_html(tmp_path_factory, tiny_bundle) -> Path:
    db = reportdb.build(tmp_path_factory.mktemp("browser") / "var", tiny_bundle)
    out = db.settings.home.parent / "worklist.html"
    cxr("worklist", "--format", "html", "--limit", "0", "--out", str(out), env=clean_env(**db.env))
    return out


def column_values(page, table: str, label: str) -> list[str]:
    """The data-v of one column, in the rows' current order (visible rows only)."""
    return page.evaluate(
        """([table, label]) => {
            const t = document.getElementById(table);
            const i = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent.trim() === label);
            return Array.from(t.tBodies[0].rows).filter(r => !r.hidden).map(r => r.cells[i].getAttribute('data-v'));
        }""", [table, label])


def test_worklist_renders_sorts_and_filters_in_chromium(browser, worklist_html, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(worklist_html.as_uri(), wait_until="load")

    shot = tmp_path / "worklist.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.width >= 1400 and im.height > 2000  # 20 rows with thumbnails, full page
        assert im.convert("L").getextrema()[1] - im.convert("L").getextrema()[0] > 100

    # All 20 rows render, each with a decoded thumbnail (heatmap or placeholder) on screen.
    assert page.locator("table.wl tbody tr").count() == reportdb.N_STUDIES
    imgs = page.evaluate("""() => Array.from(document.querySelectorAll('table.wl tbody tr')).map(r => {
        const img = r.querySelector('img'); const box = img.getBoundingClientRect();
        return {complete: img.complete, w: img.naturalWidth, h: img.naturalHeight, kind: img.dataset.kind,
                shownW: box.width, shownH: box.height, rowH: r.getBoundingClientRect().height};
    })""")
    assert len(imgs) == 20
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 and i["shownW"] > 50 and i["rowH"] > 50 for i in imgs), imgs
    assert sum(i["kind"] == "heatmap" for i in imgs) == 15 and sum(i["kind"] == "placeholder" for i in imgs) == 5
    assert page.locator("#disclaimer").is_visible()
    assert "not for clinical use" in page.locator("#disclaimer").inner_text()

    # Initial order: flagged first, then by risk.
    initial = column_values(page, "scored", "#")
    assert initial == [str(i) for i in range(1, 16)]
    flags = [int(v) for v in column_values(page, "scored", "Flag")]
    assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < 15

    # Clicking a header re-sorts: P(Normal) high to low, then (again) low to high.
    header = page.locator("#scored thead th", has_text="P(Normal)")
    header.click()
    p_normal = [float(v) for v in column_values(page, "scored", "P(Normal)")]
    assert p_normal == sorted(p_normal, reverse=True)
    assert column_values(page, "scored", "#") != initial
    assert header.get_attribute("aria-sort") == "descending"
    header.click()
    p_normal = [float(v) for v in column_values(page, "scored", "P(Normal)")]
    assert p_normal == sorted(p_normal) and header.get_attribute("aria-sort") == "ascending"
    # By file name, and back to the worklist order.
    page.locator("#scored thead th", has_text="Study").click()
    names = column_values(page, "scored", "Study")
    assert names == sorted(names) and len(set(names)) == 15
    page.locator("#scored thead th", has_text="#").click()
    assert column_values(page, "scored", "#") == initial

    # Filters: status, flag, text.
    page.select_option("#status-filter", "failed")
    assert page.locator("table.wl tbody tr:visible").count() == 2 and page.inner_text("#shown") == "2"
    page.select_option("#status-filter", "")
    page.check("#flagged-only")
    assert page.locator("table.wl tbody tr:visible").count() == sum(flags)
    page.uncheck("#flagged-only")
    page.fill("#q", "one_pixel")
    assert page.locator("table.wl tbody tr:visible").count() == 1
    assert "too_small" in page.locator("table.wl tbody tr:visible").inner_text()
    page.fill("#q", "")
    assert page.locator("table.wl tbody tr:visible").count() == 20

    # Self-contained: the page itself is the only thing loaded; no script errors.
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
    assert [u for u in requests if u.startswith("file://")] == [worklist_html.as_uri()]
    assert errors == []
    page.close()
