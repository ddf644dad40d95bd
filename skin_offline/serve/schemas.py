"""OpenAI Chat Completions request and response models (field names are OpenAI's).

Parsing is strict (no "10" -> 10, no 1 -> True) and unknown fields are refused with a 400 naming them, so a
client never gets an answer that silently ignored something it asked for. Fields that change nothing about
the answer (`user`, `metadata`, `store`, ...) are accepted and ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

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
    response_format: dict[str, Any] | None = None
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
        def no(param: str, why: str):
            raise APIError(400, f"'{param}' {why}", "invalid_request_error", param, "unsupported_parameter")

        if self.n not in (None, 1):
            no("n", "must be 1: this server returns one choice per request (send n requests instead)")
        if self.logprobs:
            no("logprobs", "is not supported by this server")
        if self.top_logprobs is not None:
            no("top_logprobs", "is not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                no(name, "is not supported (only 0); LLaVA's evaluation decodes without penalties")
        if self.logit_bias:
            no("logit_bias", "is not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            no("response_format", "is not supported: only {\"type\": \"text\"} (no JSON mode or schemas)")
        if self.tools or self.functions:
            no("tools" if self.tools else "functions", "are not supported: SkinVL has no tool calling")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            no("tool_choice" if self.tool_choice not in (None, "none") else "function_call",
               "is not supported: SkinVL has no tool calling")
        if self.modalities not in (None, ["text"]):
            no("modalities", "must be [\"text\"]: SkinVL answers in text only")
        if self.dicom_sr and self.stream:
            no("dicom_sr", "needs stream: false: the report comes with the whole answer")
        if self.stream_options is not None and not self.stream:
            no("stream_options", "is only allowed with stream: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            no("max_tokens", "and max_completion_tokens disagree; send one of them")
        stops = self.stop_list
        if len(stops) > MAX_STOP:
            no("stop", f"takes at most {MAX_STOP} strings")
        if any(not s for s in stops):
            no("stop", "strings must not be empty")

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


class Choice(BaseModel):
    index: int = 0
    message: AssistantOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


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
    def _drop_none(self, handler):  # OpenAI sends {"role": ...} once, then {"content": ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


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
