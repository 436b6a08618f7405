"""Fixtures: the stand-in server, the script run in-process or as a subprocess, test pictures."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from stand_in_ollama import StandInOllama

# The test modules' rewritten asserts are kept in tests/__pycache__ even where the environment
# sets PYTHONDONTWRITEBYTECODE: rewriting them again costs each xdist worker a second of CPU
# on every run (measured), a sixth of the suite's time on two cores.
sys.dont_write_bytecode = False

SCRIPT = Path(__file__).resolve().parent.parent / "llava-caption-ollama.py"
# The tool's own pauses (backoff, server probes, the limit on calls that load no model) at a
# tenth, here and in every subprocess the tests start: the suite waits less, asserts the same.
os.environ["LLAVA_CAPTION_PAUSE_SCALE"] = "0.1"
# trio, left out of these processes (tests/without_trio), registers a Hypothesis plugin that
# Hypothesis would import as it is imported (the model-based test).
os.environ["HYPOTHESIS_NO_PLUGINS"] = "1"


# The tests' own requests straight to a stand-in share one client: httpx.post() makes a client for
# each call, and each reads the trusted certificates (45 ms of CPU) for a plain-http request. These
# stand-ins speak plain HTTP: the client reads no certificates at all (verify=False).
to_stand_in = httpx.Client(timeout=10, trust_env=False, verify=False)


def load_script():
    spec = importlib.util.spec_from_file_location("llava_caption_ollama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


captioner = load_script()

# The model-based test (tests/test_model_based.py) takes minutes: it runs only when asked for, so
# that the default suite stays quick. A hook rather than `-m "not model_based"` in pytest.ini's
# addopts, which a user's own -m would replace.
MODEL_BASED_ENV = "LLAVA_CAPTION_MODEL_BASED"


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--model-based",
        action="store_true",
        help=f"also run the model-based test of the rerun guarantees (or set {MODEL_BASED_ENV}=1)",
    )


def model_based(config) -> bool:
    return config.getoption("--model-based") or os.environ.get(MODEL_BASED_ENV) == "1"


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    # Not even imported when not asked for: Hypothesis and the machine cost each xdist worker
    # 0.4 s of CPU to import (measured), a tenth of the suite's time on two cores.
    if collection_path.name == "test_model_based.py" and not model_based(config):
        return True
    return None


def pytest_collection_modifyitems(items: list) -> None:
    """Each file's tests spread evenly over the run: the tests that wait (on slow stand-ins, the
    tool's pauses, child processes) sit together in a few files, and xdist hands tests out in
    this order, so file by file they left both cores idle at once for seconds while every worker
    waited (measured). The Ray tests (one group: one cluster) start first, as the longest; the
    browser tests, which share their file's Chromium, come last, each file whole."""
    grouped = [item for item in items if item.get_closest_marker("xdist_group")]
    in_chromium = [item for item in items if item.get_closest_marker("browser") and item not in grouped]
    files: dict = {}
    for item in items:
        if item not in grouped and item not in in_chromium:
            files.setdefault(item.path, []).append(item)
    placed = [(place / len(tests), item) for tests in files.values() for place, item in enumerate(tests, 1)]
    spread = [item for _, item in sorted(placed, key=lambda pair: pair[0])]
    items[:] = grouped + spread + in_chromium


def pytest_report_header(config) -> str:
    if model_based(config):
        return "model-based test of the rerun guarantees: on"
    return f"model-based test of the rerun guarantees: off (--model-based or {MODEL_BASED_ENV}=1 runs it)"


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def make_server():
    """Start stand-in servers with their own slots and latency; all stop after the test."""
    started = []

    def make(**settings) -> StandInOllama:
        started.append(StandInOllama(**settings).start())
        return started[-1]

    yield make
    for stand_in in started:
        stand_in.stop()


@pytest.fixture
def server(make_server):
    return make_server()


def by_width(replies: dict, default="A red square"):
    """An answer chosen by which picture arrived (its width), whatever the arrival order."""
    return lambda chat: replies.get(chat.picture().width, default)


@pytest.fixture
def caption(server, capsys):
    """Run main() in this process against the stand-in server."""

    def run(*args: object, host: str | None = None) -> Run:
        code = captioner.main([str(arg) for arg in args] + ["--host", host or server.url])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


# A child runs the script as `python -m llava-caption-ollama`, its folder on PYTHONPATH: the same
# file as __main__, but from the bytecode Python caches, where `python llava-caption-ollama.py`
# compiles its 8,700 lines at every start (0.09 s of CPU each time, measured, for each of the
# suite's ~60 processes). The tests of how the script is started (by its path from a shell loop,
# copied alone, uv run) start it by its path, as the README does.
SCRIPT_COMMAND = (sys.executable, "-m", SCRIPT.stem)


def script_environment(env: dict | None) -> dict:
    """A child's environment with the script's folder last on PYTHONPATH, for SCRIPT_COMMAND."""
    environment = child_environment(env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [environment.get("PYTHONPATH"), str(SCRIPT.parent)])
    )
    return environment


def run_script(*args: object, cwd: Path | None = None, env: dict | None = None, timeout: float = 60):
    """Run the script as a user would: a separate process, its own exit code and output."""
    with as_from_a_terminal():
        return subprocess.run(
            [*SCRIPT_COMMAND, *map(str, args)],
            cwd=cwd,
            env=script_environment(env),
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def spawn():
    """Start the script as a user's shell would; whatever still runs when the test ends is killed."""
    started = []

    def start(*args: object, env: dict | None = None, ignoring=(), **popen) -> subprocess.Popen:
        command = [*SCRIPT_COMMAND, *map(str, args)]
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        with as_from_a_terminal(ignoring):
            started.append(subprocess.Popen(command, env=script_environment(env), **popen))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


WITHOUT_TRIO = str(Path(__file__).resolve().parent / "without_trio")


def child_environment(env: dict | None) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [WITHOUT_TRIO, os.environ.get("PYTHONPATH")]))
    environment.update(env or {})
    return environment


@contextmanager
def as_from_a_terminal(ignoring=()):
    """Children start with INT, TERM and HUP at their defaults, as from a terminal, even where
    the tests themselves were started with one ignored (a shell script's background job
    ignores INT): an ignored signal is inherited, a handler becomes the default. Those in
    `ignoring` start ignored, as nohup leaves HUP."""
    previous = {
        number: signal.signal(number, signal.SIG_IGN if number in ignoring else lambda *_: None)
        for number in TERMINAL_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_twice(process, number: int) -> None:
    """A signal, and once the run says it waits for the answers on their way, a second one."""
    process.send_signal(number)
    for line in process.stderr:
        if line.startswith("stopping: waiting"):
            break
    process.send_signal(number)


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system of its own, where the tests can fill the disk or make it read-only."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass  # the disk is full


def picture(path: Path, size=(64, 48), color="red", mode="RGB", **save) -> Path:
    """Save a plain picture; the format follows the file extension unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def distinct_pictures(folder: Path, count: int) -> dict:
    """PNGs that tell themselves apart by width (40, 41, ...): {caption file: the caption the
    stand-in's default answer gives it}."""
    expected = {}
    for index in range(count):
        picture(folder / f"img{index:03d}.png", size=(40 + index, 32))
        expected[folder / f"img{index:03d}.txt"] = f"A PNG picture, {40 + index}x32 pixels."
    return expected


HELD_PORTS: list = []  # sockets bound and never listening, for the life of the tests


def closed_port_url() -> str:
    """A port where nothing listens, and nothing else of the tests will: the socket stays bound
    (connections are refused, bind(0) of another test passes it over), where a port closed at
    once could be handed to another test's server during a run's wait. SO_REUSEADDR lets a test
    start a server on it deliberately, as a server coming back."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    HELD_PORTS.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


JOURNAL = ".llava-caption-ollama.journal"


def leftovers(folder: Path) -> list:
    """Files the captioner may have left behind: temporary files, its lock (the journal of a
    pass is meant to stay)."""
    return [p.name for p in folder.rglob(".*") if p.is_file() and p.name != JOURNAL]


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made for this run of the suite: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=20,
    )
    return str(cert), str(key)
