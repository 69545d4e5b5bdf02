"""The chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium; nothing downloaded): a typed message gets a reply streamed in piece by piece, equal to the
API's, and picking a card shows its system prompt and answers as that card."""

import shutil
import time

import pytest

from lmstack.data.chat import prompt_ids, turn_end_id
from lmstack.generation import GenerationConfig, generate_tokens
from lmstack.generation.scheduler import Scheduler
from lmstack.serving.app import create_app, serve_in_thread

from .conftest import make_card, tiny_gpt

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no system Chromium + chromedriver (apt-get install chromium chromium-driver; .ci/run does)"
)
SYSTEM = "You are a pirate."


def reply(model, tok, messages, max_tokens):
    end = turn_end_id(tok)
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0, stop=(tok.decode([end]),))
    return generate_tokens(model, [prompt_ids(tok, messages)], config, tok)[0].text


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("the page did not get there in time")


def test_chat_page_streams_replies_and_switches_cards(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    model, tok = tiny_gpt(block_size=128)
    model.save(tmp_path / "tiny", tok)
    pirate = make_card(tmp_path / "tiny", model, tmp_path / "cards" / "pirate", "pirate", SYSTEM)
    scheduler = Scheduler(model, tok, max_batch=4)
    real_step = scheduler.step

    def slow_step():  # a pause per token, so the page can be seen filling in as the reply streams
        time.sleep(0.03)
        return real_step()

    scheduler.step = slow_step
    app = create_app(model, tok, scheduler, name="tiny", cards={"pirate": tmp_path / "cards" / "pirate"})
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        wait_for(lambda: len(Select(browser.find_element(By.ID, "model")).options) == 2)
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("40")

        def send(text):
            box = browser.find_element(By.ID, "input")
            box.send_keys(text)
            box.send_keys(Keys.ENTER)
            seen = []
            button = browser.find_element(By.ID, "go")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                if replies and (not seen or replies[-1].text != seen[-1]):
                    seen.append(replies[-1].text)
                if seen and button.is_enabled():
                    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("textContent"), seen
                time.sleep(0.005)
            raise AssertionError(f"no complete reply on the page; status: {browser.find_element(By.ID, 'status').text}")

        text, seen = send("hello")
        assert text == reply(model, tok, [{"role": "user", "content": "hello"}], 40) and text
        assert len([s for s in seen if s]) >= 2, f"the reply did not stream: {seen}"
        assert browser.find_element(By.ID, "system").text == "(none)"

        Select(browser.find_element(By.ID, "model")).select_by_value("pirate")
        assert browser.find_element(By.ID, "system").text == SYSTEM
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg")  # a new card starts a new chat
        text, _ = send("hello")
        assert text == reply(pirate, tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}], 40)
