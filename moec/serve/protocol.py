"""The OpenAI request bodies moec serves, as pydantic models, and the error body.

Validation is strict (a string where a number belongs is an error, not converted) and happens
before anything is queued: a body that is not JSON, a field of the wrong type or out of range
is an HTTP 400 with an OpenAI-style error body naming the field. Fields the server does not
know are ignored, as OpenAI-compatible servers do (clients send `user`, `metadata`, ...);
fields it knows but does not implement (`tools`, `logit_bias`, `presence_penalty`, `echo`,
...) are refused when set to anything but their neutral value, rather than silently ignored.

Beyond OpenAI's fields, vLLM's sampling extensions are accepted (pass them with the openai
client's `extra_body=`): `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, and `return_token_ids` (each choice then carries its `token_ids` and the
response its `prompt_token_ids`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 64  # choices per prompt
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields completions and chat completions share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by moec serve (use "
                               f"repetition_penalty)", param=name, code="unsupported")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by moec serve",
                           param="logit_bias", code="unsupported")
        if self.stop is not None and not isinstance(self.stop, str) and len(self.stop) > 16:
            raise ApiError(400, "at most 16 stop strings", param="stop")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")

    def sampling(self, max_new_tokens: int) -> dict[str, Any]:
        """SamplingParams keyword arguments (None: the model's default)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop": stop or None,
                "top_k": None if self.top_k in (None, -1) else self.top_k,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "ignore_eos": self.ignore_eos or None,
                "stop_token_ids": tuple(self.stop_token_ids) if self.stop_token_ids else None}


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported by moec serve", param="echo",
                           code="unsupported")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of is not supported by moec serve (use n)",
                           param="best_of", code="unsupported")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by moec serve", param="suffix",
                           code="unsupported")


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"messages[{i}]: only text content parts are supported "
                               f"(got a {part.type!r} part)", param="messages",
                               code="unsupported")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's extension

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise ApiError(400, "tools (function calling) are not supported by moec serve",
                           param="tools", code="unsupported")
        if self.tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice is not supported by moec serve",
                           param="tool_choice", code="unsupported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ApiError(400, "response_format other than text is not supported by moec "
                           "serve", param="response_format", code="unsupported")
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


def parse(model: type[_Body], body: bytes) -> Any:
    """A validated request, or ApiError 400 naming the first bad field."""
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}",
                           code="invalid_json") from None
        if err["type"] == "model_type":
            raise ApiError(400, "the request body must be a JSON object") from None
        if err["loc"] and err["loc"][0] == "prompt" and err["type"] != "missing":  # a union
            raise ApiError(400, "prompt: want a string, a list of strings, a list of token "
                           "ids or a list of lists of token ids", param="prompt") from None
        loc = ".".join(str(x) for x in err["loc"])
        raise ApiError(400, f"{loc or 'body'}: {err['msg']}",
                       param=str(err["loc"][0]) if err["loc"] else None) from None
    req.check_unsupported()
    return req
