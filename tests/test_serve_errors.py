"""Every refusal through raw HTTP: the status, OpenAI's error shape (`{"error": {message, type, param,
code}}`, never a framework's default body or a traceback), a one-line message naming the problem. Then
the CLI's image / question matrix through HTTP, huge and chunked bodies, and 1000 tiny requests."""

from __future__ import annotations

import base64
import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_reliability import IMAGES, QUESTIONS

from conftest import random_image
from serve_helpers import Server, data_url, image_url, png_bytes, user


@pytest.fixture(scope="module")
def server(llava_model, tmp_path_factory):
    s = Server(llava_model.bundle_dir, "--max-body-mb", "2", log=tmp_path_factory.mktemp("serve-errors") / "server.log")
    yield s
    assert s.stop() == 0


IMG = image_url(5, size=(20, 20))


def ok_body(**kw) -> dict:
    return {"messages": [user("What is this?", IMG)], "max_tokens": 4, **kw}


def check_error(r, status: int, code: str | None = None, param: str | None = None, *needles: str) -> dict:
    assert r.status == status, r
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert e["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert "\n" not in e["message"] and "Traceback" not in e["message"] and e["message"]
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    for n in needles:
        assert n.lower() in e["message"].lower(), (n, e["message"])
    return e


def parts(*p) -> dict:
    return {"messages": [{"role": "user", "content": list(p)}], "max_tokens": 4}


TEXT = {"type": "text", "text": "What is this?"}


def img_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


CASES = {
    # name: (body (bytes / str / JSON-able), status, code, param, needles...)
    "malformed-json": (b'{"messages": [', 400, "invalid_json", None, "not valid JSON"),
    "invalid-utf8": (b'{"messages": "caf\xe9"}', 400, "invalid_json", None, "UTF-8"),
    "not-an-object": ([1, 2], 400, "invalid_json", None, "JSON object"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    "empty-body": (b"", 400, "invalid_json", None),
    "missing-messages": ({"max_tokens": 3}, 400, "missing_required_parameter", "messages"),
    "empty-messages": ({"messages": []}, 400, None, "messages"),
    "messages-not-list": ({"messages": "hi"}, 400, "invalid_type", "messages"),
    "content-wrong-type": ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    "max-tokens-string": (ok_body(max_tokens="10"), 400, "invalid_type", "max_tokens"),
    "max-tokens-zero": (ok_body(max_tokens=0), 400, None, "max_tokens"),
    "max-tokens-float": (ok_body(max_tokens=3.5), 400, "invalid_type", "max_tokens"),
    "temperature-string": (ok_body(temperature="hot"), 400, "invalid_type", "temperature"),
    "temperature-too-high": (ok_body(temperature=3), 400, None, "temperature"),
    "temperature-bool": (ok_body(temperature=True), 400, "invalid_type", "temperature"),
    "top-p-zero": (ok_body(top_p=0), 400, None, "top_p"),
    "seed-negative": (ok_body(seed=-1), 400, None, "seed"),
    "stream-string": (ok_body(stream="yes"), 400, "invalid_type", "stream"),
    "stop-empty": (ok_body(stop=""), 400, "unsupported_parameter", "stop"),
    "stop-too-many": (ok_body(stop=[str(i) for i in range(17)]), 400, "unsupported_parameter", "stop"),
    "stream-options-without-stream": (ok_body(stream_options={"include_usage": True}), 400, None, "stream_options"),
    "unknown-field": (ok_body(frobnicate=1), 400, "unsupported_parameter", "frobnicate", "frobnicate"),
    "n-2": (ok_body(n=2), 400, "unsupported_parameter", "n"),
    "top-logprobs-without-logprobs": (ok_body(top_logprobs=2), 400, "unsupported_parameter", "top_logprobs"),
    "tools": (ok_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter", "tools"),
    "json-schema-without-schema": (
        ok_body(response_format={"type": "json_schema"}),
        400,
        "unsupported_parameter",
        "response_format.json_schema",
    ),
    "presence-penalty": (ok_body(presence_penalty=0.5), 400, "unsupported_parameter", "presence_penalty"),
    "max-tokens-disagree": (ok_body(max_tokens=3, max_completion_tokens=4), 400, "unsupported_parameter", "max_tokens"),
    "unknown-model": (ok_body(model="gpt-4o"), 404, "model_not_found", "model", "gpt-4o"),
    "role-tool": (
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        400,
        "unsupported_value",
        "messages[0]",
    ),
    "part-audio": (
        parts(TEXT, {"type": "input_audio", "input_audio": {}}),
        400,
        "unsupported_value",
        None,
        "input_audio",
    ),
    "no-image": ({"messages": [user("What is this?")]}, 400, "missing_image", "messages", "image"),
    "two-images": (
        parts(TEXT, img_part(IMG), img_part(IMG)),
        400,
        None,
        "messages[0].content[2].image_url.url",
        "one image",
    ),
    "image-in-second-turn": (
        {"messages": [user("Hi?", IMG), {"role": "assistant", "content": "x"}, user("Again?", IMG)]},
        400,
        None,
        "messages[2].content[0].image_url.url",
        "first user message",
    ),
    "http-url": (
        parts(TEXT, img_part("http://169.254.169.254/latest/meta-data")),
        400,
        "image_url_not_allowed",
        None,
        "never fetched",
    ),
    "https-url": (
        parts(TEXT, img_part("https://example.com/lesion.jpg")),
        400,
        "image_url_not_allowed",
        None,
        "never fetched",
    ),
    "ftp-url": (parts(TEXT, img_part("ftp://example.com/lesion.jpg")), 400, "image_url_not_allowed"),
    "file-path-not-allowed": (
        parts(TEXT, img_part("/etc/passwd")),
        400,
        "image_url_not_allowed",
        None,
        "--allow-files",
    ),
    "file-url-not-allowed": (
        parts(TEXT, img_part("file:///etc/passwd")),
        400,
        "image_url_not_allowed",
        None,
        "--allow-files",
    ),
    "bad-base64": (parts(TEXT, img_part("data:image/png;base64,@@@notbase64")), 400, "invalid_image", None, "base64"),
    "data-url-no-comma": (parts(TEXT, img_part("data:image/png;base64")), 400, "invalid_image"),
    "data-url-text-mime": (
        parts(TEXT, img_part("data:text/plain;base64,aGVsbG8=")),
        400,
        "invalid_image",
        None,
        "not an image",
    ),
    "data-url-empty": (parts(TEXT, img_part("data:image/png;base64,")), 400, "invalid_image"),
    "not-an-image": (parts(TEXT, img_part(data_url(b"patient notes, not an image" * 4))), 400, "invalid_image"),
    "context-exceeded": (ok_body(max_tokens=5000), 400, "context_length_exceeded", None, "5000", "2048"),
    "empty-question": (parts(img_part(IMG)), 400, "invalid_prompt", None, "empty"),
    "lone-surrogate": (
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "'
        + IMG.encode()
        + b'"}}, {"type": "text", "text": "caf\\ud800"}]}]}',
        400,
        "invalid_prompt",
        None,
        "UTF-8",
    ),
    "two-users-in-a-row": ({"messages": [user("Hi?", IMG), user("Again?")]}, 400, None, "messages[1]", "alternate"),
    "ends-with-assistant": (
        {"messages": [user("Hi?", IMG), {"role": "assistant", "content": "x"}]},
        400,
        None,
        "messages",
        "last",
    ),
    "system-after-user": (
        {"messages": [user("Hi?", IMG), {"role": "system", "content": "x"}]},
        400,
        None,
        "messages[1]",
        "system",
    ),
    "starts-with-assistant": (
        {"messages": [{"role": "assistant", "content": "x"}, user("Hi?", IMG)]},
        400,
        None,
        "messages[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_case(server, case):
    body, status, code, param, *needles = (*CASES[case], None)[: max(4, len(CASES[case]))]
    check_error(server.post(body), status, code, param, *needles)


def test_image_matrix_through_http(server):
    """The CLI reliability matrix's bad images (test_reliability.IMAGES), as data URLs: 400 invalid_image."""
    for _, make, _ in IMAGES.values():
        data = make()
        url = data_url(data) if data else "data:image/png;base64,"
        r = server.post(parts(TEXT, img_part(url)))
        check_error(r, 400, "invalid_image")


def test_question_matrix_through_http(server):
    for q, needle in QUESTIONS.values():
        if isinstance(q, bytes):  # an invalid-UTF-8 body: refused before JSON parsing
            body = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "' + q + b'"}]}]}'
            check_error(server.post(body), 400, "invalid_json", None, "UTF-8")
            continue
        check_error(server.post({"messages": [user(q, IMG)]}), 400, None, "messages", needle)


def test_routes_and_methods(server):
    check_error(server.request("GET", "/v1/nope"), 404, "not_found")
    check_error(server.request("GET", "/v1/chat/completions"), 405, "method_not_allowed")
    check_error(server.request("GET", "/v1/models/gpt-4o"), 404, "model_not_found", "model")


def test_huge_bodies(server):
    big = json.dumps(ok_body(messages=[user("x" * (3 * 1024 * 1024), IMG)]))
    check_error(server.post(big), 413, "request_too_large", None, "2 MB")
    # the same body sent chunked, without a Content-Length: refused while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:

        def gen():
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536].encode()

        conn.request(
            "POST",
            "/v1/chat/completions",
            body=gen(),
            headers={"content-type": "application/json"},
            encode_chunked=True,
        )
        r = conn.getresponse()
        check_error(
            type(
                "R",
                (),
                {
                    "status": r.status,
                    "headers": {k.lower(): v for k, v in r.getheaders()},
                    "json": lambda self, b=r.read(): json.loads(b),
                },
            )(),
            413,
            "request_too_large",
        )
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server reset the connection instead of answering 413")
    finally:
        conn.close()
    # broken HTTP framing never reaches the app: uvicorn's HTTP parser answers a plain 400 and closes
    r = server.request("POST", "/v1/chat/completions", b"{}", {"content-length": "-5"})
    assert r.status == 400 and b"Traceback" not in r.body
    assert server.request("GET", "/health").status == 200


def test_thousand_tiny_requests(server):
    """1000 tiny requests on 4 keep-alive connections: tiny good ones answered, bad ones refused, no 5xx."""
    good = json.dumps({"messages": [user("Hi?", data_url(png_bytes(random_image(9, size=(4, 4)))))], "max_tokens": 1})
    bad = [
        b"{",
        b'{"messages": []}',
        json.dumps(ok_body(n=3)).encode(),
        b"\xff\xfe",
        json.dumps(ok_body(model="x")).encode(),
    ]

    def worker(w: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        seen = {}
        try:
            for i in range(250):
                body = good if i % 2 == 0 else bad[(i // 2 + w) % len(bad)]
                conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                seen[r.status] = seen.get(r.status, 0) + 1
        finally:
            conn.close()
        return seen

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    total = {}
    for s in results:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    assert sum(total.values()) == 1000
    assert total.get(200) == 500 and set(total) <= {200, 400, 404}, total
    assert server.request("GET", "/health").json()["active"] == 0


def test_base64_with_line_breaks_is_accepted(server, llava_model):
    """MIME-style base64 (76-column lines) decodes; standard base64 only otherwise."""
    data = png_bytes(random_image(6))
    wrapped = base64.encodebytes(data).decode()  # newlines every 76 characters
    r = server.post(parts(TEXT, img_part("data:image/png;base64," + wrapped)))
    assert r.status == 200, r
    assert (
        r.json()["choices"][0]["message"]["content"]
        == llava_model.runtime.ask(data, "What is this?", max_new_tokens=4).answer
    )
