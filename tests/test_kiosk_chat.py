"""The classroom chat in Textual's Pilot, at 80x24, against real `parrot-edge serve` processes."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Callable

import httpx
import pytest
from serving import free_port, run_server

from parrot_edge.kiosk.app import ChatApp
from parrot_edge.kiosk.chat_screen import ChatScreen
from parrot_edge.kiosk.conversation import Conversation, Exchange, Reply
from parrot_edge.kiosk.i18n import DEFAULT_SYSTEM_PROMPTS, TEXTS
from parrot_edge.kiosk.question_input import QuestionInput
from parrot_edge.settings import Settings

EN, ES = TEXTS["en"], TEXTS["es"]
SIZE = (80, 24)
LONG_ANSWER = "Write a very long story, with many chapters, about a dragon who learns to read."
# Short answers keep the suite fast on 2 cores; the kiosk itself never sets max_tokens.
SHORT_ANSWERS = {"PARROT_EDGE_DEFAULT_MAX_TOKENS": "64"}
SVG_CELL_WIDTH = 12.2  # Rich's SVG export: 0.61 em of a 20 px font


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
    """The screen as the student sees it, one string per row, rebuilt from Textual's SVG screenshot."""
    rows = [[" "] * app.size.width for _ in range(app.size.height)]
    svg = app.export_screenshot()
    for x, row, text in re.findall(r'<text class="[^"]*" x="([\d.]+)" y="[\d.]+" textLength="[\d.]+" '
                                   r'clip-path="url\(#terminal-\d+-line-(\d+)\)">([^<]*)</text>', svg):
        column = round(float(x) / SVG_CELL_WIDTH)
        for offset, char in enumerate(html.unescape(text).replace("\xa0", " ").rstrip("\n")):
            rows[int(row)][column + offset] = char
    return ["".join(row).rstrip() for row in rows]


def screen(app: ChatApp) -> str:
    return "\n".join(screen_lines(app))


def on_screen(app: ChatApp, text: str) -> bool:
    return text in screen(app)


async def until(pilot, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen(pilot.app)}")
        await pilot.pause(0.05)


async def ask(pilot, question: str) -> Reply:
    await pilot.press(*question, "enter")
    await until(pilot, lambda: pilot.app.chat.query(Exchange), "the question to appear")
    return pilot.app.chat.query(Exchange).last().reply


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
            await until(pilot, lambda: on_screen(app, EN.status_ready), "the server to be ready")
            assert on_screen(app, EN.welcome.splitlines()[0]) and on_screen(app, EN.keys.format(other="español"))
            reply = await ask(pilot, "What is the capital of France?")
            assert not app.chat.query("#welcome")
            lengths = set()
            while not answered(app):
                lengths.add(len(reply.text))
                await pilot.pause(0.02)
            await reply.finish()
            await pilot.pause()
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


def test_markdown_and_scrolling_use_only_glyphs_the_linux_console_has():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}")
        async with app.run_test(size=SIZE) as pilot:
            conversation = app.chat.query_one(Conversation)
            for _ in range(3):  # enough to scroll, so the scrollbar shows
                exchange = await conversation.add_exchange("a list please")
                for fragment in ("Here is **a list**:\n\n", "- one\n", "- two\n\n", "---\n\n", "> quoted\n"):
                    await exchange.reply.write(fragment)
                await exchange.reply.finish()
            await pilot.pause()
            bottom = screen_lines(app)
            await pilot.press("pageup")
            await pilot.pause()
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
            stopped_at = reply.text
            await until(pilot, lambda: server_busy_slots(server.url) == 0, "the server to free the slot", 5)
            await pilot.pause(1)
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
            await until(pilot, lambda: server_busy_slots(server.url) == 0, "the server to free the slot", 5)
            assert not app.chat.query(Exchange) and app.chat.turns == []
            box = app.chat.query_one(QuestionInput)
            assert box.value == "" and box.history == []
            await pilot.press("up")
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
                recalled.append(box.value)
            return recalled

    assert asyncio.run(scenario()) == ["Name a green fruit.", "Name a red fruit.", "Name a red fruit.",
                                       "Name a green fruit.", "draft"]


def test_idle_reset_wipes_the_conversation_and_returns_to_the_welcome(server):
    async def scenario():
        app = chat_app(server.url, idle_reset_seconds=3, kiosk=True, teacher_pin="2468")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "What is a volcano?")
            await until(pilot, lambda: answered(app), "the answer")
            await pilot.press(*"unsent words", "f2", "ctrl+t")  # a half-typed question, Spanish, a dialog
            student_chat = app.chat
            started = time.monotonic()
            await until(pilot, lambda: app.chat is not student_chat, "the idle reset", 10)
            waited = time.monotonic() - started
            await pilot.pause()
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
            await pilot.pause()
            assert "nobody answered" not in screen(app) and app.chat.query_one(QuestionInput).value == ""
            assert app.chat.turns == [] and not app.chat.is_answering

    asyncio.run(scenario())


def test_spanish_interface_and_switching_language_at_run_time(server):
    async def scenario():
        app = chat_app(server.url, lang="es")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_screen(app, ES.status_ready), "the server")
            spanish_screen = screen(app)
            assert app.system_message()["content"] == DEFAULT_SYSTEM_PROMPTS["es"]
            await ask(pilot, "Cuál es la capital de España?")  # Pilot cannot press "¿"
            await until(pilot, lambda: answered(app), "the answer")
            await pilot.press("pageup", "pageup", "pageup")
            await pilot.pause()
            asked_in_spanish = screen(app)
            await pilot.press("f2")
            await pilot.pause()
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
                await until(pilot, lambda: answered(app), "the answer once the server is up", 120)
                await pilot.pause()
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
            await until(pilot, lambda: on_screen(app, EN.waking_up.split("...")[0]), "the waking-up message", 15)
            assert reply.text == "" and app.chat.is_answering  # the half answer goes; the question stays
            with serve():
                await until(pilot, lambda: answered(app), "the answer from the restarted server", 120)
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
                await started.wait()
                await ask(pilot, "What is a rainbow?")
                busy = EN.busy.split(" Trying")[0]
                await until(pilot, lambda: on_screen(app, busy) and on_screen(app, "Trying again in"), "busy")
                countdown = re.search(r"Trying again in (\d+) s", screen(app))
                release.set()
                await holder
                await until(pilot, lambda: answered(app), "the retried answer", 120)
                await pilot.pause()
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
            await until(pilot, lambda: not app.chat.is_answering, "the refusal")
            await pilot.pause()
            assert on_screen(app, "This conversation is too long. Press Ctrl+N")
            assert [turn["role"] for turn in app.chat.turns] == ["user", "assistant"]

    asyncio.run(scenario())


def test_a_wrong_api_key_is_explained_in_plain_words(locked_server):
    async def scenario():
        app = chat_app(locked_server.url, api_key="not-the-key")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.server_ready.is_set(), "the server")
            await ask(pilot, "Hi!")
            await until(pilot, lambda: not app.chat.is_answering, "the refusal")
            await pilot.pause()
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
            await pilot.pause()
            assert app.is_running and isinstance(app.screen, ChatScreen)
            assert app.chat.query_one(QuestionInput).value == "hello"
            assert "Ctrl+Q" not in screen(app)
            await pilot.press("ctrl+t")
            await until(pilot, lambda: on_screen(app, EN.pin_title), "the PIN dialog")
            await pilot.press(*"1111", "enter")
            await until(pilot, lambda: on_screen(app, EN.pin_wrong), "the wrong-PIN message")
            assert "1111" not in screen(app)
            await pilot.press("escape")
            await pilot.pause()
            assert app.is_running and app.screen is app.chat
            await pilot.press("ctrl+t", *"2468", "enter")
            await pilot.pause()
        return app.return_code

    assert asyncio.run(scenario()) == 0


def test_kiosk_mode_without_a_pin_cannot_be_left_from_the_keyboard():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+t")
            await until(pilot, lambda: on_screen(app, "No teacher PIN is set up"), "the explanation")
            await pilot.press(*"0000", "enter", "escape", "ctrl+q")
            await pilot.pause()
            assert app.is_running and app.screen is app.chat

    asyncio.run(scenario())


def test_three_wrong_pins_lock_the_dialog_for_a_minute():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}", kiosk=True, teacher_pin="2468")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("ctrl+t")
            for _ in range(3):
                await pilot.press(*"0000", "enter")
            await pilot.press(*"2468", "enter")
            await pilot.pause()
            assert app.is_running and on_screen(app, "Too many tries. Wait")
            return app.teacher_pin.locked_seconds()

    assert 55 <= asyncio.run(scenario()) <= 60


def test_outside_kiosk_mode_ctrl_q_quits():
    async def scenario():
        app = chat_app(f"http://127.0.0.1:{free_port()}")
        async with app.run_test(size=SIZE) as pilot:
            assert on_screen(app, EN.quit_hint)
            await pilot.press("ctrl+q")
            await pilot.pause()
        return app.return_code

    assert asyncio.run(scenario()) == 0
