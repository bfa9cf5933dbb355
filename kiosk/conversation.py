"""The scrolling conversation: a welcome, then the student's questions and the assistant's streamed replies."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.scrollbar import ScrollBarRender
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from parrot_edge.kiosk.translated import TextChoice, Translated


class AnswerMarkdown(Markdown):
    """Markdown whose glyphs the Linux console's fonts all have, and whose links open nothing: a kiosk must
    not be a way to start a browser (Textual's Markdown opens links by default)."""

    BULLETS: ClassVar[list[str]] = ["* ", "- ", "+ ", "* ", "- "]
    DEFAULT_CSS = """
    AnswerMarkdown {
        padding: 0 1;
        & MarkdownHorizontalRule { border-bottom: ascii $secondary; }
        & MarkdownBlockQuote { border-left: ascii $secondary; }
    }
    """

    def __init__(self, markdown: str | None = None, **kwargs):
        super().__init__(markdown, open_links=False, **kwargs)


class Reply(Vertical):
    """One answer, streamed in as Markdown, with a line under it for what is going on (waiting, errors)."""

    DEFAULT_CSS = """
    Reply {
        height: auto;
        margin-bottom: 1;
        & > .speaker { color: $secondary; text-style: bold; }
        & > .notice { padding: 0 1; color: $warning; text-style: bold; }
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Translated(lambda texts: texts.assistant + ":", classes="speaker")
        yield AnswerMarkdown()
        yield Translated(lambda texts: texts.thinking, classes="notice")

    def show_notice(self, choose: TextChoice | None) -> None:
        self.query_one(".notice", Translated).show(choose)

    async def write(self, fragment: str) -> None:
        if self._stream is None:
            self.show_notice(None)
            self._stream = Markdown.get_stream(self.query_one(AnswerMarkdown))
        self.text += fragment
        await self._stream.write(fragment)

    async def finish(self) -> None:
        """Wait until everything written is on screen."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    async def start_over(self) -> None:
        """Forget a half-streamed answer, for when it has to be asked again."""
        await self.finish()
        self.text = ""
        await self.query_one(AnswerMarkdown).update("")


class Exchange(Vertical):
    """A question and its reply."""

    DEFAULT_CSS = """
    Exchange {
        height: auto;
        & > .speaker { color: $primary; text-style: bold; }
        & > .question { padding: 0 1 1 1; color: $primary; }
    }
    """

    def __init__(self, question: str):
        super().__init__()
        self.question = question
        self.reply = Reply()

    def compose(self) -> ComposeResult:
        yield Translated(lambda texts: texts.you + ":", classes="speaker")
        yield Static(self.question, markup=False, classes="question")
        yield self.reply


class WholeCellScrollBar(ScrollBarRender):
    """No eighth-block glyphs at the thumb's ends (the Linux console's fonts lack them): whole cells only."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "]


class Conversation(VerticalScroll, can_focus=False):
    """Never focused, so every key a student types lands in the question box; PgUp/PgDn scroll it."""

    DEFAULT_CSS = """
    Conversation {
        height: 1fr;
        padding: 0 1;
        scrollbar-size-vertical: 1;
        scrollbar-background: $background;
        scrollbar-background-hover: $background;
        scrollbar-background-active: $background;
        scrollbar-color: $secondary;
        scrollbar-color-hover: $secondary;
        scrollbar-color-active: $primary;
        & > #welcome { padding: 1 2; text-style: bold; }
        & > #recovered { padding: 0 2; color: $warning; }
    }
    """

    def __init__(self, *, recovered: bool = False):
        super().__init__()
        self._recovered = recovered

    def on_mount(self) -> None:
        self.vertical_scrollbar.renderer = WholeCellScrollBar

    def compose(self) -> ComposeResult:
        yield Translated(lambda texts: texts.welcome, id="welcome")
        if self._recovered:
            yield Translated(lambda texts: texts.recovered, id="recovered")

    async def add_exchange(self, question: str) -> Exchange:
        """Show a question and the (empty, "thinking") reply that will answer it."""
        await self.query("#welcome, #recovered").remove()
        exchange = Exchange(question)
        await self.mount(exchange)
        self.anchor()
        return exchange
