"""Decisions without a server: the retry policy, what each error means, loops, CLIP length,
addresses, what reaches the terminal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import captioner

Fault, Action = captioner.Fault, captioner.Action
RETRY_TABLE_PAGE = Path(captioner.__file__).parent / "docs" / "when-things-go-wrong.md"


@pytest.mark.parametrize(
    "fault, action",
    [
        (Fault.UNFIT_ANSWER, Action.RETRY_NOW_NEW_SEED),
        (Fault.SERVER_STRUGGLING, Action.RETRY_AFTER_PAUSE),
        (Fault.CONNECTION_BROKE, Action.WAIT_FOR_SERVER),
    ],
)
def test_faults_that_may_pass_are_retried_until_the_tries_are_used_up(fault, action):
    assert captioner.decide(fault, 0, 3) == (action, 1)
    assert captioner.decide(fault, 2, 3) == (action, 3)
    assert captioner.decide(fault, 3, 3) == (Action.FAIL_IMAGE, 4)
    assert captioner.decide(fault, 0, 0) == (Action.FAIL_IMAGE, 1)


def test_a_server_outage_uses_no_try_until_it_has_happened_to_the_image_five_times():
    for times in range(1, 6):
        assert captioner.decide(Fault.SERVER_DOWN, 3, 3, times) == (Action.WAIT_FOR_SERVER, 3)
    # Then the image is suspected of bringing the server down: each outage uses a try.
    assert captioner.decide(Fault.SERVER_DOWN, 0, 3, 6) == (Action.WAIT_FOR_SERVER, 1)
    assert captioner.decide(Fault.SERVER_DOWN, 3, 3, 6) == (Action.FAIL_IMAGE, 4)


@pytest.mark.parametrize(
    "fault, action",
    [
        (Fault.MODEL_GONE, Action.TAKE_SERVER_OUT),
        (Fault.ACCESS_DENIED, Action.STOP_RUN),
        (Fault.DISK_UNWRITABLE, Action.STOP_RUN),
        (Fault.REQUEST_REFUSED, Action.FAIL_IMAGE),
        (Fault.IMAGE_UNREADABLE, Action.FAIL_IMAGE),
        (Fault.CAPTION_UNWRITABLE, Action.FAIL_IMAGE),
    ],
)
def test_faults_that_are_not_the_images_use_none_of_its_tries(fault, action):
    # A server outage of any length must not fail an image that had used its tries.
    assert captioner.decide(fault, 3, 3) == (action, 3)


def test_the_docs_retry_table_says_what_the_policy_does():
    text = RETRY_TABLE_PAGE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \| (yes|no|after \d+ times) \|$", text, re.MULTILINE)
    table = {name: (what, action, uses) for name, what, action, uses in rows}
    assert table == {
        fault.name: (fault.value, rule.action.value, uses_a_try(rule))
        for fault, rule in captioner.POLICY.items()
    }


def uses_a_try(rule) -> str:
    if not rule.uses_a_try:
        return "no"
    return f"after {rule.free_times} times" if rule.free_times else "yes"


@pytest.mark.parametrize(
    "status, text, fault",
    [
        (404, "model 'llava:13b' not found", Fault.MODEL_GONE),
        (401, "unauthorized", Fault.ACCESS_DENIED),
        (403, "", Fault.ACCESS_DENIED),
        (413, "Request Entity Too Large", Fault.REQUEST_REFUSED),
        (422, "Unprocessable Entity", Fault.REQUEST_REFUSED),
        (400, "illegal base64 data at input byte 4", Fault.REQUEST_REFUSED),
        (502, "<html>bad gateway</html>", Fault.SERVER_DOWN),
        (504, "Gateway Time-out", Fault.SERVER_DOWN),
        (503, "server busy, please try again.  maximum pending requests exceeded", Fault.SERVER_BUSY),
        (429, "Too Many Requests", Fault.SERVER_BUSY),
        (500, "model runner has unexpectedly stopped", Fault.SERVER_STRUGGLING),
        (-1, "an error was encountered while running the model", Fault.SERVER_STRUGGLING),
        (500, "failed to process inputs: unable to make llava embedding from image", Fault.REQUEST_REFUSED),
        (
            500,
            "Failed to create new sequence: failed to process inputs: image: unknown format",
            Fault.REQUEST_REFUSED,
        ),
    ],
)
def test_each_status_has_its_fault(status, text, fault):
    assert captioner.status_fault(status, text) is fault


def test_pauses_double_with_jitter_up_to_a_ceiling():
    first, longest = captioner.BACKOFF_FIRST, captioner.BACKOFF_LONGEST
    for tries in range(1, 4):
        pause = captioner.backoff(tries)
        assert 0.5 * first * 2 ** (tries - 1) <= pause <= 1.5 * first * 2 ** (tries - 1)
    assert captioner.backoff(40) <= 1.5 * longest


# What models really say: natural emphasis and lists are captions; the same clause said
# again and again until the token limit is a loop.
CAPTIONS = [
    "a very very very very good dog on a lawn",
    "ha ha ha ha, a cartoon cat laughing",
    "stripes, stripes, stripes: a zebra's flank in close-up",
    "1girl, solo, long hair, smile, red dress, outdoors, cherry blossoms, day",
    "a red car, a blue car and a green car parked in a row",
    "bye bye bye written on a neon sign",
    "row after row after row of vines on a hillside at dusk, warm light",
    "a tiled floor, tile after tile, black and white checkerboard",
]
LOOPS = [
    "a cat, " * 30,
    "a woman standing in a field, " * 8,
    "1girl, solo, 1girl, solo, 1girl, solo, 1girl, solo, 1girl, solo, 1girl, solo",
    "The sky is blue. The sky is blue. The sky is blue. The sky is blue.",
    (
        "a forest at night with glowing mushrooms and mushrooms and mushrooms and mushrooms and mushrooms "
        "and mushrooms and mushrooms and mushrooms"
    ),
    "photo of a dog on a beach, photo of a dog on a beach, photo of a dog on a beach",
]


@pytest.mark.parametrize("text", CAPTIONS)
def test_natural_repetition_is_a_caption(text):
    assert not captioner.is_looping(text)


@pytest.mark.parametrize("text", LOOPS)
def test_a_runaway_repetition_is_a_loop(text):
    assert captioner.is_looping(text)


@pytest.mark.parametrize(
    "caption, at_least",
    [
        ("a red fox in the snow", 7),  # 5 words + start + end
        ("一只红色的狐狸在雪地里", 13),  # 11 characters, one token each at least
        ("a " + "x" * 120, 23),  # one giant word is many tokens
    ],
)
def test_clip_length_is_not_undercounted(caption, at_least):
    assert captioner.estimated_clip_tokens(caption) >= at_least


@pytest.mark.parametrize(
    "given, url",
    [
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        # The name as given: NO_PROXY=localhost must see it (server_urls() still takes it and
        # 127.0.0.1 for one server).
        ("http://localhost:11434/", "http://localhost:11434"),
        ("localhost", "http://localhost:11434"),
        (" 127.0.0.1:8080 ", "http://127.0.0.1:8080"),
        ("http://gpu1", "http://gpu1:80"),
        ("https://Ollama.example.com/api-proxy/", "https://ollama.example.com:443/api-proxy"),
        ("[::1]:11434", "http://[::1]:11434"),
        (":9000", "http://127.0.0.1:9000"),
    ],
)
def test_a_server_has_one_spelling(given, url):
    assert captioner.server_url(given) == url


@pytest.mark.parametrize("given", ["127.0.0.1:99999", "127.0.0.1:abc", "ftp://host:21", "http://", "host:0"])
def test_a_malformed_address_is_refused(given):
    with pytest.raises(captioner.argparse.ArgumentTypeError):
        captioner.server_url(given)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain café.jpg", "plain café.jpg"),
        ("line\nbreak.jpg", "line\\nbreak.jpg"),
        ("\x1b]0;owned\x07\x1b[2J", "\\x1b]0;owned\\x07\\x1b[2J"),
        ("right-to-left \u202egpj.exe", "right-to-left \\u202egpj.exe"),
        ("bad \udcff byte", "bad \\xff byte"),
    ],
)
def test_what_reaches_the_terminal_has_no_control_characters(text, shown):
    assert captioner.shown(text) == shown


def test_an_html_error_page_is_reduced_to_its_title():
    page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<h1>502</h1>\r\n</body></html>"
    assert captioner.server_message(page) == "502 Bad Gateway"
    assert captioner.server_message("a plain\nerror") == "a plain error"


def test_a_silent_server_is_probed_more_and_more_slowly_and_anew_after_each_outage():
    captioner.import_run_libraries()
    server = captioner.Server("http://127.0.0.1:9", 1, captioner.OllamaApi("http://127.0.0.1:9", timeout=5))
    first = captioner.PROBE_FIRST
    try:
        for outage in range(2):
            server.went_quiet("cannot reach the Ollama server")
            assert server.probe_due()  # the first probe goes at once
            pauses = []
            for _ in range(4):
                before = time_now()
                server.probed("cannot reach the Ollama server", wait_seconds=3600)
                pauses.append(server.next_probe - before)
            assert [round(pause / first) for pause in pauses] == [1, 2, 4, 8], outage
            server.probed("", wait_seconds=3600)  # it answers again
            assert server.state is captioner.State.ANSWERING and server.free_slots() == 1
    finally:
        server.close()


def time_now() -> float:
    return captioner.time.monotonic()
