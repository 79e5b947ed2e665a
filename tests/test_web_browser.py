"""The browser page in a real browser (issue 9): Debian's chromium, headless, driven by selenium
through chromium-driver, against a real front (`e2vd web`, started as systemd starts it) and a
real daemon on the tiny stand-in behind `systemd-socket-activate` (so the test sees what wakes it).

One browser serves the whole module, in order: the page loads and no daemon process exists;
it is usable by keyboard and fits a phone; a WAV uploaded and recognised shows the top label and
nine sorted bars; the embedding downloads as a .npy that numpy reads back equal to the daemon's
JSON (frame and utterance); a text file and an empty file show the daemon's message beside the
button; a recording from Chromium's fake microphone gives a result.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import speechlike, wav_clip
from daemon_proc import http_request
from webfront import ActivatedDaemon, FrontProcess, chromium_unavailable, start_chromium

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")]
WAIT_S = 180.0   # a cold start of the daemon on a busy 2-core machine
MAX_BODY_BYTES = 2_000_000   # small, so that "a file over max_body_bytes" stays quick


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def daemon(tiny_model, work):
    with ActivatedDaemon(work / "e2vd.sock", tiny_model, idle_timeout=600, max_body_bytes=MAX_BODY_BYTES) as d:
        yield d


@pytest.fixture(scope="module")
def front(daemon, work):
    config = work / "e2vd.toml"   # the front reads max_body_bytes where the daemon does
    config.write_text(f"max_body_bytes = {MAX_BODY_BYTES}\n")
    with FrontProcess(daemon.socket, work, env={"E2VD_CONFIG": str(config)}) as f:
        yield f


@pytest.fixture(scope="module")
def browser(work):
    reason = chromium_unavailable()
    if reason:
        pytest.skip(reason)
    mic = work / "mic.wav"   # what the fake microphone plays: 48 kHz 16-bit, as a sound card gives it
    sf.write(str(mic), speechlike(4.0, sr=48000, seed=7)[:, 0], 48000, subtype="PCM_16")
    (work / "downloads").mkdir()
    driver = start_chromium(work / "profile", work / "downloads", fake_audio=mic)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, what: str, cond, timeout: float = 30.0):
    """Poll `cond(driver)` until it is truthy; its value. Fails naming `what` and the page's state."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond(driver)
        except Exception:  # noqa: BLE001 - the page may be between states
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            text = driver.find_element("tag name", "body").text
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; the page says:\n{text}")
        time.sleep(0.1)


def by_id(driver, id_: str):
    return driver.find_element("id", id_)


def recognize(driver, *, timeout: float = WAIT_S) -> str:
    """Press Recognize; wait for the answer (a new history entry, or a message beside the
    button); the progress line as it ended."""
    entries = len(driver.find_elements("css selector", "#history li"))
    by_id(driver, "go").click()
    wait(driver, "the answer", lambda d: len(d.find_elements("css selector", "#history li")) > entries
         or by_id(d, "message").text, timeout)
    return by_id(driver, "progress").text


def test_the_page_loads_and_no_daemon_process_exists_afterwards(browser, front, daemon):
    browser.get(front.url)
    wait(browser, "the badge", lambda d: "checking" not in by_id(d, "badge-text").text)
    assert browser.title.startswith("e2vd")
    assert by_id(browser, "go").is_enabled()
    time.sleep(3.5)   # at least one more badge poll
    assert not daemon.started, "opening the page (and its badge) woke the daemon"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors   # no CSP violation, no failed request


def test_the_page_is_usable_by_keyboard_and_fits_a_phone(browser, front):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.get(front.url)
    seen = []
    for _ in range(12):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        el = browser.switch_to.active_element
        seen.append(el.get_attribute("id") or el.get_attribute("value") or el.tag_name)
    for control in ("warm", "file", "record", "utterance", "embedding", "go"):
        assert control in seen, f"{control} cannot be reached with Tab: {seen}"
    browser.set_window_size(390, 844)
    try:
        width, client = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width <= client, "the page scrolls sideways on a phone"
        assert by_id(browser, "go").size["width"] >= 44 and by_id(browser, "go").size["height"] >= 40
    finally:
        browser.set_window_size(1100, 900)


def test_upload_and_recognize_shows_the_top_label(browser, front, daemon, work):
    clip = work / "speech.wav"
    clip.write_bytes(wav_clip(2.0, seed=11))
    browser.get(front.url)
    by_id(browser, "file").send_keys(str(clip))
    wait(browser, "the chosen file", lambda d: "speech.wav" in by_id(d, "chosen").text)
    progress = recognize(browser)
    assert by_id(browser, "message").text == ""
    _, _, direct = http_request(daemon.socket, "POST", "/v1/recognize", clip.read_bytes())
    assert by_id(browser, "top-label").text == direct["top"]["label"]
    bars = [li.text.split("\n") for li in browser.find_elements("css selector", "#bars li")]
    assert [b[0] for b in bars] == sorted(direct["labels"], key=lambda l: -direct["scores"][direct["labels"].index(l)])
    values = [float(b[-1].rstrip(" %")) for b in bars]
    assert len(values) == 9 and values == sorted(values, reverse=True)
    meta = by_id(browser, "meta").text
    assert "2.00 s of audio" in meta and "model" in meta and "inference" in meta, meta
    assert progress.startswith("Answered in")
    assert "speech.wav" in by_id(browser, "history").text


def test_the_embedding_downloads_as_a_npy_equal_to_the_json(browser, front, daemon, work):
    clip = work / "emb.wav"
    clip.write_bytes(wav_clip(1.5, seed=12))
    downloads = work / "downloads"
    browser.get(front.url)
    by_id(browser, "file").send_keys(str(clip))
    by_id(browser, "embedding").click()
    for granularity in ("frame", "utterance"):
        browser.find_element("css selector", f"input[name=granularity][value={granularity}]").click()
        recognize(browser)
        shape_text = wait(browser, "the embedding's shape", lambda d: by_id(d, "emb-shape").text)
        by_id(browser, "npy").click()
        target = downloads / f"emb-{granularity}.npy"
        wait(browser, f"{target.name}", lambda d: target.exists() and not list(downloads.glob("*.crdownload")))
        array = np.load(target, allow_pickle=False)
        _, _, direct = http_request(daemon.socket, "POST", f"/v1/recognize?granularity={granularity}&embedding=1",
                                    clip.read_bytes())
        expected = np.asarray(direct["embedding"], dtype=np.float32)
        assert array.dtype == np.float32 and array.shape == expected.shape
        assert shape_text == str(expected.shape)
        assert (array.ndim, array.shape[-1]) == ((2 if granularity == "frame" else 1), expected.shape[-1])
        np.testing.assert_allclose(array, expected, rtol=0, atol=1e-6)


def test_a_text_file_and_an_empty_file_show_the_daemons_message(browser, front, daemon, work):
    browser.get(front.url)
    for name, data in (("notes.txt", b"this is a text file, not audio\n"), ("empty.wav", b"")):
        path = work / name
        path.write_bytes(data)
        by_id(browser, "file").send_keys(str(path))
        wait(browser, name, lambda d: name in by_id(d, "chosen").text)
        recognize(browser, timeout=60)
        _, _, direct = http_request(daemon.socket, "POST", "/v1/recognize", data)
        assert by_id(browser, "message").text == direct["error"]["message"]
        assert by_id(browser, "go").is_enabled(), "nothing hangs"


def test_a_file_over_max_body_bytes_shows_the_message_and_nothing_hangs(browser, front, work):
    big = work / "big.wav"
    big.write_bytes(b"RIFF" + bytes(MAX_BODY_BYTES + 500_000))
    browser.get(front.url)
    by_id(browser, "file").send_keys(str(big))
    wait(browser, "big.wav", lambda d: "big.wav" in by_id(d, "chosen").text)
    recognize(browser, timeout=60)
    message = by_id(browser, "message").text
    assert "max_body_bytes" in message and str(MAX_BODY_BYTES) in message, message
    assert by_id(browser, "go").is_enabled()


def test_recording_from_the_fake_microphone_gives_a_result(browser, front):
    browser.get(front.url)
    by_id(browser, "record").click()
    wait(browser, "the recording to run", lambda d: "Recording: 1." in by_id(d, "rec-info").text
         or "Recording: 2." in by_id(d, "rec-info").text, timeout=30)
    by_id(browser, "record").click()
    chosen = wait(browser, "the recording", lambda d: "recording-" in by_id(d, "chosen").text and by_id(d, "chosen").text)
    recorded = float(by_id(browser, "rec-info").text.split()[1])
    assert recorded >= 1.0, by_id(browser, "rec-info").text
    recognize(browser)
    assert by_id(browser, "message").text == ""
    assert by_id(browser, "top-label").text
    meta = by_id(browser, "meta").text
    assert meta.startswith(chosen.split(" (")[0]), meta
    duration = float(meta.split(": ", 1)[1].split(" s of audio")[0])
    assert abs(duration - recorded) <= 0.06, (meta, recorded)   # the WAV the page made holds what it recorded


def test_warm_up_loads_the_model_and_says_for_how_long(browser, front):
    browser.get(front.url)
    by_id(browser, "warm").click()
    text = wait(browser, "the warm-up", lambda d: "stays warm for" in by_id(d, "progress").text
                and by_id(d, "progress").text, WAIT_S)
    assert "10 min" in text and by_id(browser, "message").text == ""
