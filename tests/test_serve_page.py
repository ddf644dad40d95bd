"""The web page in a real headless browser (Debian's chromium driven by Playwright): upload an image, ask,
read the streamed answer from the page, ask a follow-up, stop a long answer. Answers must equal the
Python API's for the same image and conversation; the page must say it is the random-weight demo and that
answers are not a diagnosis, and must load nothing from anywhere but this server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import random_image
from serve_helpers import Server, wait_for

playwright = pytest.importorskip("playwright.sync_api")  # test extra: installed by `make test`

CHROMIUM = os.environ.get("SKIN_OFFLINE_CHROMIUM", "/usr/bin/chromium")
# the flags known to work here as root with no network (/work/.library/env/machines/python.md)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N = 24


def _chromium() -> str:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        if os.environ.get("SKIN_OFFLINE_REQUIRE_BROWSER"):  # set by .ci/run: on CI a missing browser is a failure
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium (as .ci/run does)")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(llava_model, tmp_path_factory):
    s = Server(llava_model.bundle_dir, log=tmp_path_factory.mktemp("serve-page") / "server.log")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def page(server):
    exe = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=FLAGS, headless=True)
        pg = browser.new_page()
        pg.requests, pg.console_errors = [], []
        pg.on("request", lambda r: pg.requests.append(r.url))
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _answer(page) -> str:
    return page.locator(".turn.assistant .text").last.text_content()


def test_ask_follow_up_and_stop(page, server, llava_model, tmp_path):
    rt = llava_model.runtime
    img = tmp_path / "lesion.png"
    random_image(77).save(img)
    page.goto(server.url + "/")
    page.wait_for_selector("#model-info[data-state=ready]")
    assert llava_model.bundle_dir.name in page.text_content("#model-info") and "fp32" in page.text_content(
        "#model-info"
    )
    assert page.is_visible("#warning") and "RANDOM weights" in page.text_content("#warning")
    assert "not a diagnosis" in page.text_content(".disclaimer")

    page.set_input_files("#file", str(img))
    page.wait_for_selector("#preview:not([hidden])")
    page.click("text=Settings")
    page.fill("#max-tokens", str(N))
    q1, q2 = "What is this lesion?", "Is the border regular?"
    page.fill("#question", q1)
    page.click("#ask")
    page.wait_for_selector("#conversation[data-turns='1']")
    assert page.get_attribute("#status", "data-state") == "done"
    a1 = _answer(page)
    assert a1 == rt.ask(img, q1, max_new_tokens=N).answer
    assert "tokens/s" in page.text_content("#timings") and "first token" in page.text_content("#timings")

    page.fill("#question", q2)
    page.press("#question", "Enter")
    page.wait_for_selector("#conversation[data-turns='2']")
    assert _answer(page) == rt.ask(img, q2, history=[(q1, a1)], max_new_tokens=N).answer
    assert page.locator(".turn.user").count() == 2

    # a long answer, stopped from the page: the server cancels the row (its log says the client left)
    page.fill("#max-tokens", "1900")
    page.fill("#question", "Describe it in detail.")
    page.click("#ask")
    # waited for in the page, not polled from here: the tiny model writes the whole answer in seconds
    page.wait_for_function(
        "() => (document.querySelector('.turn.assistant:last-child .text') || {}).textContent?.length > 20"
    )
    page.click("#stop")
    page.wait_for_selector("#status[data-state=stopped]")
    assert wait_for(lambda: "finish=client_left" in server.log(), 30)
    assert page.is_enabled("#ask") and not page.is_enabled("#stop")

    # a new conversation with an image the browser cannot preview (bytes the server refuses): an error shown
    bad = tmp_path / "notes.dcm"
    bad.write_bytes(b"not really dicom " * 20)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#no-preview:not([hidden])")
    page.fill("#question", q1)
    page.click("#ask")
    page.wait_for_selector("#error:not([hidden])")
    assert page.get_attribute("#status", "data-state") == "error"
    assert page.locator(".turn").count() == 0

    # the README's JavaScript `fetch` example, run in the page on the image chosen there
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("```js\n", 1)[1].split("```", 1)[0]
    page.set_input_files("#file", str(img))
    got = page.evaluate(
        f"async () => {{ {code}; return await ask(document.getElementById('file').files[0], "
        f"'What is this lesion?', {{ url: location.origin }}); }}"
    )
    assert got == rt.ask(img, "What is this lesion?", max_new_tokens=256).answer

    assert all(u.startswith(server.url) or u.startswith("data:") for u in page.requests), page.requests
    assert not [e for e in page.console_errors if "400" not in e], page.console_errors
