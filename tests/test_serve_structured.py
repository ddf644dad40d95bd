"""Structured answers and logprobs through the server: OpenAI's `response_format` (json_object, json_schema) and
vLLM's `structured_outputs` (json, regex, choice, grammar), over raw HTTP and through the official `openai` client
(`chat.completions.parse` with a Pydantic model, end to end). Every answer equals the runtime's own for the same
request (which tests/test_constraints.py checks against transformers); every `stop` answer is valid; `length` is
never claimed valid (the client's `parse` raises for it); refusals are 400s naming the field, before a slot is taken;
the server log names a constraint's kind, never its text."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from skin_offline.runtime.constraints import Choice, Grammar, JsonObject, JsonSchema, Regex

from conftest import random_image
from constraint_cases import CHOICES, CLINIC_FORM, GRAMMARS, REGEXES, SCHEMAS, valid
from serve_helpers import Server, image_url, open_stream, sse_events, user

openai = pytest.importorskip("openai")  # in the test extra: installed by `make test`, so never skipped on CI

N = 48
SEED = 21  # the image every request here is about
Q = "Fill in the form."


@pytest.fixture(scope="module")
def server(llava_model, tmp_path_factory):
    s = Server(
        llava_model.bundle_dir, "--parallel", "4", log=tmp_path_factory.mktemp("serve-structured") / "server.log"
    )
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _body(extra: dict, **kw) -> dict:
    return {"messages": [user(Q, image_url(SEED))], "max_tokens": N, **extra, **kw}


def _cases():
    """(request fields, the runtime constraint they mean) for the whole suite."""
    out = [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}}},
            JsonSchema(s),
        )
        for i, s in enumerate(SCHEMAS)
    ]
    out.append(({"response_format": {"type": "json_object"}}, JsonObject()))
    out += [({"structured_outputs": {"regex": r}}, Regex(r)) for r in REGEXES]
    out += [({"structured_outputs": {"choice": c}}, Choice(c)) for c in CHOICES]
    out += [({"structured_outputs": {"grammar": g}}, Grammar(g)) for g in GRAMMARS]
    out.append(({"structured_outputs": {"json": SCHEMAS[8]}}, JsonSchema(SCHEMAS[8])))
    return out


def test_the_suite_over_raw_http_equals_the_runtime(server, llava_model):
    rt = llava_model.runtime
    cases = _cases()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: server.post(_body(c[0]), timeout=300), cases))
    stopped = 0
    for (fields, c), r in zip(cases, replies):
        assert r.status == 200, (fields, r)
        choice = r.json()["choices"][0]
        want = rt.ask(random_image(SEED), Q, max_new_tokens=N, constraint=c)
        assert choice["message"]["content"] == want.answer, fields
        assert choice["finish_reason"] == want.finish_reason.value
        if choice["finish_reason"] == "stop":
            stopped += 1
            assert valid(c, choice["message"]["content"]), (fields, choice["message"]["content"])
    assert stopped >= 0.75 * len(cases)


def test_the_suite_through_the_official_client(client, server):
    """`parse` with each response_format of the suite: the content of a finished answer is valid; an answer cut by
    max_tokens makes the client raise LengthFinishReasonError, as OpenAI's does."""
    model = client.models.list().data[0].id
    for fields, c in _cases():
        rf = fields.get("response_format")
        extra = {} if rf else {"extra_body": fields}
        try:
            r = client.chat.completions.parse(
                model=model,
                messages=[user(Q, image_url(SEED))],
                max_tokens=N,
                **({"response_format": rf} if rf else {}),
                **extra,
            )
        except openai.LengthFinishReasonError:
            raw = server.post(_body(fields))
            assert raw.json()["choices"][0]["finish_reason"] == "length"
            continue
        assert r.choices[0].finish_reason == "stop"
        assert valid(c, r.choices[0].message.content), (fields, r.choices[0].message.content)


class Lesion(BaseModel):
    colour: Literal["brown", "black", "red", "blue"]
    raised: bool


class ClinicForm(BaseModel):
    lesion_type: Literal["melanocytic", "non-melanocytic", "inflammatory", "unknown"]
    border: Literal["regular", "irregular"]
    diameter_mm: int = Field(ge=0, le=40)
    lesion: Lesion
    colours: list[Literal["brown", "black", "red"]] = Field(min_length=1, max_length=3)
    next_step: Literal["urgent referral", "routine review", "no action"]
    note: Optional[Literal["see photo", "none"]]


def test_parse_with_a_pydantic_model_end_to_end(client, llava_model):
    """The clinic tool's code path: `parse(response_format=ClinicForm)` gives a ClinicForm, streamed too."""
    model = client.models.list().data[0].id
    for seed in (SEED, 22, 23):
        r = client.chat.completions.parse(
            model=model, messages=[user(Q, image_url(seed))], max_tokens=120, response_format=ClinicForm
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        form = r.choices[0].message.parsed
        assert isinstance(form, ClinicForm) and form == ClinicForm.model_validate_json(r.choices[0].message.content)
        with client.chat.completions.stream(
            model=model, messages=[user(Q, image_url(seed))], max_tokens=120, response_format=ClinicForm
        ) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].message.parsed == form


def test_streamed_equals_non_streamed_with_logprobs(server):
    """Constrained and free answers with logprobs: the streamed chunks carry the same text and the same entries as
    the non-streamed body; every entry has OpenAI's shape, the top list holds top_logprobs alternatives."""
    for extra in (
        {"structured_outputs": {"choice": CHOICES[2]}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": CLINIC_FORM}}},
        {},
    ):
        body = _body(extra, logprobs=True, top_logprobs=3, max_tokens=32)
        full = server.post(body).json()["choices"][0]
        conn, resp = open_stream(server.port, {**body, "stream": True})
        events = sse_events(resp)
        conn.close()
        chunks = [o for k, o in events if k == "data" and o != "[DONE]" and o["choices"]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        streamed = [
            e for c in chunks if c["choices"][0].get("logprobs") for e in c["choices"][0]["logprobs"]["content"]
        ]
        assert text == full["message"]["content"]
        content = full["logprobs"]["content"]
        assert [e["token"] for e in streamed] == [e["token"] for e in content]
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-6 for a, b in zip(streamed, content))
        for e in content:
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 3
            assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-9
        assert server.post(_body(extra, max_tokens=4)).json()["choices"][0]["logprobs"] is None


def test_logprobs_through_the_official_client(client, llava_model):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model, messages=[user(Q, image_url(SEED))], max_tokens=8, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    want = llava_model.runtime.ask(random_image(SEED), Q, max_new_tokens=8, logprobs=2)
    assert [round(e.logprob, 5) for e in content] == [round(e.logprob, 5) for e in want.logprobs]
    assert all(len(e.top_logprobs) == 2 and isinstance(e.bytes, list) for e in content)


@pytest.mark.parametrize(
    "fields,param,match",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", "unclosed group"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "one or more"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar", "unknown name"),
        (
            {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
            "structured_outputs",
            "both",
        ),
        ({"structured_outputs": {"choice": ["a", "b"]}, "stop": ["x"]}, "structured_outputs.choice", "stop"),
        ({"top_logprobs": 3}, "top_logprobs", "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ],
)
def test_refusals_are_400s_naming_the_field_before_a_slot(server, fields, param, match):
    r = server.post(_body(fields))
    assert r.status == 400, r
    err = r.json()["error"]
    assert err["param"] == param or err["message"].startswith(param), err
    assert match is None or match in err["message"], err
    assert "\n" not in err["message"]
    h = server.request("GET", "/health").json()
    assert h["active"] == 0 and h["queued"] == 0


def test_only_the_kind_of_a_constraint_is_logged(server):
    secret = "Patient-Zelda-Quackenbush"
    schema = {
        "type": "object",
        "properties": {"who": {"enum": [secret, "other"]}},
        "required": ["who"],
        "additionalProperties": False,
    }
    r = server.post(_body({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}))
    assert r.status == 200
    bad = server.post(
        _body(
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": {"enum": [secret], "uniqueItems": True, "type": "array"}},
                }
            }
        )
    )
    assert bad.status == 400 and secret not in bad.body.decode()
    log = server.log()
    assert "constraint=json_schema" in log and secret not in log
