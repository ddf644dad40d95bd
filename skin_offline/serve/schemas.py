"""OpenAI Chat Completions request and response models (field names are OpenAI's).

Parsing is strict (no "10" -> 10, no 1 -> True) and unknown fields are refused with a 400 naming them, so a
client never gets an answer that silently ignored something it asked for. Fields that change nothing about
the answer (`user`, `metadata`, `store`, ...) are accepted and ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NoReturn, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_serializer

from .errors import APIError

MAX_STOP = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- request ---
class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored: SkinVL always sees one 336 px view


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


UserPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: StrictStr | list[UserPart]
    name: StrictStr | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    refusal: StrictStr | None = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # accepted, ignored (no padding fields are sent)


class JsonSchemaFormat(_Strict):
    name: StrictStr = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # OpenAI: optional (then any JSON object)
    strict: StrictBool | None = None  # accepted: answers always keep to the schema (llguidance), strict or not
    description: StrictStr | None = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: text (the default), any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension (its current name; the older `guided_*` fields are not read): exactly
    one of these constrains the answer."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None  # a Lark grammar (llguidance's dialect)


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: StrictStr | None = None  # None: the one model this server has
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's older name; max_completion_tokens wins
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=0)  # llama.cpp / vLLM extension
    dicom_sr: StrictBool = False  # skin-offline extension: also return the answer as a DICOM SR (skin_offline/sr)
    seed: StrictInt | None = Field(None, ge=0, lt=2**64)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # declared so that only their harmful values are refused (check_supported), with a message naming them
    n: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    # harmless: accepted and ignored
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None

    def check_supported(self) -> None:
        """Refuse what SkinVL cannot honour (a 400 naming the field), never ignore it."""

        def no(param: str, why: str) -> NoReturn:
            raise APIError(400, f"'{param}' {why}", "invalid_request_error", param, "unsupported_parameter")

        if self.n not in (None, 1):
            no("n", "must be 1: this server returns one choice per request (send n requests instead)")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            no("top_logprobs", "must be from 0 to 20")
        if self.top_logprobs is not None and not self.logprobs:
            no("top_logprobs", "needs logprobs: true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                no(name, "is not supported (only 0); LLaVA's evaluation decodes without penalties")
        if self.logit_bias:
            no("logit_bias", "is not supported by this server")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            no("response_format.json_schema", 'is required with type json_schema ({"name": ..., "schema": {...}})')
        if rf is not None and rf.type != "json_schema" and rf.json_schema is not None:
            no("response_format.json_schema", f"is only read with type json_schema, not {rf.type}")
        so = self.structured_outputs
        if so is not None:
            given = [
                k
                for k in ("json", "regex", "choice", "grammar")
                if getattr(so, "json_" if k == "json" else k) is not None
            ]
            if len(given) != 1:
                no("structured_outputs", f"takes exactly one of json, regex, choice, grammar (got {len(given)})")
            if rf is not None and rf.type != "text":
                no("structured_outputs", "and response_format both constrain the answer; send one of them")
        if self.tools or self.functions:
            no("tools" if self.tools else "functions", "are not supported: SkinVL has no tool calling")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            no(
                "tool_choice" if self.tool_choice not in (None, "none") else "function_call",
                "is not supported: SkinVL has no tool calling",
            )
        if self.modalities not in (None, ["text"]):
            no("modalities", 'must be ["text"]: SkinVL answers in text only')
        if self.dicom_sr and self.stream:
            no("dicom_sr", "needs stream: false: the report comes with the whole answer")
        if self.stream_options is not None and not self.stream:
            no("stream_options", "is only allowed with stream: true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            no("max_tokens", "and max_completion_tokens disagree; send one of them")
        stops = self.stop_list
        if len(stops) > MAX_STOP:
            no("stop", f"takes at most {MAX_STOP} strings")
        if any(not s for s in stops):
            no("stop", "strings must not be empty")

    def constraint(self) -> tuple[Any, str] | None:
        """The answer's constraint (runtime/constraints.py) and the field it came from, or None (free text)."""
        from ..runtime.constraints import Choice, Grammar, JsonObject, JsonSchema, Regex

        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object":
            return JsonObject(), "response_format"
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            js = rf.json_schema
            return (
                JsonObject() if js.schema_ is None else JsonSchema(js.schema_, js.name)
            ), "response_format.json_schema.schema"
        if so is None:
            return None
        if so.json_ is not None:
            return JsonSchema(so.json_), "structured_outputs.json"
        if so.regex is not None:
            return Regex(so.regex), "structured_outputs.regex"
        if so.choice is not None:
            return Choice(so.choice), "structured_outputs.choice"
        return Grammar(so.grammar or ""), "structured_outputs.grammar"

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- responses ---
class Usage(BaseModel):
    prompt_tokens: int  # decoder positions of the prompt: text tokens plus the image's feature rows
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    """Not OpenAI's: llama.cpp's server sends the same idea; clients ignore unknown fields."""

    ttft_s: float
    prefill_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    prefilled_tokens: int
    new_tokens: int


class AssistantOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # OpenAI's; the official client's `parse` reads it


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """The model's own log-probabilities (log-softmax of its logits, before temperature, top-k/top-p and constraint
    masks), per answer token."""

    content: list[TokenLogprob]
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantOut
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: Timings | None = None
    warnings: list[str] | None = None  # skin-offline's: notices about the image (DICOM burned-in annotation)
    dicom_sr: str | None = None  # skin-offline's: base64 DICOM SR of the answer, when the request asked for it


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:  # OpenAI sends {"role": ...} once, then {"content": ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # present (null) on every chunk when include_usage; set on the last one
    timings: Timings | None = None
    warnings: list[str] | None = None  # on the first chunk, when the image raised notices


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "skin-offline"
    # skin-offline's own fields: what a front end must show next to the answers
    precision: str
    random_weights: bool
    context_length: int
    image_tokens: int
    provenance: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
