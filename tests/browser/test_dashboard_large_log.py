"""A job's page when its log is bigger than what the page shows at first (`TAIL_BYTES`): its last
lines numbered as in the whole log, "Load earlier" bringing the rest in pieces down to line 1, and
a line anchor into the first piece once it is there. In a real headless Chromium against a hub
process, logged in at a real OpenID Connect provider (see `test_hub_dashboard.py`)."""

from __future__ import annotations

from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By

from runner.job import new_job_id
from runner.web.pages import EARLIER_BYTES, TAIL_BYTES

from .conftest import wait_until_page
from .test_hub_dashboard import HubDashboard, hub, log_in  # noqa: F401  (hub: the fixture)

# The tail, a whole piece of "Load earlier" and half a one: two clicks.
LOG_BYTES = TAIL_BYTES + EARLIER_BYTES + EARLIER_BYTES // 2


def numbered_log(size: int) -> bytes:
    """About `size` bytes whose line N says `line N`; the first line opens a collapsed group."""
    lines = [b"--- :hammer: build\n"]
    total = len(lines[0])
    while total < size:
        number = len(lines) + 1
        colour = b" \x1b[32mok\x1b[0m" if number % 10 == 0 else b""
        line = b"line %06d of a long build's output%s\n" % (number, colour)
        lines.append(line)
        total += len(line)
    return b"".join(lines)


# What the page shows: the number of lines, the first and last numbers, and the lines whose number
# (id, label) does not follow the one before or does not match what the line says.
SHOWN = """
const found = {count: 0, first: null, last: null, wrong: []};
let previous = null;
for (const line of document.querySelectorAll("#log-lines .line")) {
  const number = Number(line.querySelector(".ln").textContent);
  const text = line.querySelector(".text").textContent;
  const says = text.startsWith("line ") ? Number(text.slice(5, 11)) : 1;
  if (line.id !== "L" + number || says !== number || (previous !== null && number !== previous + 1)) {
    if (found.wrong.length < 5) { found.wrong.push([line.id, number, text.slice(0, 20)]); }
  }
  if (found.first === null) { found.first = number; }
  found.last = previous = number;
  found.count += 1;
}
return found;
"""


def shown(browser: webdriver.Chrome) -> dict[str, Any]:
    result: dict[str, Any] = browser.execute_script(SHOWN)
    return result


def test_a_large_logs_page_shows_its_end_then_the_rest_down_to_line_1(
        browser: webdriver.Chrome, hub: HubDashboard) -> None:  # noqa: F811
    log = numbered_log(LOG_BYTES)
    total = log.count(b"\n")
    job_id = hub.job(new_job_id(), account="climate", group="climate", log=log)

    log_in(browser, hub, "alice", f"/jobs/{job_id}")
    wait_until_page(browser, lambda page: page.find_elements(By.ID, f"L{total}"), "the log's last line")
    last = browser.find_element(By.ID, f"L{total}")
    assert last.find_element(By.CSS_SELECTOR, ".ln").text == str(total)
    assert last.find_element(By.CSS_SELECTOR, ".text").text.startswith(f"line {total:06d}")
    tail = shown(browser)
    assert tail["wrong"] == [] and tail["last"] == total and tail["first"] > 1
    # The tail starts with the first line that starts in the log's last TAIL_BYTES.
    start = len(log) - TAIL_BYTES
    assert tail["first"] == log[:start - 1].count(b"\n") + 2
    assert not browser.find_elements(By.ID, "L1")
    assert "are not shown" in browser.find_element(By.ID, "log-cut").text

    earlier = browser.find_element(By.ID, "load-earlier")
    first, clicks = tail["first"], 0
    while earlier.is_displayed():
        clicks += 1
        earlier.click()
        wait_until_page(browser, lambda page: page.find_elements(By.ID, f"L{first - 1}"),  # noqa: B023
                        f"line {first - 1} after 'Load earlier'")
        first = int(browser.find_element(By.CSS_SELECTOR, "#log-lines .line").get_attribute("id")[1:])
        assert clicks <= 2
    assert first == 1 and clicks == 2
    whole = shown(browser)
    assert (whole["wrong"], whole["first"], whole["last"], whole["count"]) == ([], 1, total, total)
    assert not browser.find_elements(By.ID, "log-cut")

    # A line of the first piece, inside its collapsed group: its anchor opens the group and shows it.
    target = browser.find_element(By.ID, "L5")
    assert not target.is_displayed()
    browser.get(f"{hub.url}/jobs/{job_id}#L5")
    wait_until_page(browser, lambda page: target.is_displayed()
                    and "target" in (target.get_attribute("class") or ""), "line 5 shown by its anchor")
    # The same page (the fragment only changed), with line 5 in the window.
    assert browser.find_elements(By.ID, "L1")
    top, bottom, height = browser.execute_script(
        "const box = arguments[0].getBoundingClientRect(); return [box.top, box.bottom, window.innerHeight];",
        target)
    assert top >= 0 and bottom <= height
