"""`skin-offline serve` through the official `openai` client: non-streamed, streamed (usage chunk),
concurrent and multi-turn requests; greedy answers identical to `skin-offline ask` / `chat` run as
subprocesses on the same bundle, image and question. One server process for the module."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_image
from serve_helpers import Server, image_url, metric, user

openai = pytest.importorskip("openai")  # in the test extra: installed by `make test`, so never skipped on CI

N = 24  # new tokens per answer


@pytest.fixture(scope="module")
def server(llava_model, tmp_path_factory):
    s = Server(llava_model.bundle_dir, "--parallel", "2", log=tmp_path_factory.mktemp("serve-api") / "server.log")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skin_offline.cli", *map(str, args)], capture_output=True, timeout=300)


def test_models_and_health(server, client, llava_model):
    models = client.models.list().data
    assert len(models) == 1
    card = models[0]
    assert card.id == llava_model.bundle_dir.name and card.object == "model"
    extra = card.model_extra
    assert extra["random_weights"] is True and extra["precision"] == "fp32"
    assert extra["context_length"] == llava_model.manifest.model.max_context
    assert client.models.retrieve(card.id).id == card.id
    h = server.request("GET", "/health")
    assert h.status == 200 and h.json()["status"] == "ok"


def test_non_streamed_equals_ask_cli(client, model_id, llava_model, tmp_path):
    img = tmp_path / "lesion.png"
    random_image(11).save(img)
    q = "What is this lesion? Describe its border."
    want = cli("ask", img, q, "--bundle", llava_model.bundle_dir, "--max-new-tokens", N, "--threads", 1)
    assert want.returncode == 0, want.stderr
    r = client.chat.completions.create(model=model_id, messages=[user(q, image_url(11))], max_tokens=N, temperature=0)
    assert r.choices[0].message.content + "\n" == want.stdout.decode("utf-8")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model_id
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    prepared = llava_model.runtime.prepare(random_image(11), q, max_new_tokens=N)
    assert r.usage.prompt_tokens == prepared.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    answer = llava_model.runtime.ask(random_image(11), q, max_new_tokens=N)
    assert r.usage.completion_tokens == len(answer.token_ids)
    assert r.choices[0].finish_reason == answer.finish_reason.value


def test_streamed_equals_non_streamed_with_usage_chunk(client, model_id):
    msgs = [user("Is it benign?", image_url(12))]
    full = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=N)
    chunks = list(
        client.chat.completions.create(
            model=model_id, messages=msgs, max_tokens=N, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage: no usage chunk
    plain = list(client.chat.completions.create(model=model_id, messages=msgs, max_tokens=N, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_multi_turn_equals_chat_cli(client, model_id, llava_model, tmp_path):
    img = tmp_path / "lesion.png"
    random_image(13).save(img)
    q1, q2, q3 = "What is this lesion?", "Is the border regular?", "Should it be biopsied?"
    want = cli(
        "chat",
        img,
        "-q",
        q1,
        "-q",
        q2,
        "-q",
        q3,
        "--bundle",
        llava_model.bundle_dir,
        "--max-new-tokens",
        N,
        "--threads",
        1,
    )
    assert want.returncode == 0, want.stderr
    msgs, answers = [user(q1, image_url(13))], []
    for q in (q2, q3, None):
        r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=N)
        answers.append(r.choices[0].message.content)
        if q is not None:
            msgs += [{"role": "assistant", "content": answers[-1]}, user(q)]
    assert "".join(a + "\n" for a in answers) == want.stdout.decode("utf-8")


def test_concurrent_requests_equal_sequential(client, model_id, llava_model):
    jobs = [(seed, q) for seed in (21, 22, 23, 24) for q in ("What is this?", "Describe the colour.")]
    want = {j: llava_model.runtime.ask(random_image(j[0]), j[1], max_new_tokens=N).answer for j in jobs}

    def one(job):
        seed, q = job
        stream = job[0] % 2 == 0
        r = client.chat.completions.create(
            model=model_id, messages=[user(q, image_url(seed))], max_tokens=N, stream=stream
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(jobs, pool.map(one, jobs)))
    assert got == want


def test_sampling_stop_and_system_policy(client, model_id, llava_model):
    rt, img, q = llava_model.runtime, random_image(31), "Describe it."
    seeded = [
        client.chat.completions.create(
            model=model_id, messages=[user(q, image_url(31))], max_tokens=N, temperature=0.9, top_p=0.95, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] == rt.ask(img, q, max_new_tokens=N, temperature=0.9, top_p=0.95, seed=7).answer
    full = rt.ask(img, q, max_new_tokens=N).answer
    stop = full[4:7]
    r = client.chat.completions.create(model=model_id, messages=[user(q, image_url(31))], max_tokens=N, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    # documented policy: a system message is prepended to the first question; an empty one changes nothing
    sys_msg = {"role": "system", "content": "Answer briefly."}
    r = client.chat.completions.create(model=model_id, messages=[sys_msg, user(q, image_url(31))], max_tokens=N)
    assert r.choices[0].message.content == rt.ask(img, "Answer briefly.\n\n" + q, max_new_tokens=N).answer
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": ""}, user(q, image_url(31))], max_tokens=N
    )
    assert r.choices[0].message.content == full


def test_any_image_mime_goes_to_the_loader(client, model_id, llava_model):
    """The data URL's MIME type is not trusted: the loader reads the bytes by content."""
    import base64
    import io

    buf = io.BytesIO()
    random_image(32).save(buf, format="WEBP", lossless=True)
    want = llava_model.runtime.ask(buf.getvalue(), "What is this?", max_new_tokens=N).answer
    for mime in ("image/webp", "image/jpeg", "application/octet-stream"):
        url = f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
        r = client.chat.completions.create(model=model_id, messages=[user("What is this?", url)], max_tokens=N)
        assert r.choices[0].message.content == want


def test_metrics_count_requests_and_tokens(server, client, model_id):
    client.chat.completions.create(model=model_id, messages=[user("What is this?", image_url(41))], max_tokens=5)
    text = server.request("GET", "/metrics").body.decode()
    assert metric(text, 'skin_offline_http_requests_total{route="/v1/chat/completions",status="200"}') >= 1
    assert metric(text, "skin_offline_completion_tokens_total") >= 5
    assert metric(text, "skin_offline_prompt_tokens_total") > 0
    assert metric(text, "skin_offline_ttft_seconds_count") >= 1
    assert metric(text, "skin_offline_slots") == 2
    assert metric(text, "skin_offline_active_slots") == 0 and metric(text, "skin_offline_queue_depth") == 0


def test_openai_client_sees_our_errors(client, model_id):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[user("What is this?", image_url(1))])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[user("What is this?", image_url(1))], n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[user("What is this?", image_url(1))], max_tokens=10**6)
    assert e.value.code == "context_length_exceeded" and str(10**6) in e.value.message and "2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[user("What?", "https://example.com/a.jpg")])
    assert e.value.code == "image_url_not_allowed"
