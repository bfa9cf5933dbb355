"""`parrot-edge chat`: the classroom chat app, its kiosk locks and its idle reset.

Imports nothing but Textual, httpx and the settings: a kiosk-only machine has no llama.cpp and no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import ClassVar

from rich.console import Console
from textual import events, work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.theme import Theme

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.kiosk.chat_screen import ChatScreen
from parrot_edge.kiosk.client import Connection, ParrotClient, backoff
from parrot_edge.kiosk.i18n import DEFAULT_SYSTEM_PROMPTS, Language, language_from_locale
from parrot_edge.kiosk.teacher import PinScreen, TeacherPin
from parrot_edge.settings import Settings, load_settings

logger = logging.getLogger("parrot_edge.kiosk")

# Pure colours: exact on the Linux console's 16-colour palette, and as far apart as colours get.
HIGH_CONTRAST = Theme(
    name="parrot-high-contrast", dark=True,
    background="#000000", surface="#000000", panel="#000000", foreground="#ffffff",
    primary="#ffff00", secondary="#00ffff", accent="#ffff00",
    warning="#00ff00", error="#ff0000", success="#00ff00",
)
READY_POLL_SECONDS = 5.0


class ChatApp(App[None]):
    CSS_PATH = "app.tcss"
    # The palette's commands are English, and one of them quits.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+t", "teacher", show=False)]

    language: reactive[Language] = reactive("en")
    connection = reactive(Connection.CONNECTING)
    model = reactive("")
    speed: reactive[float | None] = reactive(None)

    def __init__(self, settings: Settings, *, recovered: bool = False):
        super().__init__()
        self.settings = settings
        self.kiosk = settings.kiosk
        self.home_language: Language = settings.lang or language_from_locale(os.environ)
        self.set_reactive(ChatApp.language, self.home_language)
        pin = settings.teacher_pin.get_secret_value() if settings.teacher_pin else None
        self.teacher_pin = TeacherPin(pin, settings.data_dir / "pin-lockout.json")
        self.client = ParrotClient(settings.url, settings.resolved_api_key())
        self.server_ready = asyncio.Event()
        self._server_news = asyncio.Event()
        self._recovered = recovered
        self._last_activity = time.monotonic()

    def on_mount(self) -> None:
        self.register_theme(HIGH_CONTRAST)
        self.theme = HIGH_CONTRAST.name
        self.chat = ChatScreen(recovered=self._recovered)
        self.push_screen(self.chat)
        self.watch_server()
        self.set_interval(min(1.0, self.settings.idle_reset_seconds / 4), self._reset_if_idle)
        # The service manager stops the chat with SIGTERM: leave the terminal as it was found.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.exit)

    async def on_unmount(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        await self.client.aclose()

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.InputEvent):
            self.note_activity()
        await super().on_event(event)

    def system_message(self) -> dict[str, str]:
        configured = {"en": self.settings.system_prompt_en, "es": self.settings.system_prompt_es}[self.language]
        return {"role": "system", "content": configured or DEFAULT_SYSTEM_PROMPTS[self.language]}

    # -- the server

    @work(group="server")
    async def watch_server(self) -> None:
        """Poll /health: every few seconds while it answers, with backoff while it does not."""
        delays = backoff()
        while True:
            health = await self.client.health()
            self.connection = health.connection
            if health.connection is Connection.READY:
                self.model = health.model or ""
                self.server_ready.set()
                delays = backoff()
                wait = READY_POLL_SECONDS
            else:
                self.server_ready.clear()
                wait = next(delays)
            self._server_news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server_news.wait(), wait)

    def lost_server(self) -> None:
        """A request found the server gone: hold every question until /health says it is back."""
        self.server_ready.clear()
        self.connection = Connection.DOWN
        self._server_news.set()

    # -- conversations

    def action_switch_language(self) -> None:
        self.language = "es" if self.language == "en" else "en"

    async def action_new_conversation(self) -> None:
        chat = ChatScreen()
        await self.switch_screen(chat)
        self.chat = chat

    def note_activity(self) -> None:
        self._last_activity = time.monotonic()

    async def _reset_if_idle(self) -> None:
        """The next student gets the welcome screen in the classroom's language, and nothing of the last one."""
        if time.monotonic() - self._last_activity < self.settings.idle_reset_seconds:
            return
        if self.screen is self.chat and not self.chat.has_student_traces and self.language == self.home_language:
            return
        while self.screen is not self.chat:
            await self.pop_screen()
        self.language = self.home_language
        await self.action_new_conversation()

    # -- leaving

    async def action_quit(self) -> None:
        if not self.kiosk:  # in kiosk mode only the teacher PIN or the service manager ends the chat
            await super().action_quit()

    def copy_to_clipboard(self, text: str) -> None:
        """No clipboard: it would carry one student's text over to the next, and the Linux console prints the
        OSC 52 escape that sends it to the terminal."""

    def action_help_quit(self) -> None:
        """Textual answers Ctrl+C with an English hint about quitting; the key line already says how."""

    def action_teacher(self) -> None:
        if not self.kiosk:
            self.exit()
        elif not isinstance(self.screen, PinScreen):
            self.push_screen(PinScreen(self.teacher_pin), self._leave_if_unlocked)

    def _leave_if_unlocked(self, unlocked: bool | None) -> None:
        if unlocked:
            self.exit()


def chat_command(args) -> int:
    settings = load_settings(url=args.url, lang=args.lang, kiosk=args.kiosk)
    try:
        settings.resolved_api_key()
    except OSError as exc:
        raise ParrotEdgeError(f"cannot read the API key file {settings.api_key_file}: {exc}") from None
    log_to(settings.data_dir / "chat.log")
    if not settings.kiosk:
        app = ChatApp(settings)
        app.run()
        return app.return_code or 0
    return run_kiosk(settings)


def run_kiosk(settings: Settings) -> int:
    """Run until the teacher PIN closes the chat. A crash starts a fresh chat instead of leaving a student
    at a shell prompt, and its traceback (which would show conversation text) is never printed."""
    os.environ.pop("TEXTUAL_ALLOW_SIGNALS", None)  # keeps Ctrl+C, Ctrl+Z and Ctrl+\ plain keys, not signals
    if not settings.teacher_pin:
        logger.warning("kiosk mode without a teacher_pin: only the service manager can stop the chat")
    recovered = False
    while True:
        app = ChatApp(settings, recovered=recovered)
        app.error_console = Console(file=io.StringIO())
        try:
            app.run()
        except Exception:
            logger.exception("the chat failed")
        if app.return_code == 0:
            return 0
        logger.error("the chat stopped after an unexpected error (exit code %s); starting it again",
                     app.return_code)
        recovered = True
        time.sleep(1)


def log_to(path: Path) -> None:
    """Errors for the teacher or technician, never conversation text. The screen is the chat's, so a log file
    that cannot be written means no log rather than text over the chat."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = RotatingFileHandler(path, maxBytes=1 << 20, backupCount=1, encoding="utf-8")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
