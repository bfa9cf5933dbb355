"""All of parrot-edge's configuration, in one model.

Precedence, lowest to highest: defaults < TOML file < `PARROT_EDGE_*` environment < command-line flags.
The TOML file is `$PARROT_EDGE_CONFIG` if set, else `/etc/parrot-edge/config.toml` or
`$XDG_CONFIG_HOME/parrot-edge/config.toml`, whichever exists first. Keys are the field names below.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from parrot_edge.engine.context import MAX_SLOTS
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import xdg_dir


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_file() -> Path | None:
    """The TOML settings file in effect, if any."""
    explicit = os.environ.get("PARROT_EDGE_CONFIG")
    if explicit:
        return Path(explicit)
    user_file = xdg_dir("XDG_CONFIG_HOME", ".config") / "parrot-edge/config.toml"
    for candidate in (Path("/etc/parrot-edge/config.toml"), user_file):
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARROT_EDGE_", extra="forbid", validate_default=True)

    # -- where things live
    data_dir: Path = Field(default_factory=lambda: xdg_dir("XDG_DATA_HOME", ".local/share") / "parrot-edge",
                           description="Model store and state.")

    # -- serving
    model: str | None = Field(None, description="Model name in the store, or a path to a GGUF; default model if unset.")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="Bearer key; required when binding a non-loopback address.")
    api_key_file: Path | None = None
    cors_origins: list[str] = Field(default_factory=list)
    slots: int | None = Field(None, ge=1, le=MAX_SLOTS,
                              description="Concurrent sequences; derived from memory if unset.")
    ctx_per_slot: int | None = Field(None, ge=64, description="Context tokens per slot; derived if unset.")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads; default: the CPUs this process may use.")
    prefill_chunk: int = Field(256, ge=16, description="Prompt tokens per engine step, all prompts together.")
    queue_size: int = Field(64, ge=0, description="Requests waiting for a slot before 503.")
    shelf_mb: int = Field(64, ge=0, description="RAM (MB) for conversations put aside when their slot is reused.")
    repacked_weights: Literal["auto", "off"] = Field(
        "auto", description="auto: llama.cpp's faster repacked weights, with steps padded where a model's types "
                            "need it to stay exact (with one slot, such weights stay as stored); off: weights "
                            "as stored (see the README's figures).")
    tiled_matmul: Literal["auto", "off"] = Field(
        "auto", description="auto: with repacked weights and 16 slots or more, llama.cpp's tiled matmul forced for "
                            "the weights not repacked (exact; faster for large classes, see the README); off: "
                            "never.")
    kv_cache_type: Literal[tuple(KV_TYPES)] = Field(  # Literal of a tuple: one of its items
        DEFAULT_KV_TYPE, description="The KV cache (engine/kv_cache.py): f16-bf16, f16 keys and bf16 values; f16, "
                                     "both f16 (a student alone deep in a conversation is slower); q8_0, about "
                                     "half the memory (see the README).")
    request_timeout: float = Field(300.0, gt=0, description="Seconds a request may take, queueing included.")
    default_max_tokens: int = Field(512, ge=1)
    # -- what one client may ask (see the README's "Safe by default")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body; larger ones get 413.")
    max_messages: int = Field(256, ge=1, description="Messages in one chat request, at most.")
    max_prompt_chars: int = Field(131072, ge=1, description="Characters of all messages (or the prompt) together.")
    max_requests_per_client: int = Field(4, ge=0, description="Requests of one client (its address) at once, "
                                                                "queued or answering; beyond: 429. 0: no limit.")
    allowed_hosts: list[str] = Field(default_factory=list,
                                     description="Host header values accepted (DNS rebinding); default: the "
                                                 "loopback names and the bound address, any when bound to all.")
    stall_seconds: float = Field(60.0, gt=0, description="A worker with work but no progress this long is stuck: "
                                                         "/health says 503 and the watchdog stops pinging.")

    # -- kiosk
    url: str = "http://127.0.0.1:8080"
    lang: Literal["en", "es"] | None = None
    kiosk: bool = False
    teacher_pin: SecretStr | None = None
    idle_reset_seconds: float = Field(300.0, gt=0)
    system_prompt_en: str | None = None
    system_prompt_es: str | None = None

    @field_validator("cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None


def load_settings(**overrides: Any) -> Settings:
    """Settings with command-line flags applied on top; flags left as None do not override."""
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        where = config_file()
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ParrotEdgeError(f"invalid settings ({problems}); sources: flags, PARROT_EDGE_* environment"
                              + (f", {where}" if where else "")) from None
    except tomllib.TOMLDecodeError as exc:
        raise ParrotEdgeError(f"settings file {config_file()} is not valid TOML: {exc}") from None
