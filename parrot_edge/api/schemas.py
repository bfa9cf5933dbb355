"""Request bodies of the OpenAI-compatible API, validated before anything reaches the engine.

Unknown fields are ignored (clients send extras); fields that would change the meaning of an answer and
that parrot-edge does not implement (n > 1, tools, logprobs) are refused rather than silently dropped.
Every string must be encodable as UTF-8 (JSON allows a lone surrogate such as "\ud800"; no model can read one).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from parrot_edge.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 300  # OpenAI's own limit on logit_bias entries


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds {text[exc.start:exc.end]!r} at character {exc.start}, which is not "
                         "valid Unicode text (a lone surrogate?)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def grammar(self) -> str | None:
        """The GBNF grammar that holds an answer to this format (llama.cpp's JSON grammar and schema converter)."""
        if self.type == "text":
            return None
        from llama_cpp import llama_grammar  # the server's own dependency; slow to import, needed rarely

        if self.type == "json_object":
            return llama_grammar.JSON_GBNF
        try:
            return llama_grammar.json_schema_to_gbnf(json.dumps(self.json_schema.schema_))
        except Exception as exc:  # the converter raises assorted types for schemas it cannot express
            raise ValueError(f"response_format.json_schema cannot be turned into a grammar: {exc}") from None


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
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
    stop: Text | list[Text] | None = None
    n: Literal[1] = 1
    logprobs: Literal[False, None] = None
    user: Text | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if len(value) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
            bad = [key for key in value if not key.isdigit()]
            if bad:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), not {bad[:3]}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def sampling(self, n_vocab: int) -> SamplingParams:
        """The sampler settings; raises ValueError for a logit_bias token the model does not have or a
        response_format that cannot become a grammar."""
        bias = tuple((int(token), -float("inf") if value <= -100 else value)  # -100: never, as OpenAI's
                     for token, value in (self.logit_bias or {}).items())
        unknown = [token for token, _ in bias if token >= n_vocab]
        if unknown:
            raise ValueError(f"logit_bias names token ids this model does not have ({unknown[:3]}; it has "
                             f"{n_vocab})")
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, seed=self.seed, logit_bias=bias,
                              grammar=self.response_format.grammar() if self.response_format else None)

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
    prompt: Annotated[Text, Field(min_length=1)]
