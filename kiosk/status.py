"""The two bottom lines: the status (model, connection, answer speed) and the keys a student can use."""

from __future__ import annotations

from parrot_edge.kiosk.client import Connection
from parrot_edge.kiosk.i18n import Texts
from parrot_edge.kiosk.translated import Translated


class StatusLine(Translated):
    DEFAULT_CSS = """
    StatusLine {
        height: 1;
        padding: 0 1;
        background: $secondary;
        color: $background;
        text-style: bold;
    }
    """

    def __init__(self) -> None:
        super().__init__(self._describe)

    def on_mount(self) -> None:  # Textual runs Translated.on_mount (the language) as well
        for attribute in ("connection", "model", "speed"):
            self.watch(self.app, attribute, lambda _value: self.show(self._describe), init=False)

    def _describe(self, texts: Texts) -> str:
        connection = {
            Connection.CONNECTING: texts.status_connecting,
            Connection.READY: texts.status_ready,
            Connection.LOADING: texts.status_loading,
            Connection.DOWN: texts.status_down,
            Connection.BROKEN: texts.status_broken,
        }[self.app.connection]
        parts = [self.app.model, connection]
        if self.app.speed is not None:
            parts.append(texts.status_speed.format(speed=self.app.speed))
        return " | ".join(part for part in parts if part)


class KeyHints(Translated):
    DEFAULT_CSS = """
    KeyHints {
        height: 1;
        padding: 0 1;
        color: $foreground;
    }
    """

    def __init__(self) -> None:
        super().__init__(lambda texts: texts.keys.format(other=texts.other_language))
