"""--ray: the same run on a Ray cluster's workers, against the stand-in: a Ray started by the run
(--ray local) and a two-node cluster started here (`ray start --head`, `ray start --address`),
each node with its own temporary folder and its own stand-in server for --host local:PORT.

Marker `ray`; the tests share one cluster and run one after another in one xdist worker (group
"ray"). Their budget, with the model-based test's Ray variant that joins them: 4.5 minutes, most of
it Ray starting the cluster and each run's workers (`-m ray --model-based` on two cores: 260 s, the
variant 32 s of it); a test's limit is 5 minutes, as a cluster started beside a loaded suite took
over 90 s."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import captioner, distinct_pictures, run_script, wait_until
from ray_cluster import RAY_ENV, Node, driver_env, free_port, socket_answers
from stand_in_ollama import QWEN38_MODEL, StandInOllama

pytestmark = [
    pytest.mark.ray,
    pytest.mark.xdist_group("ray"),
    pytest.mark.timeout(300),
    # CI installs it (tests/requirements.txt); a machine without it skips them, saying why.
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="Ray is not installed: pip install -r tests/requirements.txt",
    ),
]
JOURNAL = ".llava-caption-ollama.journal"


def seeded(chat) -> str:
    """An answer that names the picture and the seed it was asked with: the same seed, the same caption."""
    return f"A picture {chat.picture().width} wide, seed {chat.options.get('seed')}."


@pytest.fixture(scope="module")
def cluster(request):
    """A head and a second node on this machine, each sending --host local:PORT to its own
    stand-in (LLAVA_CAPTION_NODE_SERVER in its environment)."""
    refuse_tests_not_grouped(request)
    servers = [StandInOllama(slots=4).start(), StandInOllama(slots=4).start()]
    port, client_port = free_port(), free_port()
    nodes = []
    try:
        head_only = [f"--port={port}", f"--ray-client-server-port={client_port}", "--include-dashboard=false"]
        nodes.append(Node(["--head", *head_only], {"LLAVA_CAPTION_NODE_SERVER": servers[0].url}))
        address = f"127.0.0.1:{port}"
        wait_until(lambda: socket_answers(port), 150)
        nodes.append(Node([f"--address={address}"], {"LLAVA_CAPTION_NODE_SERVER": servers[1].url}))
        two_nodes = "import ray; ray.init(); assert len([n for n in ray.nodes() if n['Alive']]) == 2"
        wait_until(
            lambda: (
                subprocess.run(
                    [sys.executable, "-c", two_nodes], env=driver_env(address), check=False
                ).returncode
                == 0
            ),
            150,
        )
        yield address, nodes, servers, f"ray://127.0.0.1:{client_port}"
    finally:
        for node in nodes:
            node.stop()
        for server in servers:
            server.stop()


def refuse_tests_not_grouped(request) -> None:
    """One cluster serves this module's tests only where pytest-xdist runs them in one worker (their
    xdist_group): with pytest 9.2 it no longer can (pytest-dev/pytest-xdist#1386), and every worker
    would start a cluster of its own, two nodes each, which a loaded machine does not start in time."""
    if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getoption("dist", "no") == "loadgroup":
        grouped = [item.nodeid for item in request.session.items if item.get_closest_marker("xdist_group")]
        if not all(nodeid.endswith("@ray") for nodeid in grouped):
            pytest.fail("pytest-xdist did not group the ray tests (pytest-dev/pytest-xdist#1386): pytest<9.2")


def captions_and_journal(folder: Path) -> tuple[dict, list]:
    captions = {path.name: path.read_text() for path in folder.glob("*.txt")}
    return captions, sorted((folder / JOURNAL).read_text().splitlines())


def local_run(tmp_path: Path, server, count: int, *options: object) -> tuple[Path, tuple]:
    folder = tmp_path / "here"
    distinct_pictures(folder, count)
    done = run_script(folder, "--host", server.url, "--seed", 7, *options)
    assert done.returncode == 0, done.stderr
    return folder, captions_and_journal(folder)


@pytest.mark.parametrize("where", ["local", "cluster", "client"])
def test_a_ray_run_writes_what_a_local_run_writes(where, tmp_path, make_server, request):
    """The same folder, the same seed: the same captions and the same journal, whether this
    process prepares and sends or a Ray's workers do (a Ray it starts, or a cluster of two nodes)."""
    server = make_server(answer=seeded, slots=4)
    _, expected = local_run(tmp_path, server, 12, "--jobs", 4)
    folder = tmp_path / "there"
    distinct_pictures(folder, 12)
    if where == "local":
        env, address = {**RAY_ENV}, "local"
    elif where == "cluster":
        env, address = driver_env(request.getfixturevalue("cluster")[0]), "auto"
    else:  # a driver outside the cluster, through Ray Client
        env, address = {**RAY_ENV}, request.getfixturevalue("cluster")[3]
    done = run_script(
        folder, "--host", server.url, "--seed", 7, "--jobs", 4, "--ray", address, env=env, timeout=150
    )
    assert done.returncode == 0, done.stderr
    assert captions_and_journal(folder) == expected
    assert ("on 1 node" if where == "local" else "on 2 nodes") in done.stdout + done.stderr


def test_styles_on_a_cluster_are_prepared_once_and_grounded_as_locally(cluster, tmp_path, make_server):
    """--also with a prompt that asks for another style's caption ({caption:.tags}): the workers
    send each image's styles with the prompts the driver filled in, and write what a local run
    writes."""
    server = make_server(answer=seeded, slots=4)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "long.txt").write_text("Describe it, with these tags: {caption:.tags}")
    (prompts / "tags.txt").write_text("List tags.")
    styles = ("--prompt", prompts / "long.txt", "--also", f"{prompts / 'tags.txt'}:.tags")
    here, expected = local_run(tmp_path, server, 6, "--jobs", 4, *styles)
    expected_tags = {path.name: path.read_text() for path in here.glob("*.tags")}
    sent_here = len(server.chats)
    folder = tmp_path / "there"
    distinct_pictures(folder, 6)

    done = run_script(
        folder,
        "--host",
        server.url,
        "--seed",
        7,
        "--jobs",
        4,
        *styles,
        "--ray",
        "auto",
        env=driver_env(cluster[0]),
        timeout=150,
    )

    assert done.returncode == 0, done.stderr
    assert captions_and_journal(folder) == expected
    assert {path.name: path.read_text() for path in folder.glob("*.tags")} == expected_tags
    grounded = [chat for chat in server.chats[sent_here:] if "with these tags:" in chat.prompt]
    assert len(grounded) == 6
    assert all("seed" in chat.prompt.split("with these tags:")[1] for chat in grounded)


def journal_entries(folder: Path) -> list[str]:
    """The images whose captions the journal says were written, once each time."""
    lines = (folder / JOURNAL).read_text().splitlines()
    return sorted(line for line in lines if line.startswith('{"ok"'))


def test_a_worker_killed_mid_run_leaves_every_image_captioned_once(cluster, make_server, tmp_path, spawn):
    """A worker process dies with requests in flight (as the kernel's OOM killer ends one): its
    images are sent again from the others, and each is written exactly once."""
    address, nodes, _, _ = cluster
    server = make_server(slots=4, latency=0.3)
    folder = tmp_path / "folder"
    expected = distinct_pictures(folder, 24)
    run = spawn(folder, "--host", server.url, "--jobs", 4, "--ray", "auto", env=driver_env(address))
    wait_until(lambda: server.in_flight >= 4 and len(nodes[1].workers()) == 2, 60)
    # Both of the second node's workers: the driver sends each request to the least busy worker,
    # so with four in flight on four workers these two hold some (one alone may hold none).
    for pid in nodes[1].workers():
        os.kill(pid, signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert {path: path.read_text() for path in expected} == expected
    assert len(journal_entries(folder)) == 24
    assert len(set(journal_entries(folder))) == 24
    assert len(server.chats) > 24  # the lost worker's images were asked again


def test_a_driver_killed_outright_leaves_nothing_in_the_temporary_folder(
    cluster, make_server, tmp_path, spawn
):
    """kill -9 (or the OOM killer) of a run on a cluster: the copy of the script it ships to the
    nodes is gone from its temporary folder as soon as Ray has it, not at the run's end."""
    address, nodes, _, _ = cluster
    server = make_server(slots=2, latency=0.5)
    folder, temporary = tmp_path / "folder", tmp_path / "tmp"
    temporary.mkdir()
    distinct_pictures(folder, 20)
    run = spawn(
        folder,
        "--host",
        server.url,
        "--jobs",
        2,
        "--ray",
        "auto",
        env={**driver_env(address), "TMPDIR": str(temporary)},
    )
    wait_until(lambda: len(server.chats) >= 2, 60)
    run.kill()
    run.communicate(timeout=30)
    assert not list(temporary.glob("llava-caption-ray-*"))
    wait_until(lambda: not (nodes[0].workers() or nodes[1].workers()), 30)  # Ray ends the job's workers


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_ctrl_c_stops_the_run_and_the_clusters_work(number, cluster, make_server, tmp_path, spawn):
    """Ctrl-C (or kill): the answers on their way are written, the workers are ended with whatever
    they were doing (the server is sent nothing more), and the process dies by the signal (Ray's
    own SIGTERM handler, which ray.init() installs, does not take over)."""
    address, nodes, _, _ = cluster
    server = make_server(slots=2, latency=1.0)
    folder = tmp_path / "folder"
    distinct_pictures(folder, 30)
    run = spawn(folder, "--host", server.url, "--jobs", 3, "--ray", "auto", env=driver_env(address))
    wait_until(lambda: len(server.chats) >= 3, 60)
    run.send_signal(number)
    out, err = run.communicate(timeout=60)
    assert run.returncode == -number, err
    wait_until(lambda: not (nodes[0].workers() or nodes[1].workers()), 30)
    sent = len(server.chats)
    time.sleep(1.5)  # longer than an answer: a worker left running would have asked again
    assert len(server.chats) == sent < 30
    written = len(list(folder.glob("*.txt")))
    assert 0 < written < 30
    assert "left for a rerun" in out + err


@pytest.mark.parametrize("slots", [1, 4])
def test_a_server_answering_one_at_a_time_is_named_as_in_a_local_run(slots, cluster, tmp_path, make_server):
    """The workers of both nodes send to one server and tell one TurnJudge of their requests as
    they go: a 1-slot server behind --jobs 5 is named once, during the run and in the summary,
    within its 10 images; a 4-slot one is not (the stand-ins of tests/test_one_at_a_time.py)."""
    count = 10 if slots == 1 else 30
    expected = distinct_pictures(tmp_path, count)
    if slots == 1:
        server = make_server(slots=1, latency=0.15)
    else:  # its answers stream for a while, as captions do
        server = make_server(slots=4, latency=0.05, token_latency=0.01)

    done = run_script(
        tmp_path, "--host", server.url, "--jobs", 5, "--ray", "auto", env=driver_env(cluster[0]), timeout=150
    )

    assert done.returncode == 0, done.stderr
    assert {path: path.read_text() for path in expected} == expected
    if slots == 1:
        assert done.stderr.count("answers one request at a time") == 1
        assert f"note: {server.url} answers one request at a time although --jobs is 5: " in done.stderr
        summary = done.stderr.split(f"captioned {count}, skipped 0")[1]
        assert f"  {server.url} answered one request at a time: --jobs 5 only queued there" in summary
    else:
        assert server.most_in_flight == 5
        assert "one request at a time" not in done.stderr


def test_a_node_that_does_not_see_the_folders_stops_the_run_at_the_start(cluster, make_server, tmp_path):
    """A third node whose view of the folder is another (here a tmpfs mounted over it in a mount
    namespace of its own, as a node without the share would have an empty folder there): the run
    ends before any image is sent, naming the node and the folder."""
    address = cluster[0]
    server = make_server()
    folder = tmp_path / "folder"
    distinct_pictures(folder, 3)
    within = (
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs none "{folder}" && exec "$@"',
        "-",
    )
    if subprocess.run([*within[:-1], "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no mount namespace here (unshare and mount need root)")
    blind = Node([f"--address={address}"], {}, within)
    try:
        three_nodes = "import ray; ray.init(); assert len([n for n in ray.nodes() if n['Alive']]) == 3"
        wait_until(
            lambda: (
                subprocess.run(
                    [sys.executable, "-c", three_nodes], env=driver_env(address), check=False
                ).returncode
                == 0
            ),
            150,
        )
        done = run_script(folder, "--host", server.url, "--ray", "auto", env=driver_env(address), timeout=150)
    finally:
        # Ended by SIGTERM, its `ray start --block` takes the node out of the cluster at once (under a
        # second, measured); killed outright, Ray lists it alive for its health checks' while (17 s
        # measured under load), and the next test's run would start workers there.
        blind.process.terminate()
        try:
            blind.process.wait(20)
        except subprocess.TimeoutExpired:
            pass  # stop() kills it
        blind.stop()
    assert done.returncode == 2
    assert re.search(
        rf"error: the Ray node \S+ does not see {re.escape(str(folder))} as this machine does \(cannot read",
        done.stderr,
    )
    assert "the images must be on a filesystem every node sees, at the same path" in done.stderr
    assert not server.chats
    assert not list(folder.glob("*.txt"))


def test_no_cluster_to_join_is_said_in_one_line(make_server, tmp_path):
    server = make_server()
    distinct_pictures(tmp_path / "folder", 1)
    # An address where no Ray listens: Ray tries it for some 2 minutes, here for a few seconds.
    env = {
        **RAY_ENV,
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
        "RAY_gcs_server_port_wait_time_s": "1",
        "RAY_py_gcs_connect_timeout_s": "2",
    }
    done = run_script(tmp_path / "folder", "--host", server.url, "--ray", "auto", env=env, timeout=120)
    assert done.returncode == 2
    assert "error: --ray auto: cannot join the Ray cluster: " in done.stderr
    assert "Traceback" not in done.stderr
    assert not server.chats


@pytest.mark.timeout(60)
def test_an_address_where_nothing_listens_is_said_at_once(make_server, tmp_path):
    """Ray itself retries a silent HOST:PORT for minutes, deaf to Ctrl-C: the run says so first."""
    server = make_server()
    distinct_pictures(tmp_path / "folder", 1)
    address = f"127.0.0.1:{free_port()}"

    done = run_script(tmp_path / "folder", "--host", server.url, "--ray", address, env=RAY_ENV, timeout=50)

    assert done.returncode == 2, done.stderr
    assert f"error: --ray {address}: cannot join the Ray cluster: nothing answers at {address}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not server.chats


# --host local:PORT behind more than two jobs, and what each node's server has to say. The cluster's
# two stand-ins are changed for a test (StandInOllama.changed) and put back after it.


@pytest.fixture(scope="module")
def node_address(cluster) -> str:
    """The address Ray gives the test cluster's nodes (both the same: they run on this machine),
    by which the run names each node's own server."""
    addresses = "import ray; ray.init(); print(*{n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']})"
    asked = subprocess.run(
        [sys.executable, "-c", addresses],
        env=driver_env(cluster[0]),
        capture_output=True,
        text=True,
        check=True,
    )
    (address,) = asked.stdout.split()
    return address


def node_server_name(server: StandInOllama, node_address: str) -> str:
    """How the run names a node's own server: its address, on its node's."""
    return f"{server.url} on {node_address}"


def said_lines(stderr: str) -> list[str]:
    """The notes, warnings and errors a run printed, in order."""
    return [line for line in stderr.splitlines() if line.startswith(("note: ", "warning: ", "error: "))]


def test_each_nodes_server_gets_its_jobs_and_is_named_as_it_answers(cluster, node_address, tmp_path):
    """--host local:PORT: each node's workers send to the server on that node (here each node's
    environment names its own stand-in), none reachable from the driver. With --jobs 3 on two
    nodes whose servers differ, one answering one request at a time and one four at once: each
    server is sent three at once (no more), every image is captioned once, the summary counts
    each node's server by the name the run gives it, and only the 1-slot server is named as
    answering one at a time, once, during the run and in the summary, as a local run names a
    server (test_a_server_answering_one_at_a_time_is_named_as_in_a_local_run)."""
    address, _, (one, four), _ = cluster
    expected = distinct_pictures(tmp_path, 32)
    # The four-slot server's answers stream for a while, as captions do: together, not in turns.
    with one.changed(slots=1, latency=0.15), four.changed(latency=0.05, token_latency=0.01):
        done = run_script(
            tmp_path, "--host", "local:9", "--jobs", 3, "--ray", "auto", env=driver_env(address), timeout=150
        )
        most = one.most_in_flight, four.most_in_flight

    assert done.returncode == 0, done.stderr
    assert {path: path.read_text() for path in expected} == expected
    assert len(set(journal_entries(tmp_path))) == len(journal_entries(tmp_path)) == 32
    assert most == (3, 3)  # the 1-slot server's are queued there
    summary = done.stderr.split("captioned 32, skipped 0")[1]
    counts = [
        re.search(rf"  {re.escape(node_server_name(server, node_address))}: captioned (\d+)", summary)
        for server in (one, four)
    ]
    assert all(counts), summary
    numbers = [int(count[1]) for count in counts]
    assert min(numbers) > 0 and sum(numbers) == 32
    assert done.stderr.count("one request at a time") == 2
    assert (
        f"note: {node_server_name(one, node_address)} answers one request at a time although --jobs is 3: "
        in done.stderr
    )
    assert (
        f"  {node_server_name(one, node_address)} answered one request at a time: --jobs 3 only queued there"
        in summary
    )


# What each node's server is at the start, set on the cluster's and on a local run's two servers alike:
# a model that thinks and cannot stop (Qwen 3.8), which also answers one request at a time (its
# architecture); a server that is down (its proxy answers 502); one that lacks the model.
AT_THE_START = {
    "notes and one down": ({"models": {"llava:13b": QWEN38_MODEL}}, {"down": True}),
    "one lacks the model": ({}, {"models": {}}),
}


@pytest.mark.parametrize("case", AT_THE_START)
def test_what_each_nodes_server_says_at_the_start_is_said_as_in_a_local_run(
    case, cluster, node_address, tmp_path, make_server
):
    """Each node's server is checked on its node, and the run says what a local run with the same
    two servers as --host says of them (each note once for each server, naming it as the run names
    it), and goes on with the server that answers, or stops where one lacks the model, as it does."""
    settings = AT_THE_START[case]
    here = tmp_path / "here"
    distinct_pictures(here, 4)
    servers_here = [make_server(slots=4, **changes) for changes in settings]
    local = run_script(here, *(f"--host={server.url}" for server in servers_here), "--jobs", 3)
    address, _, servers, _ = cluster
    sent = [len(server.chats) for server in servers]
    folder = tmp_path / "there"
    expected = distinct_pictures(folder, 4)
    with servers[0].changed(**settings[0]), servers[1].changed(**settings[1]):
        done = run_script(
            folder, "--host", "local:9", "--jobs", 3, "--ray", "auto", env=driver_env(address), timeout=150
        )

    assert done.returncode == local.returncode == (0 if case == "notes and one down" else 2), done.stderr
    said_here = said_lines(local.stderr)
    for server_here, server in zip(servers_here, servers):
        said_here = [
            line.replace(server_here.url, node_server_name(server, node_address)) for line in said_here
        ]
    # But what to do where nothing listens, which is done on the node (see the test below).
    advice = (captioner.OllamaApi.start_advice, captioner.NODE_SERVER_ADVICE)
    said_here = [line.replace(*advice) for line in said_here]
    assert said_lines(done.stderr) == said_here
    assert len(said_here) == (3 if case == "notes and one down" else 1)
    assert len(servers[1].chats) == sent[1]  # the second is left out, or the run stops
    if done.returncode == 0:
        assert {path: path.read_text() for path in expected} == expected
    else:
        assert len(servers[0].chats) == sent[0]
        assert not list(folder.glob("*.txt"))


def test_every_nodes_server_down_at_the_start_is_waited_for_as_a_local_run_waits(
    cluster, node_address, tmp_path, spawn
):
    """Every node's own server is down as the run starts (its proxy answers 502, as while Ollama
    restarts behind it): the run waits for them as a local run waits for a server that may be
    restarting, checking each again on its node, and goes on with the one that comes back; the
    other is left out, as a local run leaves it (test_hostile_servers.py has the local run's)."""
    address, _, (back, gone), _ = cluster
    expected = distinct_pictures(tmp_path, 4)
    sent = len(gone.chats)
    # The tests' 1.5 s wait (their pause scale) would be over before this test could answer it.
    env = {**driver_env(address), "LLAVA_CAPTION_PAUSE_SCALE": "1"}
    lines: list[str] = []
    with back.changed(down=True), gone.changed(down=True):
        run = spawn(tmp_path, "--host", "local:9", "--jobs", 2, "--ray", "auto", env=env)
        reader = threading.Thread(target=lambda: lines.extend(iter(run.stderr.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: sum("in case it is restarting" in line for line in lines) == 2 or run.poll(), 120)
        assert run.poll() is None, "".join(lines)
        with back.changed(down=False):
            run.wait(timeout=120)
            reader.join(timeout=30)
    said = "".join(lines)

    assert run.returncode == 0, said
    assert {path: path.read_text() for path in expected} == expected
    for server in (back, gone):
        assert (
            f"{node_server_name(server, node_address)} answers 502 (its proxy's word for a server that is down); "
            "waiting up to 15s in case it is restarting" in said
        )
    assert f"{node_server_name(back, node_address)} answers\n" in said
    left_out = [
        line for line in lines if line.startswith("warning: ") and "captioning with the others" in line
    ]
    assert len(left_out) == 1 and node_server_name(gone, node_address) in left_out[0], said
    assert len(gone.chats) == sent


def test_a_nodes_server_where_nothing_listens_is_said_with_the_nodes_advice(monkeypatch):
    """Nothing listens at a node's own server: the reason names it as the run does and says what
    to do on that node (start it there, or name its address in the node's environment), not to
    point --host at it, which --host local:PORT already does. A worker as its node runs it, here."""
    monkeypatch.delenv(captioner.NODE_SERVER_ENV, raising=False)
    port = free_port()  # nothing listens there
    config = captioner.Config(folders=[Path(".")], prompt=captioner.Template("Describe it."))
    url, trouble, *_ = captioner.Worker(config, judge=None).check(port, "10.0.0.5")
    assert url == f"http://127.0.0.1:{port}"
    assert trouble.startswith(f"cannot reach Ollama at http://127.0.0.1:{port} on 10.0.0.5; ")
    assert trouble.endswith(
        f"start it on that node, or give that node's `ray start` {captioner.NODE_SERVER_ENV}=URL"
    )
    assert "--host" not in trouble
