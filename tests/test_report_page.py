"""The run page (``dynapipe.viz.write_report``) read in a real browser: headless Chromium, driven by selenium.

A 2-rank pipelined run over gloo writes the page (each rank calls ``write_report``; rank 0 writes). The
browser opens it and the test reads it as a person would: no console error, one stage card per stage
and one lane per rank, an action's tooltip on hover, a stage's details on a click, a screenshot that is
not blank. Where no Chromium (and its chromedriver) is installed the browser test skips, naming the
command that installs them; CI installs them (``.ci/run``) and sets ``DYNAPIPE_REQUIRE_BROWSER=1``, which
turns that skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from harness import run_distributed

from dynapipe.errors import ConfigError
from dynapipe.schedules import Timeline
from dynapipe.viz import load_run, report_html, write_report
from dynapipe.viz.__main__ import main as cli

INSTALL = "apt-get install -y chromium chromium-driver"


def _train_and_report(rank: int, world: int, out: str) -> str | None:
    from models import mlp

    torch.set_num_threads(1)
    case = mlp(world)
    reports: list = []
    options = {"schedule": "1f1b", "n_microbatches": 4, "split_points": case.split_points}
    step = torch.compile(case.step, backend="dynapipe", options={**options, "on_step": reports.append})
    for _ in range(2):  # the first step also captures and partitions: report a steady one
        step(*case.args).backward()
    path = write_report(Path(out) / "run.html", reports[-1], options=options, title="test run")
    return None if path is None else str(path)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    results = run_distributed(_train_and_report, 2, str(out), timeout=120)
    assert results[1] is None and results[0] == str(out / "run.html")
    return Path(results[0])


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through its chromedriver; checked before the run, so a skip costs nothing."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        message = (
            f"no headless Chromium with chromedriver and selenium: `{INSTALL}`, `pip install -e '.[test]'`"
        )
        if os.environ.get("DYNAPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


_VARIANCE_JS = """
const done = arguments[arguments.length - 1], img = new Image();
img.onload = () => {
  const c = document.createElement("canvas"); c.width = img.width; c.height = img.height;
  const g = c.getContext("2d"); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0;
  for (let i = 0; i < d.length; i += 4) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; s += v; s2 += v * v; }
  const n = d.length / 4;
  done([img.width, img.height, s2 / n - (s / n) ** 2]);
};
img.src = "data:image/png;base64," + arguments[0];
"""


def _hover(browser, element) -> str:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(browser).move_to_element(element).perform()
    tip = browser.find_element(By.ID, "tooltip")
    assert tip.is_displayed()
    return tip.text


def test_page_in_headless_chromium(browser, page):  # browser first: a skip comes before the run
    html = page.read_text()
    # self-contained: nothing is fetched (the only URL is the SVG namespace)
    assert not re.search(r"\s(src|href)\s*=", html)
    assert set(re.findall(r"https?://[\w./]+", html)) <= {"http://www.w3.org/2000/svg"}
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(page.as_uri())
    css = lambda q: browser.find_elements(By.CSS_SELECTOR, q)  # noqa: E731
    assert len(css("#partition rect.stage")) == 2  # one card per stage
    assert [lane.get_attribute("data-rank") for lane in css(".lane")] == ["0", "1"]
    forward = max(css(".act.compute.kind-F"), key=lambda a: a.size["width"])
    tip = _hover(browser, forward)
    assert re.search(r"forward of microbatch \d on stage \d", tip) and "start" in tip and "duration" in tip
    receive = css('.lane[data-rank="1"] .act.recv.kind-RECV_F')[0]
    tip = _hover(browser, receive)
    assert "receive of activations" in tip and "from stage 0 (rank 0)" in tip
    assert re.search(r"waited [\d.]+ \S+ for stage 0 on rank 0|no wait", tip)
    ActionChains(browser).move_to_element(css('#partition rect.stage[data-stage="1"]')[0]).click().perform()
    details = browser.find_element(By.ID, "stage-details").text
    for text in ("Stage 1", "head.weight", "Receives", "← stage 0 (rank 0)", "forward", "optimizer state"):
        assert text in details, (text, details)
    assert css(".act.dim") and css('.act.compute[data-stage="1"]:not(.dim)')  # the stage marked on the lanes
    ticks = [tick.text.split() for tick in css("#axis span")][1:]
    assert len(ticks) >= 4 and len({unit for _, unit in ticks}) == 1  # one unit along the time axis
    assert "bubble" in browser.find_element(By.CSS_SELECTOR, "#stage-table .step-row").text
    assert torch.__version__ in browser.find_element(By.ID, "versions").text
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight") + 40)
    browser.save_screenshot(str(page.with_suffix(".png")))
    width, height, variance = browser.execute_async_script(_VARIANCE_JS, browser.get_screenshot_as_base64())
    assert width >= 1000 and height >= 900 and variance > 100  # not blank: a white page has 0


def test_saved_run_makes_the_page_again_from_the_command_line(page, tmp_path, capsys):
    run = load_run(page.with_suffix(".json"))
    assert run["format"] == "dynapipe-run" and run["schedule"] == "1f1b" and len(run["plan"]["stages"]) == 2
    assert {e["rank"] for e in run["timeline"]["events"]} == {0, 1}
    cli(["report", str(page.with_suffix(".json")), "-o", str(tmp_path / "again.html")])
    assert (tmp_path / "again.html").read_text() == report_html(run) == page.read_text()
    assert "wrote" in capsys.readouterr().out


def test_a_run_with_no_timeline_is_a_one_line_error(tmp_path):
    for nothing in (None, [], Timeline()):
        with pytest.raises(ConfigError, match="no timeline") as err:
            write_report(tmp_path / "run.html", nothing)
        assert "\n" not in str(err.value) and "on_step" in str(err.value)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="no saved dynapipe run"):
        load_run(tmp_path / "other.json")


def test_a_merged_timeline_without_a_plan_makes_a_page(tmp_path):
    from dynapipe.schedules import StageCost, get_schedule, simulate

    spec = get_schedule("1f1b")
    table = spec.build(n_ranks=2, n_stages=2, n_microbatches=4)
    timeline = simulate(table, StageCost(1.0, 1.0, 1.0), n_ranks=2, n_stages=2, placement=spec.placement)
    path = write_report(tmp_path / "sim.html", timeline, title="simulated 1f1b")
    run = load_run(tmp_path / "sim.json")
    assert run["plan"] is None and run["options"] is None and run["title"] == "simulated 1f1b"
    assert len(run["timeline"]["events"]) == len(timeline.events) == 2 * 2 * 4
    assert path is not None and report_html(run) == path.read_text()
