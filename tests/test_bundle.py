"""The USB stick, for real. `parrot-edge bundle` builds it; its install.sh installs it into a fresh directory
(`--prefix`) inside a network namespace that has nothing but loopback; the installed server and classroom chat
answer a question there, and its llama.cpp runs on emulated older CPUs; a tampered stick is refused; installing
again keeps settings and models; uninstall.sh keeps them too unless --purge; the units pass
`systemd-analyze verify`.

The first run compiles the portable llama-cpp-python (25 to 40 minutes on 2 cores) into ~/.cache/parrot-edge,
where later runs find it; after that this module takes about two minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import pexpect
import pytest
from serving import PARROT_EDGE
from test_kiosk_process import COLUMNS, ROWS, Screen

from parrot_edge.deploy.bundle import collect_model
from parrot_edge.deploy.cpu_probe import write_probe_model
from parrot_edge.store.manifest import ModelManifest, manifest_path_for
from parrot_edge.store.model_store import ModelStore

MODEL = "smollm2-135m-instruct"
# The stick is made for the Python a school computer would use: the `python3` that install.sh finds.
SCHOOL_PYTHON = subprocess.run(["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True).stdout.strip()
ARCH = os.uname().machine
QEMU = f"qemu-{ARCH}"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # the first run compiles llama.cpp
    pytest.mark.skipif(os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "ip", "systemd-analyze"))),
                       reason="needs root, unshare, ip and systemd-analyze"),
]


# What a school computer's processes see: this machine's environment without what only this machine needs.
# Here OPENBLAS_CORETYPE names this CPU (Haswell), and an emulated older processor that inherited it would
# have NumPy pick kernels it cannot run ("illegal instruction" at `import numpy`).
SCHOOL_ENV = {key: value for key, value in os.environ.items() if not key.startswith("OPENBLAS_")}


def run(*command: str | Path, env: dict[str, str] | None = None, **options) -> subprocess.CompletedProcess:
    """Run a command as on the school computer (SCHOOL_ENV), unless given another environment."""
    return subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          env=SCHOOL_ENV if env is None else env, **options)


def offline(*command: str | Path, **options) -> subprocess.CompletedProcess:
    """Run a command in a new network namespace whose only interface is loopback."""
    return run("unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline", *command, **options)


def install(stick: Path, prefix: Path, *options: str) -> subprocess.CompletedProcess:
    return offline("sh", stick / "install.sh", "--prefix", prefix, *options)


def systemd_analyze_verify(prefix: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on the units installed under `prefix`, where systemd would find them: in a
    private mount namespace, the installation's /opt/parrot-edge and /etc/systemd/system are the real ones."""
    script = ('mount -t tmpfs tmpfs /opt && mkdir /opt/parrot-edge'
              ' && mount --bind "$1/opt/parrot-edge" /opt/parrot-edge'
              ' && mount --bind "$1/etc/systemd/system" /etc/systemd/system'
              " && exec systemd-analyze verify parrot-edge.service parrot-edge-kiosk.service")
    return run("unshare", "--mount", "sh", "-c", script, "verify", prefix)


def report(done: subprocess.CompletedProcess) -> str:
    return f"exit status {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


@pytest.fixture(scope="module")
def stick(default_model_wheelhouse, tmp_path_factory) -> Path:
    """A stick with the default model, pulled from the test wheelhouse (this machine's store is left empty)."""
    tmp = tmp_path_factory.mktemp("usb")
    done = run(*PARROT_EDGE, "bundle", "--out", tmp / "parrot-edge", "--python", SCHOOL_PYTHON, "--model", MODEL,
               "--from", default_model_wheelhouse, env={**os.environ, "PARROT_EDGE_DATA_DIR": str(tmp / "store")})
    assert done.returncode == 0, report(done)
    return tmp / "parrot-edge"


@pytest.fixture(scope="module")
def school_computer(stick, tmp_path_factory) -> Path:
    """A fresh directory with the stick installed in it, offline; the tests below only read it or copy it,
    except the one that installs again, which leaves it installed."""
    prefix = tmp_path_factory.mktemp("school-computer")
    done = install(stick, prefix)
    assert done.returncode == 0, report(done)
    assert "Ready" in done.stdout and "The teacher PIN" in done.stdout, report(done)
    return prefix


def test_the_stick_holds_everything_with_its_checksums(stick):
    listed = {line.split("  ", 1)[1] for line in (stick / "SHA256SUMS").read_text().splitlines()}
    present = {path.relative_to(stick).as_posix() for path in stick.rglob("*") if path.is_file()}
    assert listed == present - {"SHA256SUMS"}
    info = dict(line.split("=", 1) for line in (stick / "bundle-info.txt").read_text().splitlines())
    assert (info["platform"], info["pythons"], info["models"]) == (ARCH, SCHOOL_PYTHON, MODEL)
    manifest = json.loads(next((stick / "models" / MODEL).glob("*.json")).read_text())
    assert (stick / "models" / MODEL / manifest["file"]).stat().st_size == manifest["size"]
    with zipfile.ZipFile(next((stick / "wheels").glob("llama_cpp_python-*.whl"))) as llama:
        libraries = llama.namelist()
    assert len([name for name in libraries if name.startswith("bin/libggml-cpu-")]) >= 8, "one per CPU generation"
    assert "llama_cpp/lib/libgomp.so.1" in libraries, "the OpenMP runtime, which school computers may lack"
    with zipfile.ZipFile(next((stick / "wheels").glob("parrot_edge-*.whl"))) as ours:
        files = ours.namelist()
    assert {"parrot_edge/converters/calibration/school-en-es.txt", "parrot_edge/kiosk/app.tcss"} <= set(files)


def test_a_model_from_this_computers_store_goes_on_the_stick_with_its_manifest(default_gguf, tmp_path):
    store = ModelStore(tmp_path / "store")
    installed = store.add(default_gguf, name="our-model")
    on_stick = collect_model("our-model", store, None, tmp_path / "models", progress=print)
    copy = tmp_path / "models/our-model" / installed.file
    assert on_stick == installed == ModelManifest.read(manifest_path_for(copy))
    assert copy.read_bytes() == store.gguf_path(installed).read_bytes()


@pytest.mark.parametrize("tampering", ["a changed wheel", "an added wheel"])
def test_a_tampered_stick_is_refused_before_anything_is_installed(stick, tmp_path, tampering):
    copy = tmp_path / "stick"
    shutil.copytree(stick, copy, copy_function=os.link)  # hard links: so files are only ever replaced, not edited
    if tampering == "a changed wheel":
        wheel = next((copy / "wheels").glob("parrot_edge-*.whl"))
        changed = wheel.read_bytes() + b"\0"
        wheel.unlink()
        wheel.write_bytes(changed)
    else:
        shutil.copyfile(next((copy / "wheels").glob("pip-*.whl")), copy / "wheels/pip-99.0-py3-none-any.whl")
    prefix = tmp_path / "computer"
    prefix.mkdir()
    done = install(copy, prefix)
    assert done.returncode == 1, report(done)
    assert ("were changed" if tampering == "a changed wheel" else "not part of the stick") in done.stderr
    assert "Nothing was installed" in done.stderr and not any(prefix.iterdir())


# Run by the installed Python inside the network namespace: start the installed server, ask it a question.
# Like its systemd unit (MemoryDenyWriteExecute=yes), the server may not make memory writable and executable:
# the kernel's own switch for that (Linux 6.3 and later) is set here and inherited by the server.
_ASK_OFFLINE = """
import ctypes, json, subprocess, sys, time, urllib.request
parrot_edge, config = sys.argv[1:]
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0:
    print("memory-deny-write-execute: on")
server = subprocess.Popen([parrot_edge, "serve", "--slots", "1"], env={"PARROT_EDGE_CONFIG": config})
try:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=2)
            break
        except OSError:  # not listening yet, or 503 while the model loads
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not come up")
            time.sleep(0.5)
    question = {"model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "What is 2+2?"}]}
    request = urllib.request.Request("http://127.0.0.1:8080/v1/chat/completions", json.dumps(question).encode(),
                                     {"Content-Type": "application/json"})
    asked = time.monotonic()
    answer = json.load(urllib.request.urlopen(request, timeout=120))["choices"][0]["message"]["content"]
    print(f"SECONDS: {time.monotonic() - asked:.1f}")
    print("ANSWER:", answer)
finally:
    server.terminate()
    server.wait()
"""


def test_the_installed_server_answers_with_no_network(school_computer, tmp_path):
    venv = school_computer / "opt/parrot-edge"
    where = run(venv / "bin/python", "-c", "import parrot_edge; print(parrot_edge.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), "the installed parrot-edge, not this checkout"
    done = offline(venv / "bin/python", "-c", _ASK_OFFLINE, venv / "bin/parrot-edge",
                   school_computer / "etc/parrot-edge/config.toml", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, report(done)
    assert done.stdout.split("ANSWER:", 1)[1].strip(), report(done)
    # Half a second here with a good build; a build that starts threads per token takes minutes.
    assert float(done.stdout.split("SECONDS:", 1)[1].split()[0]) < 30, report(done)
    kernel = tuple(int(part) for part in os.uname().release.split(".")[:2])
    assert "memory-deny-write-execute: on" in done.stdout or kernel < (6, 3), report(done)


def test_the_installed_classroom_chat_answers_a_student_with_no_network(school_computer, tmp_path):
    """The server, and the chat as its unit runs it (settings, PIN from kiosk.env, own data folder, Linux console),
    both from the installation, in one network namespace with nothing but loopback."""
    venv, etc = school_computer / "opt/parrot-edge", school_computer / "etc/parrot-edge"
    kiosk_data = tmp_path / "kiosk"
    pin = (etc / "kiosk.env").read_text().strip().split("=", 1)
    env = {"PARROT_EDGE_CONFIG": str(etc / "config.toml"), "TERM": "linux", "LANG": "C.UTF-8", pin[0]: pin[1]}
    server_pid = tmp_path / "server.pid"
    classroom = (f"ip link set lo up && {venv}/bin/parrot-edge serve --slots 1 >/dev/null 2>&1 & echo $! >{server_pid}"
                 f" && PARROT_EDGE_DATA_DIR={kiosk_data} HOME={kiosk_data} exec {venv}/bin/parrot-edge chat --kiosk")
    child = pexpect.spawn("unshare", ["--net", "sh", "-c", classroom], env=env, cwd=str(tmp_path),
                          dimensions=(ROWS, COLUMNS), encoding="utf-8", codec_errors="replace")
    try:
        screen = Screen(child)
        screen.wait_for(lambda lines: " | ready" in lines[-2], "the chat, with the server ready")
        child.send("What is 2+2?\r")
        screen.wait_for(lambda lines: "tok/s" in lines[-2], "a whole answer", timeout=120)
        child.kill(signal.SIGTERM)  # as systemd stops it
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int(server_pid.read_text()), signal.SIGTERM)
    assert child.exitstatus == 0 and "Traceback" not in screen.received
    assert (kiosk_data / "chat.log").is_file(), "the chat logs into its own folder, not the model store"


def test_llama_cpp_loads_the_cpu_backend_made_for_this_processor(school_computer, tmp_path):
    venv = school_computer / "opt/parrot-edge"
    done = run(venv / "bin/python", "-c", "import llama_cpp; llama_cpp.llama_backend_init()", cwd=tmp_path)
    assert done.returncode == 0, report(done)
    assert f"loaded CPU backend from {venv.resolve()}/bin/libggml-cpu-" in done.stderr, report(done)
    # llama.cpp's AMX kernels crash on quantised models: a Xeon that has AMX gets the AVX-512 backend
    assert "sapphirerapids" not in done.stderr and not (venv / "bin/libggml-cpu-sapphirerapids.so").exists()


# Older processors, as qemu emulates them, and the CPU backend each should get: a build for this machine's
# CPU would die of "illegal instruction" on both.
OLD_CPUS = {"x86_64": [("Conroe", "x64"), ("Nehalem", "sse42")], "aarch64": [("cortex-a53", "armv8.0_1")]}


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU} (Debian: qemu-user)")
@pytest.mark.parametrize(("cpu", "backend"), OLD_CPUS.get(ARCH, []))
def test_an_older_processor_gets_a_backend_it_can_run(school_computer, tmp_path, cpu, backend):
    venv = school_computer / "opt/parrot-edge"
    done = run(QEMU, "-cpu", cpu, venv / "bin/python", "-c", "import llama_cpp; llama_cpp.llama_backend_init()",
               cwd=tmp_path)
    assert done.returncode == 0, report(done)
    assert f"loaded CPU backend from {venv.resolve()}/bin/libggml-cpu-{backend}.so" in done.stderr, report(done)
    write_probe_model(tmp_path / "probe.gguf")  # evaluating it runs the real quantised kernels
    done = run(QEMU, "-cpu", cpu, venv / "bin/python", "-m", "parrot_edge.deploy.cpu_probe", tmp_path / "probe.gguf",
               cwd=tmp_path, timeout=600)
    assert done.returncode == 0, report(done)


def test_the_units_pass_systemd_analyze_verify(school_computer):
    done = systemd_analyze_verify(school_computer)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), report(done)


def test_installing_again_keeps_settings_and_models_and_switches_lan_mode(stick, school_computer):
    config = school_computer / "etc/parrot-edge/config.toml"
    config.write_text(config.read_text() + "# the teacher was here\n")
    model = next((school_computer / "var/lib/parrot-edge/models" / MODEL).glob("*.gguf"))
    model_before = model.stat()

    done = install(stick, school_computer, "--lan-subnet", "10.20.0.0/16")
    assert done.returncode == 0, report(done)
    assert "Keeping the settings" in done.stdout and f"{MODEL}: already installed and intact" in done.stdout
    assert config.read_text().endswith("# the teacher was here\n")
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == (model_before.st_ino, model_before.st_mtime_ns)
    lan_mode = school_computer / "etc/systemd/system/parrot-edge.service.d/lan.conf"
    assert "IPAddressAllow=10.20.0.0/16" in lan_mode.read_text()
    api_key = school_computer / "etc/parrot-edge/api-key"
    assert len(api_key.read_text()) == 48 and api_key.stat().st_mode & 0o777 == 0o600
    done = systemd_analyze_verify(school_computer)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), report(done)

    done = install(stick, school_computer, "--lan-subnet", "off")
    assert done.returncode == 0, report(done)
    assert not lan_mode.exists() and api_key.exists()


def test_uninstall_keeps_models_and_settings_unless_purged(stick, school_computer, tmp_path):
    computer = tmp_path / "computer"
    shutil.copytree(school_computer, computer, symlinks=True)
    done = run("sh", computer / "opt/parrot-edge/uninstall.sh", "--prefix", computer)
    assert done.returncode == 0, report(done)
    assert not (computer / "opt/parrot-edge").exists() and not (computer / "usr/local/bin/parrot-edge").exists()
    assert not (computer / "etc/systemd/system/parrot-edge.service").exists()
    assert (computer / "etc/parrot-edge/config.toml").is_file()
    assert (computer / "var/lib/parrot-edge/models" / MODEL / "manifest.json").is_file()

    done = run("sh", stick / "uninstall.sh", "--prefix", computer, "--purge")
    assert done.returncode == 0, report(done)
    assert not (computer / "etc/parrot-edge").exists() and not (computer / "var/lib/parrot-edge").exists()


def test_a_stick_for_another_architecture_asks_for_a_computer_of_that_architecture(tmp_path):
    other = "aarch64" if ARCH == "x86_64" else "x86_64"
    done = run(*PARROT_EDGE, "bundle", "--out", tmp_path / "stick", "--platform", other,
               env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 1, report(done)
    assert f"must be compiled for {other}" in done.stderr and f"on a {other} computer" in done.stderr
    assert not any(tmp_path.iterdir()), "nothing left behind"


def test_a_failed_upgrade_leaves_the_installed_release_running(stick, school_computer, tmp_path):
    """The new environment is built beside the old one; here its disk fills up (a 30 MB tmpfs over the releases
    folder, in a private mount namespace), so pip fails: the class keeps its working installation."""
    computer = tmp_path / "computer"
    shutil.copytree(school_computer, computer, symlinks=True)
    link = computer / "opt/parrot-edge"
    link.unlink()  # the copy's link still names the original's release: point it at the copy's own
    (release,) = (computer / "opt/parrot-edge-releases").iterdir()
    link.symlink_to(release)
    # The releases folder becomes the small disk; the release in use stays mounted in it, as it was.
    script = (f'mkdir "$3" && mount --bind "$1/opt/parrot-edge-releases/{release.name}" "$3"'
              ' && mount -t tmpfs -o size=30m tmpfs "$1/opt/parrot-edge-releases"'
              f' && mkdir "$1/opt/parrot-edge-releases/{release.name}"'
              f' && mount --bind "$3" "$1/opt/parrot-edge-releases/{release.name}"'
              ' && exec sh "$2/install.sh" --prefix "$1"')
    done = run("unshare", "--mount", "sh", "-c", script, "upgrade", computer, stick, tmp_path / "keep")
    assert done.returncode != 0, report(done)
    assert "the installed parrot-edge was not touched" in done.stderr, report(done)
    assert link.resolve() == release, "the link still names the release in use"
    still = run(link / "bin/parrot-edge", "--version")
    assert still.returncode == 0 and still.stdout.startswith("parrot-edge "), report(still)
    assert [p.name for p in (computer / "opt/parrot-edge-releases").iterdir()] == [release.name]


def test_a_stick_needs_a_folder_and_prepare_needs_none(tmp_path):
    done = run(*PARROT_EDGE, "bundle", env={**os.environ, "PARROT_EDGE_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1 and "--out FOLDER" in done.stderr, report(done)
    prepared = run(*PARROT_EDGE, "bundle", "--prepare", env=os.environ)  # built by `make test` already: cached
    assert prepared.returncode == 0 and "is ready" in prepared.stdout, report(prepared)
