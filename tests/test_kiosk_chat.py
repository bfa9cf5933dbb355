"""The classroom chat in Textual's Pilot, at 80x24, against real `parrot-edge serve` processes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import ClassVar

import httpx
import pytest
from serving import free_port, run_server
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Input

from parrot_edge.kiosk.app import ChatApp
from parrot_edge.kiosk.chat_screen import ChatScreen
from parrot_edge.kiosk.client import Connection
from parrot_edge.kiosk.conversation import AnswerMarkdown, Conversation, Exchange, Reply
from parrot_edge.kiosk.i18n import DEFAULT_SYSTEM_PROMPTS, TEXTS
from parrot_edge.kiosk.question_input import QuestionInput
from parrot_edge.kiosk.teacher import PinScreen
from parrot_edge.settings import Settings

EN, ES = TEXTS["en"], TEXTS["es"]
SIZE = (80, 24)
LONG_ANSWER = "Write a very long story, with many chapters, about a dragon who learns to read."
# Short answers keep the suite fast on 2 cores; the kiosk itself never sets max_tokens.
SHORT_ANSWERS = {"PARROT_EDGE_DEFAULT_MAX_TOKENS": "64"}


@pytest.fixture(scope="module")
def chat_model(default_gguf):
    """The model every kiosk test talks to."""
    return default_gguf


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("kiosk-server"), "--model", str(chat_model), "--slots", "2",
                    env=SHORT_ANSWERS) as server:
        yield server


def chat_app(url: str, **settings) -> ChatApp:
    return ChatApp(Settings(url=url, **{"lang": "en", **settings}))


def screen_lines(app: ChatApp) -> list[str]:
    """The screen as the student sees it, one string per row: the frame Textual's compositor paints for the
    terminal (the same one `export_screenshot` draws, a dialog over the screen below it), as text."""
    frame = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    return [Strip.join(strips).text.rstrip() for strips in frame.strips]


def screen(app: ChatApp) -> str:
    return "\n".join(screen_lines(app))


def on_screen(app: ChatApp, text: str) -> bool:
    return text in screen(app)


async def until(pilot, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Wait for a state, however busy the machine: Pilot's own pauses guess from CPU time that the app is done,
    and a loaded machine fools them. The timeout is only how long a broken chat gets to show it is broken."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen(pilot.app)}")
        await pilot.pause(0.05)


async def keys_handled(pilot) -> None:
    """Wait until every key pressed so far on the chat screen has been handled, even those that show nothing.

    The app handles keys in order, so once F2 has switched the language (and F2 again switched it back, with
    the key line on screen) every key before them has been handled too."""
    app = pilot.app
    for language in ("es" if app.language == "en" else "en", app.language):
        await pilot.press("f2")
        keys = TEXTS[language].keys.format(other=TEXTS[language].other_language)
        await until(pilot, lambda language=language, keys=keys: app.language == language and on_screen(app, keys),
                    "F2 to switch the language")


async def ask(pilot, question: str) -> Reply:
    chat = pilot.app.chat
    asked_before = len(chat.query(Exchange))
    await pilot.press(*question, "enter")

    def shown() -> bool:
        exchanges = chat.query(Exchange)
        return len(exchanges) > asked_before and exchanges.last().question == question
    await until(pilot, shown, "the question to appear")
    return chat.query(Exchange).last().reply


async def open_pin_dialog(pilot) -> None:
    """Ctrl+T, then wait for the dialog to take the keys: typed before that, a PIN would go to the question box."""
    await pilot.press("ctrl+t")
    await until(pilot, lambda: isinstance(pilot.app.screen, PinScreen) and on_screen(pilot.app, EN.pin_title) and
                (not pilot.app.screen.query("#pin") or pilot.app.focused is pilot.app.screen.query_one("#pin")),
                "the PIN dialog")


async def enter_pin(pilot, pin: str) -> None:
    """Type a PIN and Enter, waiting until the dialog has checked it (it empties the box when it does)."""
    box = pilot.app.screen.query_one("#pin", Input)
    await pilot.press(*pin)
    await until(pilot, lambda: box.value == pin, "the PIN to be typed")
    await pilot.press("enter")
    await until(pilot, lambda: box.value == "" or not box.is_attached, "the PIN to be checked")


def conversation_rows(app: ChatApp) -> list[str]:
    """The rows above the question box."""
    lines = screen_lines(app)
    return lines[:next((i for i, line in enumerate(lines) if line.startswith("+--")), len(lines))]


def settled(widget: Widget) -> bool:
    """Not scrolling: PgUp and PgDn scroll smoothly, over several frames."""
    return widget.scroll_y == widget.scroll_target_y and widget.scroll_x == widget.scroll_target_x


def answered(app: ChatApp) -> bool:
    return not app.chat.is_answering and bool(app.chat.turns) and app.chat.turns[-1]["role"] == "assistant"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def server_busy_slots(url: str) -> int:
    return httpx.get(url + "/health").json()["slots"]["busy"]


def test_streams_the_answer_as_markdown_onto_the_screen(server):
    async def scenario():
        app = chat_app(server.url)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_screen(app, EN.status_ready) and on_screen(app, EN.welcome.splitlines()[0])
                        and on_screen(app, EN.keys.format(other="español")), "the server to be ready")
            assert on_screen(app, EN.welcome.splitlines()[0]) and on_screen(app, EN.keys.format(other="español"))
            reply = await ask(pilot, "What is the capital of France?")
            assert not app.chat.query("#welcome")
            lengths = set()
            deadline = time.monotonic() + 120
            while not answered(app):  # sampled while it streams in
                assert time.monotonic() < deadline, f"no whole answer in 120 s; the screen shows:\n{screen(app)}"
                lengths.add(len(reply.text))
                await pilot.pause(0.02)
            await reply.finish()

            def all_on_screen() -> bool:
                shown = screen(app)
                return (" ".join(words(reply.text)[:3]) in " ".join(words(shown)) and EN.thinking not in shown
                        and re.search(rf"{re.escape(app.model)} \| ready \| \d+\.\d tok/s", shown) is not None)
            await until(pilot, all_on_screen, "the answer and its speed on screen")
            shown = screen(app)
            return app, reply, lengths, shown

    app, reply, lengths, shown = asyncio.run(scenario())
    answer = app.chat.turns[-1]["content"]
    assert answer == reply.text and len(words(answer)) >= 3
    assert len(lengths - {0, len(answer)}) >= 2, "the answer arrived all at once, not token by token"
    assert "You:" in shown and "What is the capital of France?" in shown and "Assistant:" in shown
    assert " ".join(words(answer)[:3]) in " ".join(words(shown)), shown
    assert EN.thinking not in shown
    assert re.search(rf"{re.escape(app.model)} \| ready \| \d+\.\d tok/s", shown), shown


async def show_three_lists(pilot) -> None:
    """Three answers with a list, a rule and a quote: enough to scroll, so the scrollbar shows; then wait until
    they are on screen, scrolled to the end."""
    conversation = pilot.app.chat.query_one(Conversation)
    for _ in range(3):
        exchange = await conversation.add_exchange("a list please")
        for fragment in ("Here is **a list**:\n\n", "- one\n", "- two\n\n", "---\n\n", "> quoted\n"):
            await exchange.reply.write(fragment)
        await exchange.reply.finish()

    def at_the_end() -> bool:
        rows = [row.strip() for row in conversation_rows(pilot.app) if row.strip()]
        return (conversation.max_scroll_y > 0 and conversation.scroll_y == conversation.max_scroll_y and
                settled(conversation) and rows[-1] == "| quoted" and rows.count("Here is a list:") >= 1)
    await until(pilot, at_the_end, "the answers on screen, scrolled to the end")


def test_markdown_and_scrolling_use_only_glyphs_the_linux_console_has():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}")
        async with app.run_test(size=SIZE) as pilot:
            await show_three_lists(pilot)
            conversation = app.chat.query_one(Conversation)
            bottom = screen_lines(app)
            await pilot.press("pageup")
            await until(pilot, lambda: conversation.scroll_y < conversation.max_scroll_y and settled(conversation)
                        and screen_lines(app) != bottom, "PgUp to scroll")
            return bottom, screen_lines(app)

    bottom, scrolled = asyncio.run(scenario())
    assert bottom != scrolled, "PgUp did not scroll"
    text = "\n".join(bottom)
    assert "Here is a list:" in text and "**" not in text
    assert any(line.strip() == "* one" for line in bottom) and any(line.strip() == "* two" for line in bottom)
    for lines in (bottom, scrolled):  # Latin-1: what the console fonts draw
        assert all(ord(char) < 0x100 for line in lines for char in line), "\n".join(lines)


def test_stop_keeps_the_partial_answer_and_frees_the_server(server):
    async def scenario():
        app = chat_app(server.url)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            reply = await ask(pilot, LONG_ANSWER)
            await until(pilot, lambda: len(words(reply.text)) >= 5, "the answer to start")
            await pilot.press("escape")
            await until(pilot, lambda: not app.chat.is_answering, "the answer to stop")
            stopped_at = reply.text  # the answer is over: nothing writes to it any more
            await until(pilot, lambda: server_busy_slots(server.url) == 0, "the server to free the slot")
            await until(pilot, lambda: on_screen(app, EN.stopped), "the answer to say it was stopped")
            assert reply.text == stopped_at
            assert on_screen(app, EN.stopped)
            assert app.chat.turns[-1] == {"role": "assistant", "content": stopped_at}
            await ask(pilot, "Thank you! What is 2 + 2?")
            await until(pilot, lambda: answered(app) and len(app.chat.turns) == 4, "the next answer")

    asyncio.run(scenario())


def test_new_conversation_leaves_nothing_behind(server):
    async def scenario():
        app = chat_app(server.url)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "What colour is the sky?")
            await until(pilot, lambda: answered(app), "the first answer")
            await ask(pilot, LONG_ANSWER)
            await until(pilot, lambda: server_busy_slots(server.url) == 1, "the second answer to start")
            await pilot.press(*"half a question")
            old_chat = app.chat
            await pilot.press("ctrl+n")
            await until(pilot, lambda: app.chat is not old_chat and on_screen(app, EN.welcome.splitlines()[0]),
                        "the welcome screen")
            await until(pilot, lambda: server_busy_slots(server.url) == 0, "the server to free the slot")
            assert not app.chat.query(Exchange) and app.chat.turns == []
            box = app.chat.query_one(QuestionInput)
            assert box.value == "" and box.history == []
            await pilot.press("up")
            await keys_handled(pilot)
            assert box.value == ""
            assert "sky" not in screen(app) and "dragon" not in screen(app)

    asyncio.run(scenario())


def test_up_and_down_bring_back_this_conversations_questions(server):
    async def scenario():
        app = chat_app(server.url)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            for question in ("Name a red fruit.", "Name a green fruit."):
                await ask(pilot, question)
                await until(pilot, lambda: answered(app), "the answer")
            box = app.chat.query_one(QuestionInput)
            await pilot.press(*"draft")
            recalled = []
            for key in ("up", "up", "up", "down", "down"):
                await pilot.press(key)
                await keys_handled(pilot)
                recalled.append(box.value)
            return recalled

    assert asyncio.run(scenario()) == ["Name a green fruit.", "Name a red fruit.", "Name a red fruit.",
                                       "Name a green fruit.", "draft"]


def test_idle_reset_wipes_the_conversation_and_returns_to_the_welcome(server):
    async def scenario():
        app = chat_app(server.url, idle_reset_seconds=3, kiosk=True, teacher_pin="2468")
        async with app.run_test(size=SIZE) as pilot:
            # The 3 s are the student's, not the answer's: on a loaded machine its first words can take longer,
            # and a question left waiting that long is wiped too (the next test). No reset until it is in.
            app.settings.idle_reset_seconds = 3600
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "What is a volcano?")
            await until(pilot, lambda: answered(app), "the answer")
            app.settings.idle_reset_seconds = 3
            student_chat = app.chat
            box = student_chat.query_one(QuestionInput)
            await pilot.press(*"unsent words", "f2", "ctrl+t")  # a half-typed question, Spanish, a dialog
            await until(pilot, lambda: box.value == "unsent words" and app.language == "es" and
                        isinstance(app.screen, PinScreen), "the keys to be handled")
            started = time.monotonic()  # the last key press, give or take a poll
            await until(pilot, lambda: app.chat is not student_chat, "the idle reset", 10)
            waited = time.monotonic() - started
            await until(pilot, lambda: app.screen is app.chat and on_screen(app, EN.welcome.splitlines()[0]) and
                        app.focused is app.chat.query_one(QuestionInput), "the welcome screen")
            assert 2.5 <= waited <= 5, waited
            assert app.screen is app.chat and app.language == "en"
            assert on_screen(app, EN.welcome.splitlines()[0]) and "volcano" not in screen(app)
            assert app.chat.turns == [] and not app.chat.query(Exchange)
            box = app.chat.query_one(QuestionInput)
            assert box.value == "" and box.history == []
            assert app.focused is box

    asyncio.run(scenario())


def test_idle_reset_also_wipes_a_question_still_waiting_for_the_server():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", idle_reset_seconds=1)
        async with app.run_test(size=SIZE) as pilot:
            await ask(pilot, "a question nobody answered")
            student_chat = app.chat
            await until(pilot, lambda: app.chat is not student_chat, "the idle reset", 5)
            await until(pilot, lambda: on_screen(app, EN.welcome.splitlines()[0]), "the welcome screen")
            assert "nobody answered" not in screen(app) and app.chat.query_one(QuestionInput).value == ""
            assert app.chat.turns == [] and not app.chat.is_answering

    asyncio.run(scenario())


def test_spanish_interface_and_switching_language_at_run_time(server):
    async def scenario():
        app = chat_app(server.url, lang="es")
        async with app.run_test(size=SIZE) as pilot:
            spanish = [ES.status_ready, *ES.welcome.splitlines(), ES.keys.format(other="English")]
            await until(pilot, lambda: all(on_screen(app, text) for text in spanish if text), "the server")
            spanish_screen = screen(app)
            assert app.system_message()["content"] == DEFAULT_SYSTEM_PROMPTS["es"]
            await ask(pilot, "Cuál es la capital de España?")  # Pilot cannot press "¿"
            await until(pilot, lambda: answered(app), "the answer")
            await pilot.press("pageup", "pageup", "pageup")
            await until(pilot, lambda: on_screen(app, "Tú:") and on_screen(app, "Asistente:"), "the question")
            asked_in_spanish = screen(app)
            await pilot.press("f2")
            english = ["You:", "Assistant:", EN.keys.format(other="español"), EN.status_ready]
            await until(pilot, lambda: all(on_screen(app, text) for text in english) and
                        not on_screen(app, "Tú:") and not on_screen(app, ES.status_ready), "the English interface")
            return app, spanish_screen, asked_in_spanish, screen(app)

    app, spanish_screen, asked_in_spanish, english_screen = asyncio.run(scenario())
    for line in (*ES.welcome.splitlines(), ES.keys.format(other="English")):
        assert line in spanish_screen
    assert "Tú:" in asked_in_spanish and "Asistente:" in asked_in_spanish
    assert "You:" in english_screen and "Assistant:" in english_screen and "Tú:" not in english_screen
    assert EN.keys.format(other="español") in english_screen and ES.status_ready not in english_screen
    assert app.system_message()["content"] == DEFAULT_SYSTEM_PROMPTS["en"]


def test_the_system_prompt_can_be_replaced_by_configuration():
    app = ChatApp(Settings(lang="es", system_prompt_es="Responde como un loro.", system_prompt_en="Be a parrot."))
    assert app.system_message() == {"role": "system", "content": "Responde como un loro."}
    app.language = "en"
    assert app.system_message() == {"role": "system", "content": "Be a parrot."}


def test_language_comes_from_the_locale_unless_set(monkeypatch):
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.setenv("LC_MESSAGES", "es_MX.UTF-8")
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert ChatApp(Settings()).language == "es"
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    assert ChatApp(Settings()).language == "en"
    assert ChatApp(Settings(lang="es")).language == "es"


def test_server_down_then_up_keeps_the_question_and_answers_it(chat_model, tmp_path):
    port = free_port()

    async def scenario():
        app = chat_app(f"http://127.0.0.1:{port}")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_screen(app, EN.status_down), "the waking-up status")
            question = "What do bees make?"
            await ask(pilot, question)
            await until(pilot, lambda: on_screen(app, EN.waking_up.split("...")[0]), "the waking-up message")
            await pilot.press("escape")  # given up on: the question goes back into the box, not lost
            box = app.chat.query_one(QuestionInput)
            await until(pilot, lambda: box.value == question and not app.chat.query(Exchange), "the question back")
            await pilot.press("enter")
            await until(pilot, lambda: app.chat.query(Exchange), "the question to be asked again")
            with run_server(tmp_path, "--model", str(chat_model), "--slots", "1", port=port, env=SHORT_ANSWERS,
                            wait=False):
                await until(pilot, lambda: answered(app), "the answer once the server is up")
                await until(pilot, lambda: on_screen(app, EN.status_ready) and
                            not on_screen(app, EN.waking_up.split("...")[0]), "the ready status")
                assert on_screen(app, EN.status_ready) and not on_screen(app, EN.waking_up.split("...")[0])
                return app.chat.turns

    turns = asyncio.run(scenario())
    assert [turn["role"] for turn in turns] == ["user", "assistant"] and turns[0]["content"] == "What do bees make?"


def test_a_server_restart_mid_answer_asks_again_once_it_is_back(chat_model, tmp_path):
    port = free_port()

    def serve():
        return run_server(tmp_path, "--model", str(chat_model), "--slots", "1", port=port, env=SHORT_ANSWERS)

    async def scenario():
        app = chat_app(f"http://127.0.0.1:{port}")
        async with app.run_test(size=SIZE) as pilot:
            with serve() as server:
                await until(pilot, lambda: app.server_ready.is_set(), "the server")
                reply = await ask(pilot, LONG_ANSWER)
                await until(pilot, lambda: len(words(reply.text)) >= 3, "the answer to start")
                server.process.kill()  # a crash; a graceful stop would let the answer finish first
            await until(pilot, lambda: on_screen(app, EN.waking_up.split("...")[0]), "the waking-up message")
            assert reply.text == "" and app.chat.is_answering  # the half answer goes; the question stays
            with serve():
                await until(pilot, lambda: answered(app), "the answer from the restarted server")
            return app.chat.turns

    turns = asyncio.run(scenario())
    assert [turn["role"] for turn in turns] == ["user", "assistant"] and turns[1]["content"]


def test_a_full_queue_becomes_a_countdown_and_an_automatic_retry(chat_model, tmp_path):
    env = {**SHORT_ANSWERS, "PARROT_EDGE_QUEUE_SIZE": "0"}
    with run_server(tmp_path, "--model", str(chat_model), "--slots", "1", env=env) as server:
        async def hold_the_only_slot(started: asyncio.Event, release: asyncio.Event) -> None:
            body = {"model": "any", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500, "temperature": 0,
                    "stream": True}
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                model = (await client.get("/health")).json()["model"]
                async with client.stream("POST", "/v1/completions", json={**body, "model": model}) as response:
                    assert response.status_code == 200
                    started.set()
                    await release.wait()

        async def scenario():
            app = chat_app(server.url)
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: app.server_ready.is_set(), "the server")
                started, release = asyncio.Event(), asyncio.Event()
                holder = asyncio.create_task(hold_the_only_slot(started, release))
                await until(pilot, lambda: started.is_set() or holder.done(), "the other request to take the slot")
                assert started.is_set(), holder.exception()
                await ask(pilot, "What is a rainbow?")
                busy = EN.busy.split(" Trying")[0]
                await until(pilot, lambda: on_screen(app, busy) and on_screen(app, "Trying again in"), "busy")
                countdown = re.search(r"Trying again in (\d+) s", screen(app))
                release.set()
                await holder
                await until(pilot, lambda: answered(app), "the retried answer")
                await until(pilot, lambda: not on_screen(app, busy), "the countdown to go")
                assert not on_screen(app, busy)
                return int(countdown.group(1))

        assert asyncio.run(scenario()) >= 1


@pytest.fixture(scope="module")
def locked_server(chat_model, tmp_path_factory):
    """A small context, and an API key like a teacher's machine on the school LAN."""
    tmp = tmp_path_factory.mktemp("kiosk-locked")
    (tmp / "key").write_text("classroom-key\n")
    with run_server(tmp, "--model", str(chat_model), "--slots", "1", "--ctx", "256",
                    "--api-key-file", str(tmp / "key"), env=SHORT_ANSWERS) as server:
        yield server


def test_a_conversation_too_long_for_the_context_says_to_start_a_new_one(locked_server):
    async def scenario():
        app = chat_app(locked_server.url, api_key="classroom-key")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "Hi!")
            await until(pilot, lambda: answered(app), "a short answer")
            app.chat.query_one(QuestionInput).value = "Tell me about the sea. " * 60  # as if pasted
            await pilot.press("enter")
            await until(pilot, lambda: on_screen(app, "This conversation is too long. Press Ctrl+N") and
                        not app.chat.is_answering, "the refusal")
            assert on_screen(app, "This conversation is too long. Press Ctrl+N")
            assert [turn["role"] for turn in app.chat.turns] == ["user", "assistant"]

    asyncio.run(scenario())


def test_a_wrong_api_key_is_explained_in_plain_words(locked_server):
    async def scenario():
        app = chat_app(locked_server.url, api_key="not-the-key")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "Hi!")
            await until(pilot, lambda: on_screen(app, "This computer is not allowed to use the assistant.") and
                        not app.chat.is_answering, "the refusal")
            assert on_screen(app, "This computer is not allowed to use the assistant.")
            assert app.chat.turns == []

    asyncio.run(scenario())


def test_kiosk_mode_refuses_to_quit_until_the_teacher_pin():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True, teacher_pin="2468")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"hello")
            for key in ("ctrl+q", "ctrl+c", "ctrl+z", "ctrl+backslash", "ctrl+p", "ctrl+d"):
                await pilot.press(key)
            await keys_handled(pilot)
            assert app.is_running and isinstance(app.screen, ChatScreen)
            assert app.chat.query_one(QuestionInput).value == "hello"
            assert "Ctrl+Q" not in screen(app)
            await open_pin_dialog(pilot)
            await enter_pin(pilot, "1111")
            await until(pilot, lambda: on_screen(app, EN.pin_wrong), "the wrong-PIN message")
            assert "1111" not in screen(app)
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is app.chat, "the chat again")
            assert app.is_running and app.screen is app.chat
            await open_pin_dialog(pilot)
            await enter_pin(pilot, "2468")
            await until(pilot, lambda: app.return_code is not None, "the chat to close")
        return app.return_code

    assert asyncio.run(scenario()) == 0


def test_kiosk_mode_without_a_pin_cannot_be_left_from_the_keyboard():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True)
        async with app.run_test(size=SIZE) as pilot:
            await open_pin_dialog(pilot)
            await until(pilot, lambda: on_screen(app, "No teacher PIN is set up"), "the explanation")
            await pilot.press(*"0000", "enter", "escape", "ctrl+q")
            await until(pilot, lambda: app.screen is app.chat, "the chat again")
            await keys_handled(pilot)
            assert app.is_running and app.screen is app.chat

    asyncio.run(scenario())


def test_three_wrong_pins_lock_the_dialog_for_a_minute(tmp_path):
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True, teacher_pin="2468", data_dir=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await open_pin_dialog(pilot)
            for _ in range(3):
                await enter_pin(pilot, "0000")
            await enter_pin(pilot, "2468")
            await until(pilot, lambda: on_screen(app, "Too many tries. Wait"), "the lock")
            assert app.is_running and on_screen(app, "Too many tries. Wait")
            return app.teacher_pin.locked_seconds()

    assert 55 <= asyncio.run(scenario()) <= 60
    # The chat started again (a crash, a reboot) is just as locked: no three more tries.
    again = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True, teacher_pin="2468", data_dir=tmp_path)
    assert 50 <= again.teacher_pin.locked_seconds() <= 60 and not again.teacher_pin.check("2468")


def test_links_in_an_answer_open_nothing():
    """Textual's Markdown opens a clicked link in a browser; in a kiosk that would be a way out."""
    from textual.app import App

    class Recording(App):
        opened: ClassVar[list[str]] = []

        def compose(self):
            yield AnswerMarkdown("[a link](https://example.com)")

        def open_url(self, url: str, *, new_tab: bool = True) -> None:
            self.opened.append(url)

    async def scenario():
        app = Recording()
        async with app.run_test() as pilot:
            markdown = app.query_one(AnswerMarkdown)
            markdown.post_message(AnswerMarkdown.LinkClicked(markdown, "https://example.com"))
            await pilot.pause()
            await until(pilot, lambda: not markdown._message_queue.qsize(), "the click to be handled")
        return app.opened

    assert asyncio.run(scenario()) == []


def test_outside_kiosk_mode_ctrl_q_quits():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_screen(app, EN.quit_hint), "the question box")
            assert on_screen(app, EN.quit_hint)
            await pilot.press("ctrl+q")
            await until(pilot, lambda: app.return_code is not None, "the chat to close")
        return app.return_code

    assert asyncio.run(scenario()) == 0


# -- how the chat looks: Textual's own snapshots (tests/__snapshots__/test_kiosk_chat/), of screens that do not
# depend on what a model says. `pytest --snapshot-update` writes them again after a deliberate change; look at
# each new SVG before committing it.

def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def still(app: ChatApp) -> None:
    """No blinking cursor: where it is in its blink would depend on how long the screenshot took."""
    for shown in app.screen_stack:
        for box in shown.query(Input):
            box.cursor_blink = False


async def server_down(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.connection is Connection.DOWN and
                on_screen(app, TEXTS[app.language].status_down), "the status to say the server is down")
    still(app)


def server_ready(app: ChatApp, speed: float | None = None) -> None:
    """What the status line shows with a server up, without one: /health is no longer polled."""
    app.workers.cancel_group(app, "server")
    app.connection = Connection.READY
    app.model = "smollm2-135m-instruct"
    app.speed = speed


def test_snapshot_the_welcome_screen(snap_compare):
    async def run_before(pilot):
        await server_down(pilot)
        await until(pilot, lambda: on_screen(pilot.app, EN.welcome.splitlines()[-1]) and
                    on_screen(pilot.app, EN.quit_hint), "the welcome")

    assert snap_compare(chat_app(dead_url()), terminal_size=SIZE, run_before=run_before)


def test_snapshot_the_spanish_kiosk_after_a_crash(snap_compare):
    async def run_before(pilot):
        await server_down(pilot)
        await until(pilot, lambda: on_screen(pilot.app, ES.recovered) and on_screen(pilot.app, ES.placeholder),
                    "the welcome, and the apology")

    app = ChatApp(Settings(url=dead_url(), lang="es", kiosk=True, teacher_pin="2468"), recovered=True)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_the_teacher_pin_dialog_after_a_wrong_pin(snap_compare):
    async def run_before(pilot):
        await server_down(pilot)
        await open_pin_dialog(pilot)
        still(pilot.app)
        await enter_pin(pilot, "1111")
        await until(pilot, lambda: on_screen(pilot.app, EN.pin_wrong), "the wrong-PIN message")

    assert snap_compare(chat_app(dead_url(), kiosk=True, teacher_pin="2468"), terminal_size=SIZE,
                        run_before=run_before)


def test_snapshot_a_question_waiting_for_the_server(snap_compare):
    async def run_before(pilot):
        await server_down(pilot)
        await ask(pilot, "Why is the sky blue?")
        await until(pilot, lambda: on_screen(pilot.app, EN.waking_up.split("...")[0]), "the waking-up message")

    assert snap_compare(chat_app(dead_url(), kiosk=True), terminal_size=SIZE, run_before=run_before)


def test_snapshot_the_busy_countdown(snap_compare):
    busy = EN.busy.format(seconds=7)

    async def run_before(pilot):
        app = pilot.app
        server_ready(app)
        still(app)
        exchange = await app.chat.query_one(Conversation).add_exchange("What is a rainbow?")
        exchange.reply.show_notice(lambda texts: texts.busy.format(seconds=7))
        await until(pilot, lambda: on_screen(app, busy[:40]) and on_screen(app, "smollm2-135m-instruct | ready"),
                    "the countdown")

    assert snap_compare(chat_app(dead_url(), kiosk=True), terminal_size=SIZE, run_before=run_before)


def test_snapshot_an_answer_in_markdown(snap_compare):
    answer = ("## Volcanoes\n\nA **volcano** lets *melted rock* (`magma`) out.\n\n1. Magma rises.\n2. It erupts!\n\n"
              "- lava\n- ash\n\n> Stay away.\n")

    async def run_before(pilot):
        app = pilot.app
        server_ready(app, speed=41.5)
        still(app)
        reply = (await app.chat.query_one(Conversation).add_exchange("What is a volcano?")).reply
        for piece in re.findall(r".{1,7}", answer, re.DOTALL):  # streamed in, as the server sends it
            await reply.write(piece)
        await reply.finish()
        await until(pilot, lambda: on_screen(app, "| Stay away.") and on_screen(app, "41.5 tok/s"),
                    "the whole answer")

    assert snap_compare(chat_app(dead_url(), kiosk=True), terminal_size=SIZE, run_before=run_before)


def test_snapshot_a_conversation_scrolled_to_its_end(snap_compare):
    """The screen the Linux-console glyph test reads: lists, a rule, a quote and the scrollbar."""
    async def run_before(pilot):
        await server_down(pilot)
        await show_three_lists(pilot)

    assert snap_compare(chat_app(dead_url()), terminal_size=SIZE, run_before=run_before)
