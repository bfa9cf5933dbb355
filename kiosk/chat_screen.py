"""One student's conversation, from the welcome to the last answer.

A new conversation is a new ChatScreen: the questions, answers and input history of the old one go away
with it, and none of them is ever written to disk.
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Input
from textual.worker import Worker

from parrot_edge.kiosk.client import (
    AnswerEnd,
    ConversationTooLong,
    NotAllowed,
    ServerBusy,
    ServerRefused,
    ServerUnavailable,
)
from parrot_edge.kiosk.conversation import Conversation, Exchange, Reply
from parrot_edge.kiosk.question_input import QuestionInput
from parrot_edge.kiosk.status import KeyHints, StatusLine
from parrot_edge.kiosk.translated import TextChoice

logger = logging.getLogger(__name__)


class ChatScreen(Screen):
    AUTO_FOCUS = "#question"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", show=False),
        Binding("ctrl+n", "app.new_conversation", show=False),
        Binding("f2", "app.switch_language", show=False),
        Binding("pageup", "scroll_conversation(-1)", show=False),
        Binding("pagedown", "scroll_conversation(1)", show=False),
    ]

    def __init__(self, *, recovered: bool = False):
        super().__init__()
        self._recovered = recovered
        self.turns: list[dict[str, str]] = []  # what the model sees, after the system prompt
        self._answering: Worker | None = None

    def compose(self) -> ComposeResult:
        yield Conversation(recovered=self._recovered)
        yield QuestionInput(show_quit_key=not self.app.kiosk)
        yield StatusLine()
        yield KeyHints()

    @property
    def is_answering(self) -> bool:
        return self._answering is not None and not self._answering.is_finished

    @property
    def has_student_traces(self) -> bool:
        return bool(self.turns or self.query_one(QuestionInput).value)

    def action_stop(self) -> None:
        if self._answering is not None:
            self._answering.cancel()

    def action_scroll_conversation(self, pages: int) -> None:
        conversation = self.query_one(Conversation)
        if pages < 0:
            conversation.scroll_page_up()
        else:
            conversation.scroll_page_down()

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question or self.is_answering:  # the text stays in the box until this answer is done
            return
        box = self.query_one(QuestionInput)
        box.remember(question)
        box.clear()
        self.turns.append({"role": "user", "content": question})
        exchange = await self.query_one(Conversation).add_exchange(question)
        self._answering = self.answer(exchange)

    @work(group="answer", exit_on_error=False)
    async def answer(self, exchange: Exchange) -> None:
        reply = exchange.reply
        try:
            await self._stream_answer(reply)
        except asyncio.CancelledError:
            await self._stopped(exchange)
            raise
        except Exception as problem:
            self.turns.pop()  # unanswered, so not part of what the model sees next time
            await reply.finish()
            reply.show_notice(_report(problem))
        finally:
            self.app.note_activity()  # the idle time counts from the end of the answer

    async def _stream_answer(self, reply: Reply) -> None:
        app = self.app
        while True:
            await self._wait_for_server(reply)
            try:
                async for piece in app.client.stream_chat(app.model, [app.system_message(), *self.turns]):
                    if isinstance(piece, AnswerEnd):
                        app.speed = piece.tokens_per_second
                    else:
                        app.note_activity()  # someone may be reading it: no idle reset mid-answer
                        await reply.write(piece)
            except ServerUnavailable as exc:
                logger.info("the server went away mid-request (%s); asking again once it is back", exc)
                app.lost_server()
                await reply.start_over()
            except ServerBusy as busy:
                await reply.start_over()
                await _count_down(reply, busy.retry_after)
            else:
                await reply.finish()
                reply.show_notice(None)
                self.turns.append({"role": "assistant", "content": reply.text})
                return

    async def _wait_for_server(self, reply: Reply) -> None:
        server_ready = self.app.server_ready
        if not server_ready.is_set():
            reply.show_notice(lambda texts: texts.waking_up)
            await server_ready.wait()
            reply.show_notice(lambda texts: texts.thinking)

    async def _stopped(self, exchange: Exchange) -> None:
        """Keep what was said so far; if nothing was, take the question back into the box."""
        reply = exchange.reply
        await reply.finish()
        if reply.text:
            self.turns.append({"role": "assistant", "content": reply.text})
            reply.show_notice(lambda texts: texts.stopped)
            return
        self.turns.pop()
        await exchange.remove()
        box = self.query_one_optional(QuestionInput)  # None when the whole screen is being thrown away
        if box is not None and not box.value:
            box.value = exchange.question


async def _count_down(reply: Reply, seconds: int) -> None:
    for left in range(seconds, 0, -1):
        reply.show_notice(lambda texts, left=left: texts.busy.format(seconds=left))
        await asyncio.sleep(1)
    reply.show_notice(lambda texts: texts.thinking)


def _report(problem: Exception) -> TextChoice:
    """Log a problem for the teacher and return the student's version of it."""
    if isinstance(problem, ConversationTooLong):
        return lambda texts: texts.too_long
    if isinstance(problem, NotAllowed):
        logger.error("the server refused this kiosk's API key: %s", problem)
        return lambda texts: texts.not_allowed
    if isinstance(problem, ServerRefused):
        logger.error("the server could not answer: %s", problem)
        return lambda texts: texts.refused
    logger.error("unexpected error while answering", exc_info=problem)
    return lambda texts: texts.unexpected
