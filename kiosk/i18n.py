"""Every string a student sees, in English and Spanish, and the default system prompts.

`Texts` has no defaults, so a string missing from one language fails at import, not in a classroom.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Language = Literal["en", "es"]


@dataclass(frozen=True)
class Texts:
    other_language: str
    welcome: str
    recovered: str
    placeholder: str
    you: str
    assistant: str
    thinking: str
    waking_up: str
    busy: str
    too_long: str
    stopped: str
    not_allowed: str
    refused: str
    unexpected: str
    status_connecting: str
    status_ready: str
    status_loading: str
    status_down: str
    status_broken: str
    status_speed: str
    keys: str
    quit_hint: str
    pin_title: str
    pin_prompt: str
    pin_wrong: str
    pin_locked: str
    pin_not_set: str


TEXTS: Mapping[Language, Texts] = {
    "en": Texts(
        other_language="español",
        welcome="Hello! I am the classroom assistant.\n\nType a question below and press Enter.",
        recovered="Sorry, something went wrong. Let's start again.",
        placeholder="Type your question and press Enter",
        you="You",
        assistant="Assistant",
        thinking="Thinking...",
        waking_up="The assistant is waking up... Your question will be sent as soon as it is ready.",
        busy="Many students are asking right now. Trying again in {seconds} s...",
        too_long="This conversation is too long. Press Ctrl+N to start a new one.",
        stopped="(stopped)",
        not_allowed="This computer is not allowed to use the assistant. Please ask your teacher.",
        refused="The assistant could not answer that. Please try again, or ask your teacher.",
        unexpected="Oops, something went wrong. Please try again.",
        status_connecting="connecting...",
        status_ready="ready",
        status_loading="getting ready...",
        status_down="waking up...",
        status_broken="not working - ask your teacher",
        status_speed="{speed:.1f} tok/s",
        keys="Enter send  Esc stop  Ctrl+N new chat  F2 {other}  PgUp/PgDn scroll",
        quit_hint="Ctrl+Q quit",
        pin_title="Teacher PIN",
        pin_prompt="Type the teacher PIN and press Enter to close the chat. Esc goes back.",
        pin_wrong="Wrong PIN.",
        pin_locked="Too many tries. Wait {seconds} s.",
        pin_not_set="No teacher PIN is set up: only the system can stop the chat. Esc goes back.",
    ),
    "es": Texts(
        other_language="English",
        welcome="¡Hola! Soy el asistente de la clase.\n\nEscribe una pregunta abajo y pulsa Enter.",
        recovered="Perdón, algo salió mal. Empecemos de nuevo.",
        placeholder="Escribe tu pregunta y pulsa Enter",
        you="Tú",
        assistant="Asistente",
        thinking="Pensando...",
        waking_up="El asistente se está despertando... Tu pregunta se enviará en cuanto esté listo.",
        busy="Muchos estudiantes están preguntando ahora. Lo intento otra vez en {seconds} s...",
        too_long="Esta conversación es demasiado larga. Pulsa Ctrl+N para empezar una nueva.",
        stopped="(detenido)",
        not_allowed="Esta computadora no tiene permiso para usar el asistente. Pregunta a tu docente.",
        refused="El asistente no pudo responder. Inténtalo otra vez o pregunta a tu docente.",
        unexpected="Uy, algo salió mal. Inténtalo otra vez.",
        status_connecting="conectando...",
        status_ready="listo",
        status_loading="preparándose...",
        status_down="despertando...",
        status_broken="no funciona - avisa a tu docente",
        status_speed="{speed:.1f} tok/s",
        keys="Enter enviar  Esc parar  Ctrl+N nueva charla  F2 {other}  RePág/AvPág mover",
        quit_hint="Ctrl+Q salir",
        pin_title="PIN del docente",
        pin_prompt="Escribe el PIN del docente y pulsa Enter para cerrar el chat. Esc vuelve atrás.",
        pin_wrong="PIN incorrecto.",
        pin_locked="Demasiados intentos. Espera {seconds} s.",
        pin_not_set="No hay PIN del docente: solo el sistema puede cerrar el chat. Esc vuelve atrás.",
    ),
}

DEFAULT_SYSTEM_PROMPTS: Mapping[Language, str] = {
    "en": (
        "You are a friendly, patient helper for school students aged 8 to 16. Always answer in English, "
        "in short, simple sentences a child can understand. Be kind and encouraging, and explain step by step "
        "when it helps. Keep every answer safe and suitable for children; if a question is not suitable, "
        "gently suggest asking a teacher. If you are not sure about something, say so."
    ),
    "es": (
        "Eres un ayudante amable y paciente para estudiantes de 8 a 16 años. Responde siempre en español, "
        "con frases cortas y sencillas que un niño pueda entender. Sé amable y da ánimos, y explica paso a paso "
        "cuando ayude. Que cada respuesta sea segura y adecuada para niños; si una pregunta no lo es, sugiere "
        "con cariño preguntar a un docente. Si no estás seguro de algo, dilo."
    ),
}


def language_from_locale(environ: Mapping[str, str]) -> Language:
    """The interface language the POSIX locale asks for: the first of LC_ALL, LC_MESSAGES, LANG that is set."""
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if value := environ.get(variable):
            return "es" if value.lower().startswith("es") else "en"
    return "en"
