"""Safe by default: refusal to listen on the network without a key, the API key, CORS, Host check,
--allow-files confinement (`..`, symlinks), and a log that never carries patient data."""

from __future__ import annotations

import base64
import re
import secrets
import time

import pytest
from test_reliability import assert_one_line_error, cli
from test_serve_errors import check_error

from conftest import random_image
from serve_helpers import Server, data_url, image_url, png_bytes, user, wait_for

openai = pytest.importorskip("openai")

KEY = secrets.token_urlsafe(24)
ORIGIN = "http://localhost:3000"


# ------------------------------------------------------------------ refusals at startup (no socket bound)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--host", "0.0.0.0"), "without an API key"),
        (("--host", "192.168.1.10"), "without an API key"),
        (("--host", "0.0.0.0", "--api-key", "short"), "shorter than 16"),
        (("--cors-origin", "*"), "wildcard"),
        (("--cors-origin", "localhost:3000"), "not an origin"),
        (("--allow-files", "/nonexistent/folder"), "not a folder"),
        (("--api-key", "a" * 20, "--api-key-file", "/tmp/k"), "not both"),
    ],
)
def test_refuses_to_start(args, needle, tmp_path, llava_model):
    r = cli("serve", "--bundle", llava_model.bundle_dir, "--port", "0", *args, home=tmp_path)
    assert_one_line_error(r, 2, needle)


def test_missing_bundle_fails_before_binding(tmp_path):
    r = cli("serve", "--bundle", tmp_path / "nope", "--port", "0", home=tmp_path)
    assert_one_line_error(r, 4, "no bundle")


def test_api_key_sources(tmp_path):
    from skin_offline.errors import UsageError
    from skin_offline.serve.config import read_api_key

    f = tmp_path / "key.txt"
    f.write_text(KEY + "\n")
    assert read_api_key(None, f, env={}) == KEY
    assert read_api_key("k" * 20, None, env={"SKIN_OFFLINE_API_KEY": "other"}) == "k" * 20
    assert read_api_key(None, None, env={"SKIN_OFFLINE_API_KEY": "from-env"}) == "from-env"
    assert read_api_key(None, None, env={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError):
        read_api_key(None, tmp_path / "empty", env={})


def test_key_check_unit():
    from skin_offline.serve.security import KeyCheck, is_loopback

    k = KeyCheck("s3cret-key")
    assert k.ok(b"Bearer s3cret-key") and k.ok(b"bearer  s3cret-key ")
    for bad in (
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Basic s3cret-key",
        b"s3cret-key",
        b"Bearer s3cret-ke",
        b"Bearer s3cret-key2",
    ):
        assert not k.ok(bad), bad
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert (
        not is_loopback("0.0.0.0")
        and not is_loopback("::")
        and not is_loopback("10.0.0.2")
        and not is_loopback("myhost")
    )


# ------------------------------------------------------------------ a server open to the network, with a key


@pytest.fixture(scope="module")
def lan(llava_model, tmp_path_factory):
    s = Server(
        llava_model.bundle_dir,
        "--host",
        "0.0.0.0",
        "--cors-origin",
        ORIGIN,
        log=tmp_path_factory.mktemp("serve-lan") / "server.log",
        env={"SKIN_OFFLINE_API_KEY": KEY},
    )
    yield s
    assert s.stop() == 0


AUTH = {"authorization": f"Bearer {KEY}"}
BODY = {"messages": [user("What is this?", image_url(2, size=(16, 16)))], "max_tokens": 3}


def test_key_required_except_health_and_page(lan):
    assert lan.request("GET", "/health").status == 200
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert lan.request("GET", path).status == 200, path
    for path in ("/v1/models", "/metrics"):
        e = check_error(lan.request("GET", path), 401, "invalid_api_key")
        assert "Bearer" in e["message"]
        check_error(lan.request("GET", path, headers={"authorization": "Bearer wrong"}), 401, "invalid_api_key")
        assert lan.request("GET", path, headers=AUTH).status == 200
    r = lan.post(BODY)
    check_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    # refused before the body is read: a huge unauthenticated body costs nothing
    check_error(lan.post(b"x" * (30 * 1024 * 1024)), 401, "invalid_api_key")
    assert lan.post(BODY, headers=AUTH).status == 200


def test_openai_client_with_and_without_key(lan):
    good = openai.OpenAI(base_url=lan.url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(model=good.models.list().data[0].id, **BODY).choices[0].message.content
    bad = openai.OpenAI(base_url=lan.url + "/v1", api_key="nope", max_retries=2)
    before = lan.log().count("GET /v1/models 401")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    time.sleep(0.5)  # a retry would come within the client's backoff (0.5 s, then 1 s)
    assert wait_for(lambda: lan.log().count("GET /v1/models 401") > before)
    time.sleep(1.5)
    assert lan.log().count("GET /v1/models 401") == before + 1  # a 401 is not retried by the client


def test_cors(lan):
    pre = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    r = lan.request("OPTIONS", "/v1/chat/completions", headers=pre)
    assert r.status == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in r.headers
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = lan.request("OPTIONS", "/v1/chat/completions", headers={**pre, "origin": "http://evil.example"})
    assert r.status >= 400 and "access-control-allow-origin" not in r.headers
    r = lan.post(BODY, headers={**AUTH, "origin": ORIGIN})
    assert r.status == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = lan.post(BODY, headers={**AUTH, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------ loopback server with --allow-files

WORD = "zqxjvplanted" + secrets.token_hex(4)  # a word no model output, id or path will contain by chance


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-files")
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    random_image(3).save(allowed / "sub" / "lesion.png")
    random_image(3).save(allowed / f"{WORD}-patient.png")
    random_image(4).save(root / "outside.png")
    (allowed / "escape.png").symlink_to(root / "outside.png")
    (allowed / "inner-link.png").symlink_to(allowed / "sub" / "lesion.png")
    (allowed / "dirlink").symlink_to(root)
    return root


@pytest.fixture(scope="module")
def local(llava_model, files):
    s = Server(llava_model.bundle_dir, "--allow-files", files / "allowed", log=files / "server.log")
    yield s
    assert s.stop() == 0


def _ask_file(server, url: str):
    return server.post({"messages": [user("What is this?", url)], "max_tokens": 6})


def test_allow_files_confined(local, files, llava_model):
    want = llava_model.runtime.ask(random_image(3), "What is this?", max_new_tokens=6).answer
    allowed = files / "allowed"
    for url in (
        str(allowed / "sub" / "lesion.png"),
        "sub/lesion.png",
        f"file://{allowed}/sub/lesion.png",
        "file://localhost" + str(allowed / "sub" / "lesion.png"),
        "inner-link.png",
        "sub/../sub/lesion.png",
    ):
        r = _ask_file(local, url)
        assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == want, (url, r)
    for url, needle in (
        (str(files / "outside.png"), "outside"),
        ("../outside.png", "outside"),
        ("sub/../../outside.png", "outside"),
        ("escape.png", "outside"),
        ("dirlink/outside.png", "outside"),
        (f"file://{files}/outside.png", "outside"),
        ("sub", "not a regular file"),
        ("missing.png", "no such"),
        ("file://otherhost/etc/passwd", "local file"),
        ("/etc/passwd", "outside"),
    ):
        check_error(_ask_file(local, url), 400, "image_url_not_allowed", None, needle)


def test_host_header_checked_on_loopback(local):
    check_error(local.request("GET", "/v1/models", headers={"host": "evil.example"}), 400, "invalid_host")
    check_error(local.request("GET", "/v1/models", headers={"host": "evil.example:80"}), 400, "invalid_host")
    for host in ("localhost", f"127.0.0.1:{local.port}", f"localhost:{local.port}"):
        assert local.request("GET", "/v1/models", headers={"host": host}).status == 200, host
    assert "access-control-allow-origin" not in local.post(BODY, headers={"origin": ORIGIN}).headers  # CORS off


def test_log_never_carries_patient_data(local, files, llava_model):
    """A unique word planted everywhere a request can carry text: question, system message, earlier turns,
    stop string, file name, model name, path, query string, a wrong key, non-image bytes, a failing
    question. It appears in no log line; neither do the answers or the image bytes."""
    url = image_url(8)
    answers = []
    bodies = [
        {"messages": [user(f"Is {WORD} malignant?", url)], "max_tokens": 12},
        {
            "messages": [
                {"role": "system", "content": f"Patient {WORD}."},
                user("What is this?", url),
                {"role": "assistant", "content": f"{WORD} answer"},
                user(f"And {WORD}?"),
            ],
            "max_tokens": 12,
            "stop": [WORD],
        },
        {"messages": [user("What is this?", f"{WORD}-patient.png")], "max_tokens": 12, "stream": True},
        {"messages": [user("What is this?", url)], "model": WORD},
        {"messages": [user(f"{WORD}?", data_url(f"{WORD} is not an image".encode() * 3))]},
        {"messages": [user(f"{WORD} " * 3000, url)]},  # context exceeded
        {"messages": [user("What is this?", url)], WORD: 1},
        {"messages": [user("What is this?", f"https://{WORD}.example/x.png")]},
        {"messages": [user("Hi", f"/nonexistent/{WORD}.png")]},
    ]
    for b in bodies:
        r = local.post(b)
        if r.status == 200 and not b.get("stream"):
            answers.append(r.json()["choices"][0]["message"]["content"])
    local.request("GET", f"/v1/{WORD}?q={WORD}")
    local.request("GET", f"/v1/models/{WORD}")
    local.request(
        "GET", "/v1/models", headers={"authorization": f"Bearer {WORD}", "user-agent": WORD, "x-patient": WORD}
    )
    assert local.request("GET", "/health").status == 200
    n = len(bodies) + 4  # every request is logged (the line comes once the response is sent) ...
    assert wait_for(lambda: len(re.findall(r" req-[0-9a-f]{12} ", local.log())) >= n), local.log()
    log = local.log()
    assert WORD.lower() not in log.lower()  # ... and the word never
    for enc in (base64.b64encode(WORD.encode()).decode()[:12], WORD.encode().hex()):
        assert enc not in log
    for a in answers:
        assert len(a) > 8 and a not in log
    assert base64.b64encode(png_bytes(random_image(8))).decode()[40:80] not in log
    assert "Traceback" not in log


def test_dicom_answered_and_patient_data_never_echoed(local, files, llava_model):
    """DICOM through the server (data URL of any MIME type, or a file under --allow-files): answered as the same
    pixels in a PNG; a burned-in-annotation notice reaches the client; every broken file of the loader's matrix
    is a 400. The planted patient name, ID, birth date, accession number and institution appear in no response
    body, error body or log line."""
    import json

    from PIL import Image
    from test_dicom import BROKEN

    import dicom_samples as S

    rgb = S.rgb_pixels()
    native = S.write(S.native(rgb))
    (files / "allowed" / "IM000001").write_bytes(native)
    want = llava_model.runtime.ask(Image.fromarray(rgb), "What is this?", max_new_tokens=6).answer
    seen = []
    for url in (data_url(native, "application/dicom"), data_url(native, "application/octet-stream"), "IM000001"):
        r = _ask_file(local, url)
        assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == want, r
        assert "warnings" not in r.json()
        seen.append(r.body)
    burned = data_url(S.write(S.native(rgb, BurnedInAnnotation="YES")), "application/dicom")
    r = local.post({"messages": [user("What is this?", burned)], "max_tokens": 8})
    assert r.status == 200 and any("burned into the pixels" in w for w in r.json()["warnings"]), r
    seen.append(r.body)
    r = local.post({"messages": [user("What is this?", burned)], "max_tokens": 8, "stream": True})
    first = json.loads(r.body.split(b"\n\n")[0][6:])
    assert any("burned into the pixels" in w for w in first["warnings"])
    seen.append(r.body)
    for build, _ in BROKEN.values():
        r = local.post({"messages": [user("What is this?", data_url(build(), "application/dicom"))], "max_tokens": 8})
        check_error(r, 400, "invalid_image")
        seen.append(r.body)
    text = (b"".join(seen).decode("utf-8", "replace") + local.log()).lower()
    for secret in S.SECRETS:
        assert secret.lower() not in text, secret
