"""OpenAI's request and response bodies for `llada-moe serve`, as pydantic models.

Requests are validated strictly (a number is not its text, true is not 1, NaN and Infinity are refused) and refuse
unknown fields; FastAPI turns a failure into a `RequestValidationError`, which the server answers with OpenAI's error
body, naming the field. The decoding fields (`DecodingFields`) are typed here and checked by
`settings.decoding_config`, the translation every front end shares, so their ranges and messages are the same as the
command line's.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..validators import is_number


MAX_CHOICES = 16  # rows one request may ask for: n x prompts
MAX_STOPS = 4  # OpenAI's limit on `stop`
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------------------------
# Field types
# ----------------------------------------------------------------------------------------------------------------


def _unicode(value: str) -> str:
    """JSON allows lone surrogates, which no tokenizer (nor a UTF-8 response) takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "invalid_value", "holds a lone surrogate ({reason}); expected valid Unicode text", {"reason": err.reason}
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


def _content(value: Any) -> str:
    """A message's text: a string, or a non-empty list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list) and value and all(
        isinstance(part, dict) and set(part) == {"type", "text"} and part["type"] == "text"
        and isinstance(part["text"], str) for part in value
    ):
        return "".join(_unicode(part["text"]) for part in value)
    raise PydanticCustomError(
        "invalid_value", 'expected a string or a non-empty list of {"type": "text", "text": "..."} parts'
    )


def _prompts(value: Any) -> list[str]:
    """`/v1/completions`' prompt: a string or a list of 1 to MAX_CHOICES strings."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not 0 < len(prompts) <= MAX_CHOICES or not all(
        isinstance(prompt, str) for prompt in prompts
    ):
        raise PydanticCustomError("invalid_value", f"expected a string or a list of 1 to {MAX_CHOICES} strings")
    return [_unicode(prompt) for prompt in prompts]


def _stops(value: Any) -> list[str]:
    """`stop`: null, a non-empty string or a list of at most MAX_STOPS of them."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise PydanticCustomError("invalid_value", f"expected a string or a list of at most {MAX_STOPS} strings")
    if not all(isinstance(stop, str) and stop for stop in stops):
        raise PydanticCustomError(
            "invalid_value", f"expected a non-empty string or a list of at most {MAX_STOPS} of them"
        )
    return [_unicode(stop) for stop in stops]


def _same(given: Any, neutral: Any) -> bool:
    """`given` is `neutral` in JSON terms (0 and 0.0 alike; true is not 1)."""
    if isinstance(neutral, bool):
        return given is neutral
    if isinstance(neutral, int):
        return is_number(given) and given == neutral
    return type(given) is type(neutral) and given == neutral


def off(*neutral: Any) -> PlainValidator:
    """A standard OpenAI field this server has no use for: accepted only as null or a value that means "off"."""

    def check(value: Any) -> Any:
        if value is None or any(_same(value, one) for one in neutral):
            return value
        accepted = " or ".join(json.dumps(one) for one in neutral)
        raise PydanticCustomError(
            "unsupported_value", "expected {accepted}: not supported by masked-diffusion decoding",
            {"accepted": accepted},
        )

    return PlainValidator(check)


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


class DecodingFields(BaseModel):
    """The request fields that set the decoding; unset ones keep the server's defaults. Typed here, ranged (with the
    command line's messages) by `settings.decoding_config`: a preset first, then the fields."""

    model_config = STRICT

    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float | None = None
    top_p: float | None = None
    # llada-moe's own (the openai client's `extra_body`)
    steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    factor: float | None = None
    cache: Text | None = None
    remasking: Text | None = None
    cfg_scale: float | None = None
    top_k: int | None = None
    preset: Text | None = None


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class GenerationRequest(DecodingFields):
    """The fields `/v1/chat/completions` and `/v1/completions` share."""

    model: Text
    stop: Annotated[list[str], PlainValidator(_stops)] = []
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None  # torch.Generator.manual_seed takes [0, 2**64)
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Standard fields masked diffusion has no use for, accepted only "off".
    presence_penalty: Annotated[Any, off(0)] = None
    frequency_penalty: Annotated[Any, off(0)] = None
    logprobs: Annotated[Any, off(False)] = None
    top_logprobs: Annotated[Any, off(0)] = None
    logit_bias: Annotated[Any, off({})] = None
    tools: Annotated[Any, off([])] = None
    tool_choice: Annotated[Any, off("none")] = None
    parallel_tool_calls: Annotated[Any, off(False)] = None
    response_format: Annotated[Any, off({"type": "text"})] = None
    store: Annotated[Any, off(False)] = None
    echo: Annotated[Any, off(False)] = None
    best_of: Annotated[Any, off(1)] = None
    suffix: Annotated[Any, off("")] = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise PydanticCustomError("invalid_value", "expected to be left out unless `stream` is true")
        return value


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, PlainValidator(_content)]


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    prompt: Annotated[list[str], PlainValidator(_prompts)]


# ----------------------------------------------------------------------------------------------------------------
# Responses (a streamed chunk is written with `exclude_unset`: its `usage` only with stream_options.include_usage)
# ----------------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail
