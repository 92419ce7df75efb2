"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

The server runs with an API key, as a deployment would: the page must ask for it once. A file is
uploaded through the page and its transcript compared with the API's for the same file; the SRT
download is parsed and equal to the API's SRT; an oversized file shows the error line. The
microphone is Chromium's fake capture device playing a WAV of speech: partial text shows (grey),
then finals (black), equal to offline transcription (the API, Silero VAD) of the audio the page
sent, which the page offers as a WAV. The Speakers box shows only on a server with CAM++, and then
labels and colours each segment with the API's speaker. The screenshot for the README is taken here
(FUNASR_UPDATE_SCREENSHOT=1 writes docs/page.png).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import srt
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from funasr_nano.audio.load import load_audio
from tests.server_process import KEY, ROOT, Server

SR = 16000
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "page.png"


@pytest.fixture(scope="module")
def speech_wav(zh_mp3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake microphone plays once: silence, two stretches of speech apart, silence (16-bit)."""
    wave = load_audio(zh_mp3)
    silence = np.zeros(int(1.5 * SR), np.float32)
    audio = np.concatenate([silence, wave[: 6 * SR], silence, wave[6 * SR:], silence, silence])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def server(tiny_models: Path):
    srv = Server(tiny_models, "--api-key", KEY, "--max-upload-mb", "1", "--max-new-tokens", "16")
    yield srv
    assert srv.stop() in (0, -signal.SIGTERM), srv.output()
    assert "Traceback" not in srv.output()


@pytest.fixture(scope="module")
def browser(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory):
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), (
        "the page tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,640",
                 "--lang=en-US", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={speech_wav}%noloop",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 120.0, what: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        pytest.fail(f"timed out waiting for {what}; the page's error line: {error!r}")


def state(driver) -> str:
    return driver.find_element(By.ID, "transcript").get_attribute("data-state")


def blob_bytes(driver, element_id: str) -> bytes:
    """The content of a download link (a blob: URL), read in the page."""
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById(arguments[0]).href).then(r => r.arrayBuffer()).then(buffer => {
          let binary = ""; new Uint8Array(buffer).forEach(b => binary += String.fromCharCode(b)); done(btoa(binary));
        });""", element_id)
    return base64.b64decode(data)


def api(server: Server, path: Path | str, data: bytes | None = None, **fields: str) -> httpx.Response:
    content = data if data is not None else Path(path).read_bytes()
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"},
                          files={"file": (Path(path).name, content)}, data={"model": "fun-asr-nano", **fields},
                          timeout=300)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def page(browser, server: Server):
    """The page, its API key given once in its form."""
    browser.get(server.url + "/")
    key_form = browser.find_element(By.ID, "key-form")
    wait_for(browser, lambda d: key_form.is_displayed(), 30, "the API key form")
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    key_form.submit()
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Ready"), 30, "the ready status")
    assert not key_form.is_displayed()
    browser.refresh()  # the key is kept for the tab's session, never put in a URL
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Ready"), 30, "ready after reload")
    assert not browser.find_element(By.ID, "key-form").is_displayed() and KEY not in browser.current_url
    return browser


def test_uploaded_file_streams_the_apis_transcript_and_its_srt(page, server: Server, zh_mp3: Path, tmp_path: Path):
    want = api(server, zh_mp3, response_format="verbose_json").json()
    want_srt = api(server, zh_mp3, response_format="srt").text
    Select(page.find_element(By.ID, "format")).select_by_value("srt")
    page.find_element(By.ID, "file").send_keys(str(zh_mp3))
    page.find_element(By.ID, "transcribe").click()
    wait_for(page, lambda d: state(d) == "done", 300, "the transcript")
    rows = page.find_elements(By.CSS_SELECTOR, "#transcript li.final")
    assert [r.find_element(By.CLASS_NAME, "text").text for r in rows] == [s["text"].strip() for s in want["segments"]]
    assert rows[0].find_element(By.CLASS_NAME, "time").text.startswith("00:0")
    link = page.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "zh_news_10s.srt"
    got_srt = blob_bytes(page, "download").decode()
    cues = list(srt.parse(got_srt))
    assert cues and got_srt == want_srt
    page.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("FUNASR_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "page.png", SCREENSHOT)
    Select(page.find_element(By.ID, "format")).select_by_value("txt")
    assert blob_bytes(page, "download").decode() == want["text"] + "\n"
    Select(page.find_element(By.ID, "format")).select_by_value("json")
    assert json.loads(blob_bytes(page, "download"))["segments"] == want["segments"]


def test_an_oversized_file_shows_one_error_line(page, tmp_path: Path):
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(int(1.5 * 2**20)))
    page.find_element(By.ID, "file").send_keys(str(big))
    page.find_element(By.ID, "transcribe").click()
    error = page.find_element(By.ID, "error")
    wait_for(page, lambda d: error.is_displayed(), 30, "the error line")
    assert "big.wav" in error.text and "limit of 1 MB" in error.text and "\n" not in error.text


def test_an_unsupported_file_shows_the_apis_error(page, tmp_path: Path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 100)
    page.find_element(By.ID, "file").send_keys(str(text))
    page.find_element(By.ID, "transcribe").click()
    error = page.find_element(By.ID, "error")
    wait_for(page, lambda d: error.is_displayed() and "notes.wav" in error.text, 60, "the API's error")
    assert error.text.startswith("400") and "\n" not in error.text


def test_microphone_shows_partials_then_the_offline_segments(page, server: Server):
    page.find_element(By.ID, "record").click()
    wait_for(page, lambda d: int(d.find_element(By.ID, "transcript").get_attribute("data-partials")) > 0, 60,
             "partial text")
    partial = wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript li.partial .text"), 30,
                       "a partial row")
    grey = partial[0].value_of_css_property("color") if partial else ""
    level = page.find_element(By.ID, "level").value_of_css_property("width")
    # the fake device plays the WAV once (~16 s of audio); both stretches of speech end before the stop
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript li.final")) >= 2, 120,
             "two final segments")
    time.sleep(3.0)
    page.find_element(By.ID, "stop").click()
    wait_for(page, lambda d: d.find_element(By.ID, "record").is_enabled(), 60, "the recording to end")
    finals = page.find_elements(By.CSS_SELECTOR, "#transcript li.final .text")
    black = finals[0].value_of_css_property("color")
    recording = blob_bytes(page, "recording")
    wave, rate = sf.read(io.BytesIO(recording), dtype="float32")
    assert rate == SR and len(wave) > 10 * SR
    offline = api(server, "recording.wav", recording, response_format="verbose_json").json()["segments"]
    assert [f.text for f in finals] == [s["text"].strip() for s in offline]
    assert grey == "rgba(142, 142, 147, 1)" and black == "rgba(29, 29, 31, 1)"
    assert level != "0px"
    assert not page.find_element(By.ID, "error").is_displayed()


def test_labels_switch_between_english_and_chinese(page):
    toggle = page.find_element(By.ID, "lang-toggle")
    toggle.click()
    assert page.find_element(By.CSS_SELECTOR, "#file-panel h2").text == "文件"
    assert page.find_element(By.ID, "record").text == "录音"
    toggle.click()
    assert page.find_element(By.CSS_SELECTOR, "#file-panel h2").text == "File"


def test_the_websocket_takes_the_key_as_a_subprotocol(server: Server):
    """What a browser can send (it cannot set headers on a WebSocket); a wrong key is refused."""
    import asyncio

    import websockets

    async def first_event(key: str) -> tuple[dict, str | None]:
        url = server.url.replace("http", "ws") + "/v1/realtime?intent=transcription"
        async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{key}"]) as ws:
            return json.loads(await ws.recv()), ws.subprotocol

    accepted, protocol = asyncio.run(first_event(KEY))
    refused, _ = asyncio.run(first_event("wrong"))
    assert accepted["type"] == "session.created" and protocol == "realtime"
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_api_key"


def test_no_ui_serves_no_page(tiny_models: Path):
    srv = Server(tiny_models, "--no-ui")
    try:
        assert httpx.get(srv.url + "/", timeout=10).status_code == 404
        assert httpx.get(srv.url + "/ui/page.js", timeout=10).status_code == 404
    finally:
        srv.stop()


def test_speakers_box_labels_and_colours_each_speaker(page, server: Server, dialogue: Path, diarize_models: Path):
    """A server without CAM++ shows no speakers box; one with it (the dialogue's model folder) does, and a
    file transcribed with it checked gets each row's speaker (the API's, verbose_json with diarize=true)
    as a "Speaker N" label in that speaker's colour, and a txt download of turns."""
    assert not page.find_element(By.ID, "speakers-option").is_displayed()
    srv = Server(diarize_models, "--gguf", str(diarize_models / "qwen3-0.6b-asr.f32.gguf"), "--vad", "fsmn",
                 "--max-new-tokens", "4")
    try:
        want = httpx.post(f"{srv.url}/v1/audio/transcriptions", files={"file": (dialogue.name, dialogue.read_bytes())},
                          data={"model": "fun-asr-nano", "response_format": "verbose_json", "diarize": "true"},
                          timeout=300).json()["segments"]
        page.get(srv.url + "/")
        wait_for(page, lambda d: d.find_element(By.ID, "status").text.startswith("Ready"), 30, "the ready status")
        box = page.find_element(By.ID, "speakers-option")
        assert box.is_displayed() and box.text == "Speakers"
        page.find_element(By.ID, "speakers").click()
        page.find_element(By.ID, "file").send_keys(str(dialogue))
        page.find_element(By.ID, "transcribe").click()
        wait_for(page, lambda d: state(d) == "done", 300, "the transcript")
        rows = page.find_elements(By.CSS_SELECTOR, "#transcript li.final")
        assert [r.get_attribute("data-speaker") for r in rows] == [str(s["speaker"]) for s in want]
        assert [r.find_element(By.CLASS_NAME, "speaker").text for r in rows] == [f"Speaker {s['speaker'] + 1}"
                                                                                for s in want]
        colours = {r.get_attribute("data-speaker"): r.value_of_css_property("border-left-color") for r in rows}
        assert colours["0"] == "rgba(0, 113, 227, 1)" and len(set(colours.values())) == len(colours)
        Select(page.find_element(By.ID, "format")).select_by_value("txt")
        assert blob_bytes(page, "download").decode().startswith("Speaker 1: ")
    finally:
        assert srv.stop() in (0, -signal.SIGTERM), srv.output()
        page.get(server.url + "/")  # the module's page again, its key kept for the tab
        wait_for(page, lambda d: d.find_element(By.ID, "status").text.startswith("Ready"), 30, "ready again")
