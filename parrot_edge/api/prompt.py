"""From a request to prompt tokens, where only the chat template's own markup can become control tokens.

A student who types `<|im_end|><|im_start|>system …` must not forge a system turn: message text is text.
llama.cpp, asked to parse special tokens, first cuts the text at every control token's text, then tokenises
the pieces between them on their own (llama-vocab.cpp, tokenizer_st_partition). So a prompt whose messages
hold no control-token text is tokenised exactly as before, in one call. Only when a message does hold such
text is the rendered prompt cut into the template's markup (special tokens parsed) and the messages (not
parsed); where the markup cannot be told apart from the messages, the request is refused.

This is CPU work (rendering, tokenising long conversations), so the routes run it off the event loop.
"""

from __future__ import annotations

import re
from typing import Any

from parrot_edge.api.chat_template import TemplateError, render_chat
from parrot_edge.engine.scheduler import Engine

# Stands for a message while the template is rendered to find its markup: private-use characters that no
# template produces and no tokenizer merges with the markup around them.
_MARK = "\ue000{}\ue001"


class PromptRefused(Exception):
    """Messages that cannot become a prompt safely; the message says why (HTTP 400)."""


class PromptBuilder:
    def __init__(self, engine: Engine):
        self.engine = engine
        info = engine.info
        self._render_args = {"bos_token": info.bos_text, "eos_token": info.eos_text}
        texts = sorted(set(engine.control_texts), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, texts))) if texts else None

    def holds_control_text(self, text: str) -> bool:
        return self._control is not None and self._control.search(text) is not None

    def chat(self, template: str | None, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt tokens of a chat: the template rendered, BOS added if the model wants one."""
        text = render_chat(template, messages, **self._render_args)
        if not any(self.holds_control_text(m["content"]) for m in messages):
            tokens = self.engine.tokenize(text, add_special=False, parse_special=True)
        else:
            tokens = self._markup_apart(template, messages, text)
        info = self.engine.info
        if info.add_bos and info.bos_id >= 0 and (not tokens or tokens[0] != info.bos_id):
            tokens.insert(0, info.bos_id)
        return tokens

    def completion(self, prompt: str) -> list[int]:
        """A completion's prompt is text as well: no control token can come from it."""
        return self.engine.tokenize(prompt, add_special=True, parse_special=False)

    def _markup_apart(self, template: str | None, messages: list[dict[str, Any]], text: str) -> list[int]:
        pieces = self._split(template, messages, text)
        if pieces is None:
            raise PromptRefused("a message holds the text of a control token (such as "
                                f"{self._control.search(''.join(m['content'] for m in messages))[0]!r}), "
                                "and this model's chat template does not keep messages apart from its markup; "
                                "remove it from the message")
        tokens: list[int] = []
        for index, piece in enumerate(pieces):  # markup, message, markup, …, markup
            if piece:
                tokens += self.engine.tokenize(piece, add_special=False, parse_special=index % 2 == 0)
        return tokens

    def _split(self, template: str | None, messages: list[dict[str, Any]], text: str) -> list[str] | None:
        """The rendered prompt as [markup, message, markup, …, markup], or None if it cannot be told apart."""
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        try:
            layout = render_chat(template, marked, **self._render_args)
        except TemplateError:
            return None
        markup = re.split("\ue000(\\d+)\ue001", layout)  # markup, index, markup, index, …, markup
        order = [int(i) for i in markup[1::2]]
        if order != list(range(len(messages))):
            return None  # a message dropped, repeated or reordered by the template
        pieces, position = [markup[0]], len(markup[0])
        if not text.startswith(markup[0]):
            return None
        for message, after in zip(messages, markup[2::2], strict=True):
            content = message["content"]
            # As rendered: the message itself, or trimmed (templates often `| trim` it).
            for shown in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if text.startswith(shown + after, position):
                    pieces += [shown, after]
                    position += len(shown) + len(after)
                    break
            else:
                return None
        return pieces if position == len(text) else None
