"""Issue 20, item 6: how many requests a server really runs at once, told from the times of the
requests the run sends anyway (TurnTaking): a server that answers one at a time behind more
--jobs is named once, during the run and in the summary; a server with the slots for them is not."""

from __future__ import annotations

import heapq

import pytest
from conftest import captioner, distinct_pictures
from stand_in_ollama import THINKING_MODEL

NOTE = "answers one request at a time"
SUMMARY = "answered one request at a time: --jobs {jobs} only queued there"


# -- the detector, on the times of a server simulated here ------------------------------------


def timeline(slots: int, jobs: int, prefill: float, answer: float, count: int, load: float = 0.0) -> list:
    """(sent, first token, end) of each of `count` requests to a server with `slots` slots that
    takes them in order of arrival, each `prefill` s to its first token and `answer` s more to
    its end (the first waits `load` s more, for the model), with `jobs` in flight: the first
    `jobs` sent a millisecond apart, each next one as an answer ends. Requests 0, 3, 6 ... take a
    tenth longer, as images and captions differ."""
    sent = [index * 0.001 for index in range(min(jobs, count))]
    waiting, free, now = list(range(len(sent))), slots, 0.0
    ends: list = []  # the ends of the answers being generated
    times: dict = {}
    while len(times) < count:
        while free and waiting and sent[waiting[0]] <= now:
            index, free = waiting.pop(0), free - 1
            scale = 1.1 if index % 3 == 0 else 1.0
            first = now + (load if not times else 0.0) + prefill * scale
            times[index] = (sent[index], first, first + answer * scale)
            heapq.heappush(ends, times[index][2])
        arrivals = [sent[index] for index in waiting if sent[index] > now]
        if ends and (not arrivals or ends[0] <= min(arrivals)):
            now, free = heapq.heappop(ends), free + 1
            if len(sent) < count:  # the run sends the next image at once
                waiting.append(len(sent))
                sent.append(now)
        else:
            now = min(arrivals)
    return [times[index] for index in range(count)]


def named_at(requests: list, jobs: int) -> int | None:
    """Replay the requests' times to a TurnTaking, in the order they happen; the count of answers
    ended when it names the server, or None."""
    taking = captioner.TurnTaking(jobs)
    events = sorted(
        (at, kind, index)
        for index, times in enumerate(requests)
        for kind, at in enumerate(times)  # 0 sent, 1 first token, 2 end
    )
    turns, ended = {}, 0
    for at, kind, index in events:
        if kind == 0:
            turns[index] = captioner.Turn(taking, at) if taking.watching else None  # as timed() does
        elif turns[index] is None:
            continue
        elif kind == 1:
            taking.began(turns[index], at)
        else:
            taking.ended(turns[index], at)
            ended += 1
            if taking.one_at_a_time:
                return ended
    return None


@pytest.mark.parametrize(
    "prefill, answer", [(0.5, 2.0), (1.0, 0.001)], ids=["captions", "answers-shorter-than-their-wait"]
)
def test_a_server_answering_one_at_a_time_is_named_at_its_sixth_answer(prefill, answer):
    # The first answer has none before it, the second was sent with the first: the next four
    # waited through a whole answer each.
    requests = timeline(slots=1, jobs=5, prefill=prefill, answer=answer, count=20)

    assert named_at(requests, jobs=5) == 2 + captioner.TURNS_IN_A_ROW


def test_loading_the_model_only_delays_the_verdict():
    # The first turn includes a 30 s load: the turns after it look short beside it until it is
    # no longer among the last TURNS_REMEMBERED.
    requests = timeline(slots=1, jobs=5, prefill=0.5, answer=2.0, count=20, load=30.0)

    assert named_at(requests, jobs=5) == 1 + captioner.TURNS_REMEMBERED + captioner.TURNS_IN_A_ROW


@pytest.mark.parametrize("slots", [2, 4, 8])
@pytest.mark.parametrize(
    "prefill, answer", [(0.5, 2.0), (1.0, 1.0), (1.0, 0.001)], ids=["captions", "even", "very-short-answers"]
)
def test_a_server_with_the_slots_is_never_named(slots, prefill, answer):
    # Long answers stream side by side; very short ones, begun together, end moments apart.
    requests = timeline(slots=slots, jobs=slots + 1, prefill=prefill, answer=answer, count=60)

    assert named_at(requests, jobs=slots + 1) is None


def test_answers_streamed_side_by_side_are_never_one_at_a_time():
    # Each answer begins half-way through the one before it, its request sent long before, and
    # each turn is as long as the others: only the streaming side by side tells.
    requests = [(index - 3.0, float(index), index + 1.5) for index in range(3, 40)]

    assert named_at(requests, jobs=5) is None


@pytest.mark.parametrize("jobs", [1, 2])
def test_with_jobs_1_or_2_a_server_answering_one_at_a_time_is_not_watched(jobs):
    # --jobs 2 against one slot is --jobs = slots + 1: the one waiting request is meant.
    requests = timeline(slots=1, jobs=jobs, prefill=0.5, answer=2.0, count=20)

    assert named_at(requests, jobs=jobs) is None


def judged(requests: dict, jobs: int, lost: int | None = None) -> dict:
    """Replay the requests' times of several servers, in the order they happen, to one TurnJudge
    (--ray: each worker tells it of each first token and end, the driver of a turn whose worker
    was lost); for each server the count of its answers ended when it was named, or None."""
    judge = captioner.TurnJudge(jobs)
    events = sorted(
        (at, kind, server, index)
        for server, times_of in requests.items()
        for index, times in enumerate(times_of)
        for kind, at in enumerate(times)
        if kind  # the worker tells of its request's sending with its first token
    )
    named: dict = dict.fromkeys(requests)
    ended = dict.fromkeys(requests, 0)
    for at, kind, server, index in events:
        turn = f"{server} {index}"
        if kind == 1:
            judge.began(server, turn, requests[server][index][0], at)
        elif index == lost:
            judge.lost(turn)  # its worker died mid-answer: it never ends
        else:
            ended[server] += 1
            if judge.ended(server, turn, at) and named[server] is None:
                named[server] = ended[server]
    return named


def test_the_ray_judge_names_each_server_on_its_own_and_forgets_a_lost_turn():
    # --ray: the workers of every node tell one TurnJudge of the requests to every server (each
    # node's own, with --host local:PORT). An answer lost with its worker does not stream beside
    # the others for ever (the server would never be named); the next turn, from the answer before
    # it, is two answers long, and the turns after it look short beside it until it is no longer
    # among the last TURNS_REMEMBERED (15 answers here), as after a model's load.
    requests = {
        "one": timeline(slots=1, jobs=5, prefill=0.5, answer=2.0, count=20),
        "four": timeline(slots=4, jobs=5, prefill=0.5, answer=2.0, count=60),
    }

    assert judged(requests, jobs=5) == {"one": 2 + captioner.TURNS_IN_A_ROW, "four": None}
    assert judged(requests, jobs=5, lost=3)["one"] is not None  # within its 20 answers


# -- against the stand-in, through the real clients ---------------------------------------------


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_one_slot_server_behind_jobs_5_is_named_once_and_in_the_summary(
    tmp_path, caption, make_server, api
):
    expected = distinct_pictures(tmp_path, 10)
    # Answers of 0.4 s: at 0.15 s, four suites at once on two cores (24 workers) stretched a turn
    # now and then past twice the others' (real captions take seconds, where such delays are nothing).
    one = make_server(slots=1, latency=0.4)

    run = caption(tmp_path, "--jobs", 5, *(["--api", "openai"] if api == "openai" else []), host=one.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    # Measured on the requests the run sends anyway (and the OpenAI preflight's probe picture).
    assert len(one.chats) == 10 + (api == "openai")
    assert run.err.count(NOTE) == 1
    note = next(line for line in run.err.splitlines() if NOTE in line)
    assert note.startswith(f"note: {one.url} {NOTE} although --jobs is 5: ")
    assert ("OLLAMA_NUM_PARALLEL may have fallen back" in note) is (api == "ollama")
    assert "--jobs 1" in note
    summary = run.err.split("captioned 10, skipped 0")[1]
    assert f"  {one.url} {SUMMARY.format(jobs=5)}" in summary


def test_a_4_slot_server_behind_jobs_5_is_not_named(tmp_path, caption, make_server):
    # Its answers stream for a while, as captions do (see TURNS_IN_A_ROW on answers that do not).
    expected = distinct_pictures(tmp_path, 30)
    four = make_server(slots=4, latency=0.05, token_latency=0.01)

    run = caption(tmp_path, "--jobs", 5, host=four.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert four.most_in_flight == 5
    assert "one request at a time" not in run.err


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_one_slot_server_is_not_named_with_jobs_1_or_2(tmp_path, caption, make_server, jobs):
    expected = distinct_pictures(tmp_path, 10)
    one = make_server(slots=1, latency=0.05)

    run = caption(tmp_path, "--jobs", jobs, host=one.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert "one request at a time" not in run.err


def test_of_two_servers_only_the_one_answering_one_at_a_time_is_named(tmp_path, caption, make_server):
    expected = distinct_pictures(tmp_path, 40)
    one = make_server(slots=1, latency=0.4)  # see above on 0.15 s
    # Its five answers take 0.7 s, so that the one-slot server answers a quarter of the images:
    # at 0.3 s it answered six of 40 (named at its sixth), and a loaded machine left it five.
    five = make_server(slots=5, latency=0.6, token_latency=0.02)

    run = caption(tmp_path, "--jobs", 5, "--host", five.url, host=one.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert len(one.chats) >= 10  # room for its verdict, which comes at its sixth answer
    assert run.err.count(NOTE) == 1
    assert f"note: {one.url} {NOTE}" in run.err
    assert f"{five.url} {NOTE}" not in run.err
    assert f"  {one.url} {SUMMARY.format(jobs=5)}" in run.err
    assert f"{five.url} answered" not in run.err


def test_a_model_the_preflight_named_as_one_at_a_time_is_not_named_again(tmp_path, caption, make_server):
    # qwen3vl: Ollama runs it one request at a time (server/sched.go); the preflight says so.
    expected = distinct_pictures(tmp_path, 10)
    one = make_server(slots=1, latency=0.05, models={"qwen3-vl:8b": THINKING_MODEL})

    run = caption(tmp_path, "--model", "qwen3-vl:8b", "--jobs", 5, host=one.url)

    assert run.code == 0, run.err
    assert {path: path.read_text() for path in expected} == expected
    assert run.err.count(NOTE) == 1
    assert "note: qwen3-vl:8b (qwen3vl) answers one request at a time" in run.err
    assert "although --jobs" not in run.err and "answered one request at a time" not in run.err
