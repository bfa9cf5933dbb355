"""llama.cpp's own tools, the incumbents the benchmarks measure against, from the very llama.cpp we run.

The source is the vendored llama.cpp inside the installed llama-cpp-python's source distribution (fetched
once with pip, into the cache); the tools (llama-server, llama-batched-bench, llama-imatrix, llama-quantize)
are built from it with CMake, once each, for the benchmarks only, and so is its convert_hf_to_gguf.py.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import cache_dir, folder_replaced_atomically

# Built, as the Makefile builds llama-cpp-python, without llama.cpp's AMX kernels, which crash on quantised models
# (parrot_edge.llamacpp.amx_build): the incumbent runs the same kernels as parrot-edge.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""


def llama_cpp_source() -> Path:
    """The vendored llama.cpp of the installed llama-cpp-python (its sdist fetched and unpacked once)."""
    version = importlib.metadata.version("llama-cpp-python")
    unpacked = cache_dir("bench", f"llama_cpp_python-{version}")
    if not unpacked.is_dir():
        print(f"fetching the llama-cpp-python {version} source distribution (llama.cpp's own tools)…",
              file=sys.stderr)
        with folder_replaced_atomically(unpacked, "fetching") as staging:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                   ":all:", "--dest", str(staging), f"llama-cpp-python=={version}"],
                                  capture_output=True, text=True)
            archives = sorted(staging.glob(f"llama_cpp_python-{version}.tar.gz"))
            if done.returncode != 0 or not archives:
                raise ParrotEdgeError(f"could not download llama-cpp-python=={version}'s sdist (needs the network "
                                      f"once): {done.stderr.strip()[-300:]}")
            with tarfile.open(archives[0]) as archive:
                archive.extractall(staging, filter="data")
            archives[0].unlink()
    return unpacked / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def convert_hf_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (run it with PYTHONPATH=<its folder>/gguf-py)."""
    return llama_cpp_source() / "convert_hf_to_gguf.py"


def installed_tool(name: str) -> Path | None:
    """A tool built earlier (or on PATH), or None."""
    built = _tools_dir() / name
    found = shutil.which(name) or (built if built.is_file() else None)
    return Path(found) if found else None


def llama_tool(name: str) -> Path:
    """llama.cpp's `name` (llama-server, llama-batched-bench, llama-imatrix, llama-quantize), built once."""
    found = installed_tool(name)
    if found:
        return found
    source = llama_cpp_source()
    build = cache_dir("bench", "llama-build")
    print(f"building llama.cpp's {name} (a few minutes on 2 cores, once)…", file=sys.stderr)
    # Threads of llama.cpp's own build system: the benchmark runs nothing else meanwhile.
    for command in (["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}",
                     f"-DCMAKE_CXX_FLAGS={NO_AMX}"],
                    ["cmake", "--build", str(build), "--target", name, "-j", str(os.cpu_count() or 2)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ParrotEdgeError(f"building {name} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    target = _tools_dir()
    target.mkdir(parents=True, exist_ok=True)
    for built in (build / "bin").iterdir():
        if built.name == name or built.suffix == ".so" or ".so." in built.name:
            shutil.copy2(built, target / built.name)
    return target / name


def _tools_dir() -> Path:
    return cache_dir("bench", "llama-tools", importlib.metadata.version("llama-cpp-python"))
