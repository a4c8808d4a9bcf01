"""instructkit studio in a real browser (headless Chromium through Selenium), as a user clicks through it:
fill the New run form for a tiny-model run, see a validation message appear and clear, preview the data with
the supervised span highlighted, start the run, watch the loss chart gain points, stop it ("interrupted"),
resume it to completion, compare it with a second run, chat with it beside its base model, evaluate it,
export it, and delete the second run.

Screenshots go to $INSTRUCTKIT_STUDIO_SCREENSHOTS when set (`INSTRUCTKIT_STUDIO_SCREENSHOTS=docs/studio`
renews the README's), else to the test's temporary directory, so a test run leaves the tree clean.
Chromium and chromedriver come from Debian (tools/test_services.sh installs them as root); without them
these tests skip and say so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROWS, free_port, tiny_run_config, write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromium-driver (as root: bash tools/test_services.sh)")
STEPS = 100  # long enough to stop it partway (about 4 steps a second here), short enough to finish soon


def start_studio(cwd: Path, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "studio", "--runs", "runs", "--port", str(port),
                             *args], cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/static/studio.css", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the studio exited: {proc.stdout.read()}") from None
            time.sleep(0.3)
    raise AssertionError("the studio did not answer within 60 s")


def stop_studio(proc: subprocess.Popen, runs: Path) -> None:
    """Stop the studio, and any training it left (a failed test may leave one), by their own ids."""
    from instructkit.studio.runs import list_runs, lock_holder

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for name in list_runs(runs) if runs.is_dir() else []:
        pid = lock_holder(runs / name)
        if pid:
            os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    """A studio started the way a user starts it, in a project folder with configs/tiny.yaml."""
    root = tmp_path_factory.mktemp("studio")
    data = write_jsonl(root / "train.jsonl", ROWS)
    cfg = tiny_run_config(root, tiny_model_dir, data)
    cfg.update(run_name="tiny", output_dir="runs/tiny")
    cfg["data"]["val_size"] = 2  # eval loss joins the loss chart
    cfg["train"]["eval_steps"] = 10
    (root / "configs").mkdir()
    (root / "configs/tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = free_port()
    proc = start_studio(root, port)
    yield {"root": root, "url": f"http://127.0.0.1:{port}", "data": data}
    stop_studio(proc, root / "runs")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("INSTRUCTKIT_STUDIO_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(driver, condition, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d), message=what)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def field(driver, key: str):
    return css(driver, f'[data-key="{key}"]')


def type_into(driver, key: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = field(driver, key)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)


def error_of(driver, key: str):
    return css(driver, f'[data-error-for="{key}"]')


def status(driver) -> str:
    return css(driver, "#status").text


def points(driver, chart: str) -> int:
    found = driver.find_elements("css selector", f'[data-chart="{chart}"]')
    return int(found[0].get_attribute("data-points") or 0) if found else 0


def test_new_run_validates_as_the_user_types_previews_the_mask_and_starts(studio, browser, shots):
    browser.get(f"{studio['url']}/new?seed=configs/tiny.yaml")
    wait(browser, lambda d: "run_name: tiny" in css(d, "#yaml-preview").text, what="the YAML preview")
    type_into(browser, "run_name", "alpha")
    type_into(browser, "train.max_steps", str(STEPS))
    from selenium.webdriver.support.ui import Select

    Select(field(browser, "train.save_strategy")).select_by_value("steps")
    type_into(browser, "train.save_steps", "2")
    type_into(browser, "train.learning_rate", "-1")
    wait(browser, lambda d: error_of(d, "train.learning_rate").is_displayed(), 10, "the validation message")
    message = error_of(browser, "train.learning_rate").text
    assert "train.learning_rate" in message and "greater than 0" in message and "Fix: expected auto | float" in message
    assert not css(browser, "#start").is_enabled()  # no start with a bad value
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field(browser, "train.learning_rate"))
    browser.save_screenshot(str(shots / "new-run-validation.png"))
    type_into(browser, "train.learning_rate", "0.01")
    wait(browser, lambda d: not error_of(d, "train.learning_rate").is_displayed(), 10, "the message to clear")
    wait(browser, lambda d: css(d, "#start").is_enabled(), 10)
    preview = css(browser, "#yaml-preview").text
    assert f"max_steps: {STEPS}" in preview and "output_dir: runs/alpha" in preview and "learning_rate: 0.01" in preview

    css(browser, "#preview-data").click()
    wait(browser, lambda d: d.find_elements("css selector", "mark.supervised"), 60, "the highlighted spans")
    marks = [m.text for m in browser.find_elements("css selector", "mark.supervised")]
    assert marks[0] == "yes</s>" and marks[1] == "no</s>"  # exactly the answer and its end-of-turn token
    assert "### Response:" not in "".join(marks)
    assert "8" in css(browser, "#data-counts").text
    browser.execute_script("document.getElementById('data-preview').scrollIntoView()")
    browser.save_screenshot(str(shots / "data-preview.png"))

    css(browser, "#start").click()
    wait(browser, lambda d: "/run?name=alpha" in d.current_url, 20, "the run page")
    assert yaml.safe_load((studio["root"] / "runs/alpha/studio/config.yaml").read_text())["train"]["max_steps"] == STEPS


def hold_after(run_dir: Path, steps: int) -> int:
    """SIGSTOP the training process once `steps` loss lines are in its metrics.jsonl; its pid. The tiny run can
    do 100 steps in five seconds, faster than the page polls (every 3 s), so the test holds it at the points
    it looks at, as a slow real run would sit there; SIGCONT lets it go on."""
    from instructkit.studio.runs import lock_holder

    deadline = time.time() + 120
    while True:
        pid = lock_holder(run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().count('"loss"') if (run_dir / "metrics.jsonl").is_file() else 0
        if pid and lines >= steps:
            os.kill(pid, signal.SIGSTOP)
            return pid
        assert time.time() < deadline, f"the run did not reach {steps} steps"
        time.sleep(0.02)


def test_the_loss_chart_grows_stop_interrupts_and_resume_completes(studio, browser, shots):
    run_dir = studio["root"] / "runs/alpha"
    trainer = hold_after(run_dir, 4)
    try:
        wait(browser, lambda d: points(d, "loss") >= 4, 60, "loss points while training")
        first = points(browser, "loss")
        os.kill(trainer, signal.SIGCONT)
        trainer = hold_after(run_dir, first + 3)
        wait(browser, lambda d: points(d, "loss") > first, 60, "more loss points")
        assert status(browser) == "running" and css(browser, "#eta").text != "-"
        assert {"lr", "tokens_per_s"} <= {c.get_attribute("data-chart") for c in
                                          browser.find_elements("css selector", "[data-chart]")}
        browser.save_screenshot(str(shots / "run-live.png"))
        css(browser, "#stop").click()  # the SIGINT waits while the run is held, and acts mid-run when it goes on
        wait(browser, lambda d: "stopping" in css(d, "#message").get_attribute("textContent").lower(), 20,
             "the studio's answer to Stop")
    finally:
        os.kill(trainer, signal.SIGCONT)
    wait(browser, lambda d: status(d) == "interrupted", 60, "interrupted")
    stopped = points(browser, "loss")
    assert stopped < STEPS and "stopped by SIGINT" in css(browser, "#log").text
    css(browser, "#resume").click()
    wait(browser, lambda d: status(d) == "completed", 180, "completed")
    wait(browser, lambda d: points(d, "loss") == STEPS, 10)
    assert "eval_loss" in css(browser, '[data-chart="loss"]').text  # evaluations drawn on the loss chart
    assert points(browser, "eval_exact_match") == STEPS // 10  # and every other key training logs
    assert (studio["root"] / "runs/alpha/final").is_dir()


def test_a_second_run_from_the_first_and_compare(studio, browser, shots):
    browser.get(f"{studio['url']}/new?from_run=alpha")
    wait(browser, lambda d: "run_name: alpha-2" in css(d, "#yaml-preview").text)
    type_into(browser, "train.max_steps", "12")
    type_into(browser, "train.learning_rate", "0.003")
    wait(browser, lambda d: "learning_rate: 0.003" in css(d, "#yaml-preview").text, 10)
    css(browser, "#start").click()
    wait(browser, lambda d: "name=alpha-2" in d.current_url, 20)
    wait(browser, lambda d: status(d) == "completed", 180, "the second run to complete")

    browser.get(studio["url"] + "/")
    wait(browser, lambda d: d.find_elements("css selector", 'input[value="alpha"]'), 10, "the runs list")
    for name in ("alpha", "alpha-2"):
        css(browser, f'input[value="{name}"]').click()
    css(browser, "#compare").click()
    wait(browser, lambda d: points(d, "loss") == STEPS, 30, "the overlaid loss curves")
    diff = css(browser, "#config-diff").text
    assert "train.learning_rate" in diff and "train.max_steps" in diff and "0.003" in diff
    browser.save_screenshot(str(shots / "compare.png"))


def test_chat_beside_the_base_model_then_evaluate_and_open_the_report(studio, browser, shots):
    browser.get(f"{studio['url']}/chat?name=alpha")
    css(browser, "#max-new").clear()
    css(browser, "#max-new").send_keys("12")
    css(browser, "#prompt").send_keys("Say yes.")
    css(browser, "#send").click()
    wait(browser, lambda d: len(d.find_elements("css selector", ".bubble.model")) == 2, 120, "both answers")
    assert not browser.find_elements("css selector", ".bubble.error")
    browser.save_screenshot(str(shots / "chat.png"))

    css(browser, "#eval-data").send_keys(str(studio["data"]))
    css(browser, "#run-eval").click()
    wait(browser, lambda d: d.find_elements("css selector", "#open-report"), 240, "the evaluation and report")
    css(browser, "#open-report").click()
    wait(browser, lambda d: "instructkit report" in d.title, 20)
    assert "Before and after" in browser.page_source
    browser.get(f"{studio['url']}/run?name=alpha")
    wait(browser, lambda d: css(d, "#report-link").is_displayed(), 10, "the report link on the run page")


def test_export_merges_and_writes_gguf_with_the_resulting_paths(studio, browser, shots):
    browser.get(f"{studio['url']}/export?name=alpha")
    css(browser, "#run-gguf").click()
    wait(browser, lambda d: "completed" in css(d, "#job-gguf").text, 180, "the GGUF export")
    gguf = studio["root"] / "runs/alpha/export/alpha-f16.gguf"
    assert gguf.is_file() and "Result: runs/alpha/export/alpha-f16.gguf" in css(browser, "#job-gguf").text
    css(browser, "#run-merge").click()
    wait(browser, lambda d: "completed" in css(d, "#job-merge").text, 180, "the merge")
    assert (studio["root"] / "runs/alpha/export/merged/config.json").is_file()
    browser.save_screenshot(str(shots / "export.png"))


def test_delete_asks_first_and_removes_the_run(studio, browser):
    browser.get(f"{studio['url']}/run?name=alpha-2")
    wait(browser, lambda d: css(d, "#delete").is_displayed(), 10)
    css(browser, "#delete").click()
    browser.switch_to.alert.dismiss()  # "Cancel": nothing happens
    time.sleep(0.5)
    assert (studio["root"] / "runs/alpha-2").is_dir()
    css(browser, "#delete").click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: d.current_url.rstrip("/") == studio["url"], 20, "back to the runs list")
    assert not (studio["root"] / "runs/alpha-2").exists() and (studio["root"] / "runs/alpha").is_dir()
    assert "alpha-2" not in css(browser, "table.runs").text
