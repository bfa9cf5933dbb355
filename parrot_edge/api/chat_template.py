"""Chat templates: turning a list of messages into the prompt text a model was trained on.

A GGUF normally carries its template (`tokenizer.chat_template`, Jinja). Base models have none: the
converter writes DEFAULT_CHAT_TEMPLATE into them and the runtime falls back to it for any GGUF without
one. It is plain text on purpose, so a base model that never saw special chat tokens can still follow
the pattern; the runtime adds DEFAULT_STOP so an answer ends before the model writes the next "User:".
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from parrot_edge.errors import ParrotEdgeError

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] | trim }}\n"
    "{% else %}Assistant: {{ message['content'] | trim }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_STOP = ("\nUser:",)


class TemplateError(ParrotEdgeError):
    """The chat template could not render these messages."""


@lru_cache(maxsize=8)
def _compile(source: str):
    # Imported here: jinja2 is a server dependency, and the converter only needs the constant above.
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message: str):
        raise TemplateError(f"chat template refused the messages: {message}")

    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None


def render_chat(template: str | None, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True) -> str:
    """Render messages with the model's template (sandboxed: a template cannot reach Python objects)."""
    from jinja2 import TemplateError as JinjaError

    compiled = _compile(template or DEFAULT_CHAT_TEMPLATE)
    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None
    except RecursionError:
        raise TemplateError("chat template failed: it recursed without end") from None
