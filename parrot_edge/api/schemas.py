"""Request bodies of the OpenAI-compatible API, validated before anything reaches the engine.

Unknown fields are ignored (clients send extras); fields that would change the meaning of an answer and
that parrot-edge does not implement (n > 1, tools, logprobs) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parrot_edge.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 16


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.05
    repeat_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    logprobs: Literal[False, None] = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, seed=self.seed)

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in (self.stop or []) if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_GenerationBody):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Literal[None] = None

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionBody:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionBody(_GenerationBody):
    prompt: Annotated[str, Field(min_length=1)]
