"""The studio page in a real browser (Debian's chromium + chromium-driver, driven by Selenium) on the real server.

The browser is installed with apt-get when it is missing and apt-get can run (as root); otherwise the
module is skipped with the reason. Writes benchmarks/results/studio.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "studio.png"
PIRATE = "Talk like a pirate in every answer."
CAPS = "WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS."


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages first when they are missing."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("browser tests need chromium and chromium-driver: `apt-get install -y chromium chromium-driver` "
                    "(apt-get is not available here, or not as root)")
    for cmd in (["apt-get", "install", "-y", "chromium", "chromium-driver"],
                ["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        subprocess.run(cmd, capture_output=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium"), shutil.which("chromedriver")
        if all(found):
            return found
    pytest.skip("apt-get could not install chromium and chromium-driver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (in the test extras)")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser()
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"]:
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    d.downloads = downloads
    yield d
    d.quit()


def wait(condition, timeout: float = 240, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def answer_of(d, column: str) -> str:
    el = d.find_element("id", f"answer-{column}")
    return el.text if el.get_attribute("data-done") == "1" else ""


def test_studio_in_a_browser(server, driver, tmp_path):
    from openai import OpenAI
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = driver
    d.get(server.base_url + "/t2l/")
    wait(lambda: d.find_element("id", "info").get_attribute("data-ready") == "1", 30, "the page to connect")

    # type a description and a question, see three answers stream in
    d.find_element("css selector", "#terms .description").send_keys(PIRATE)
    question = d.find_element("id", "question")
    question.clear()
    question.send_keys("Tell me about the sea.")
    d.find_element("id", "ask").click()
    answers = wait(lambda: all(a := [answer_of(d, c) for c in ("base", "system", "adapter")]) and a, what="3 answers")
    assert "error" not in d.find_element("id", "answer-adapter").get_attribute("class")
    assert "rank" in d.find_element("id", "adapter-meta").text

    # move the strength slider with the keyboard, as a user can; the adapter column answers again
    first_adapter = answers[2]
    slider = d.find_element("id", "strength")
    slider.send_keys(Keys.END)
    assert slider.get_attribute("value") == "4"
    wait(lambda: "strength=4" in (d.find_element("id", "answer-adapter").get_attribute("data-model") or "")
         and answer_of(d, "adapter"), what="the adapter answer at strength 4")
    strong = answer_of(d, "adapter")
    assert strong != first_adapter
    assert answer_of(d, "base") == answers[0]  # the other columns were not asked again

    # save as a catalog name and use it through the openai client
    name = f"pirate-{uuid.uuid4().hex[:6]}"
    d.find_element("id", "save-name").send_keys(name)
    d.find_element("id", "save").click()
    wait(lambda: "saved" in d.find_element("id", "status").text, 30, "the save")
    client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=f"t2l:@{name}", messages=[{"role": "user", "content":
                                           "Tell me about the sea."}], max_tokens=64, temperature=0,
                                           frequency_penalty=0.5)
    assert reply.choices[0].message.content.split() == strong.split()

    # download the PEFT folder and load it with peft
    Select(d.find_element("id", "format")).select_by_value("zip")
    d.find_element("id", "download").click()
    archive = wait(lambda: [p for p in d.downloads.glob(f"{name}.zip")], 60, "the download")[0]
    wait(lambda: not list(d.downloads.glob("*.crdownload")), 30, "the download to finish")
    zipfile.ZipFile(archive).extractall(tmp_path)
    folder = next(tmp_path.glob("t2l-*"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vllm_t2l.models import prepare_default_model

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(prepare_default_model()), folder)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)

    # add a description on top: two descriptions show the dial; moving it re-answers
    d.find_element("id", "add-term").click()
    d.find_elements("css selector", "#terms .description")[1].send_keys(CAPS)
    assert d.find_element("id", "dial-row").is_displayed()
    dial = d.find_element("id", "dial")
    dial.send_keys(Keys.END)
    wait(lambda: "t2l-mix" in (d.find_element("id", "answer-adapter").get_attribute("data-model") or "")
         and answer_of(d, "adapter"), what="the mixed adapter's answer")
    weights = [w.get_attribute("value") for w in d.find_elements("css selector", "#terms .weight")]
    assert weights == ["0", "1"]
    dial.send_keys(*[Keys.LEFT] * 6)  # 0.7 of the caps description on top of 0.3 pirate
    wait(lambda: "0.3*" in (d.find_element("id", "answer-adapter").get_attribute("data-model") or "")
         and answer_of(d, "adapter"), what="the dialled adapter's answer")
    d.find_element("id", "ask").click()
    wait(lambda: all(answer_of(d, c) for c in ("base", "system", "adapter")), what="3 answers for the mix")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(SCREENSHOT))
    http_delete(server, name)


def http_delete(server, name: str) -> None:
    import httpx

    httpx.delete(f"{server.base_url}/v1/t2l/catalog/{name}", timeout=30)
