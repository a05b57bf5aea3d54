"""The page in a real browser: headless Chromium driven by selenium against serve.py on a tiny checkpoint.
A typed message, an uploaded image, a dropped file and a microphone recording (Chromium's fake device)
each get their answer streamed into the page, equal to what the API answers for the same conversation;
the runs view draws the loss curves. Skipped when Chromium, chromedriver or selenium is missing."""
import base64
import http.client
import io
import json
import shutil
import struct
import wave

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no Chromium here: apt-get install -y chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

MAX_NEW = 6
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,850",
         # a microphone that needs no permission prompt and plays a beep: what the recording test records
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def port(serve):
    return serve(f"--max_new_tokens={MAX_NEW}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # both paths given: selenium never looks for (or downloads) a browser or a driver itself
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def api_answer(port: int, task: str, turns: list[dict]) -> str:
    """The greedy answer of POST /api/chat for this conversation: what the page must show."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/chat", json.dumps({"task": task, "temperature": 0, "max_new_tokens": MAX_NEW,
                                                  "turns": turns}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    events = [json.loads(b.removeprefix("data: ")) for b in response.read().decode().split("\n\n") if b]
    conn.close()
    assert response.status == 200 and events[-1]["done"], events
    return "".join(e.get("text", "") for e in events)


def wait(driver, condition, timeout: float = 30):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def open_chat(driver, port: int, task: str) -> None:
    driver.get(f"http://127.0.0.1:{port}/")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 4)
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    temperature = driver.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")


def send(driver, text: str) -> tuple[str, str]:
    """Type text, press Send, wait for the answer to finish; (the answer's text, its status line)."""
    n = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: d.find_element(By.ID, "send").text == "Send"
         and len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == n + 1)
    answer = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    return answer.find_element(By.CLASS_NAME, "text").text, answer.find_element(By.CLASS_NAME, "meta").text


def pending(driver, kind: str) -> list[str]:
    """The base64 files attached to the message being written (the page's own state)."""
    return driver.execute_script(f"return state.pending.{kind}.map((f) => f.base64)")


def drop(driver, name: str, mime: str, data: bytes) -> None:
    """Drop a file on the chat as a user dragging it from their desktop would."""
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], {type: arguments[2]}));
        document.getElementById("chat-view").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, base64.b64encode(data).decode(), name, mime)


def test_text_then_image_in_one_conversation(browser, port, tiny_run):
    open_chat(browser, port, "image")
    history = [{"role": "user", "text": "Say 2."}]
    expected = api_answer(port, "image", history)
    text, meta = send(browser, "Say 2.")
    assert text == (expected or "(empty answer)") and "tokens in" in meta
    history.append({"role": "assistant", "text": expected})
    image = tiny_run.images["red"]
    browser.find_element(By.ID, "image-input").send_keys(str(image))
    wait(browser, lambda d: len(pending(d, "images")) == 1)
    assert base64.b64decode(pending(browser, "images")[0]) == image.read_bytes()
    history.append({"role": "user", "text": "What color is it?", "images": [base64.b64encode(image.read_bytes()).decode()]})
    expected = api_answer(port, "image", history)
    text, meta = send(browser, "What color is it?")
    assert text == (expected or "(empty answer)") and "tokens in" in meta
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user img")  # the picture shows in the conversation
    assert browser.find_element(By.ID, "attachments").text == ""


def test_old_turns_left_out_of_a_full_context_are_greyed(browser, port):
    open_chat(browser, port, "text")
    long = " ".join(f"word{i}" for i in range(12))  # about 80 tokens: two of them overflow 128
    send(browser, long)
    _, meta = send(browser, long)
    assert "the first 2 turns were left out to fit the 128-token context" in meta and "tokens in" in meta
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.dropped")) == 2
    assert browser.execute_script("return state.turns.filter((t) => !t.dropped).length") == 2


def test_dropped_files_and_a_bad_one(browser, port, tiny_run):
    open_chat(browser, port, "image")
    drop(browser, "notes.txt", "text/plain", b"hello")
    wait(browser, lambda d: "not an image or an audio file" in d.find_element(By.ID, "chat-error").text)
    drop(browser, "fake.png", "image/png", b"not a png at all")
    wait(browser, lambda d: len(pending(d, "images")) == 1)
    text, meta = send(browser, "What color is it?")
    assert meta.startswith("400: not an image Pillow can read")
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user.failed")
    assert browser.execute_script("return state.turns.length") == 0  # the failed question left the history
    drop(browser, "green.png", "image/png", tiny_run.images["green"].read_bytes())
    wait(browser, lambda d: len(pending(d, "images")) == 1)
    expected = api_answer(port, "image", [{"role": "user", "text": "What color is it?",
                                           "images": [base64.b64encode(tiny_run.images["green"].read_bytes()).decode()]}])
    text, meta = send(browser, "What color is it?")
    assert text == (expected or "(empty answer)") and "tokens in" in meta


def test_recording_from_the_microphone(browser, port):
    open_chat(browser, port, "audio")
    browser.find_element(By.ID, "record").click()
    wait(browser, lambda d: d.find_element(By.ID, "record").text == "Stop recording")
    browser.execute_script("return new Promise((resolve) => setTimeout(resolve, 1200))")
    browser.find_element(By.ID, "record").click()
    wait(browser, lambda d: len(pending(d, "audio")) == 1)
    wav = base64.b64decode(pending(browser, "audio")[0])
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav[36:40] == b"data"
    assert struct.unpack("<IHHIIHH", wav[16:36]) == (16, 1, 1, 16000, 32000, 2, 16)  # PCM, mono, 16 kHz, 16-bit
    with wave.open(io.BytesIO(wav)) as w:
        seconds = w.getnframes() / w.getframerate()
        samples = w.readframes(w.getnframes())
    assert 0.8 < seconds < 3.0 and any(samples), seconds  # the fake device's beep, not silence
    expected = api_answer(port, "audio", [{"role": "user", "text": "Which tone?", "audio": [base64.b64encode(wav).decode()]}])
    text, meta = send(browser, "Which tone?")
    assert text == (expected or "(empty answer)") and "tokens in" in meta
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user audio")


def test_runs_view_draws_the_curves(browser, port):
    browser.get(f"http://127.0.0.1:{port}/#runs")
    wait(browser, lambda d: "tiny" in d.find_element(By.ID, "run-list").text)
    wait(browser, lambda d: "train all" in d.find_element(By.ID, "legend").text)
    assert "step 8" in browser.find_element(By.ID, "run-list").text
    painted = browser.execute_script("""
        const c = document.getElementById("loss-chart");
        const pixels = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < pixels.length; i += 4) n += pixels[i] > 0;
        return n;""")
    assert painted > 1000
    evaluation = browser.find_element(By.ID, "eval-table").text
    assert "image" in evaluation and "val_loss" in evaluation
