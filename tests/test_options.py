"""Model options (--option KEY=VALUE) and a system prompt (--system FILE), issue 20 items 4 and 5:
the stand-in takes options as each server does, the captioner sends them in the server's own words,
refuses what a flag sets or what a server would drop or refuse, and a pass is new only when they
are given. And an unfinished pass of the version before them finishes adding nothing twice."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import captioner, distinct_pictures, to_stand_in
from toy_api import ToyApi

DATA = Path(__file__).resolve().parent / "data" / "journal-7cd8973"
JOURNAL = ".llava-caption-ollama.journal"
PROBE = (64, 64)  # the OpenAI preflight's probe picture


def chat_body(model: str = "llava:13b", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False, **fields}


def captions_sent(server) -> list:
    return [chat for chat in server.chats if chat.picture().size != PROBE]


@pytest.fixture
def against(make_server, caption, monkeypatch):
    """run(kind, *args): the captioner against a new stand-in of that kind ("ollama", "vllm",
    "ollama-v1" or the toy API); returns (server, result)."""
    monkeypatch.setitem(captioner.APIS, ToyApi.name, ToyApi)

    def run(kind: str, *args, **settings):
        if kind != "ollama":
            settings.update(flavour=kind.removesuffix("-v1"), native=kind == "ollama-v1")
        server = make_server(**settings)
        api = {"ollama": [], "toy": ["--api", "toy"]}.get(kind, ["--api", "openai", "--model", "llava:13b"])
        return server, caption(*args, *api, host=server.url)

    return run


# -- the stand-in takes options as the servers do --------------------------------------------


def test_the_stand_in_takes_ollamas_options_as_ollama_does(make_server):
    server = make_server(answer=lambda chat: "A caption.")
    # api/types.go, Options.FromMap: a known option is taken, an unknown one skipped (a log line),
    # one of the wrong type fails the request with a 500.
    options = {"repeat_penalty": 1.1, "top_k": 40, "mirostat": 2}
    answer = to_stand_in.post(f"{server.url}/api/chat", json=chat_body(options=options), timeout=10)
    assert answer.status_code == 200
    assert server.chats[-1].options == options and server.chats[-1].ignored == ["mirostat"]

    for wrong, error in [
        ({"top_k": "40"}, 'option "top_k" must be of type integer'),
        ({"repeat_penalty": True}, 'option "repeat_penalty" must be of type float32'),
        ({"stop": "###"}, 'option "stop" must be of type array'),
    ]:
        answer = to_stand_in.post(f"{server.url}/api/chat", json=chat_body(options=wrong), timeout=10)
        assert (answer.status_code, answer.json()) == (500, {"error": error})
    assert len(server.chats) == 1


def test_the_stand_in_takes_vllms_and_ollamas_v1_fields_as_they_do(make_server):
    vllm = make_server(flavour="vllm", native=False, answer=lambda chat: "A caption.")
    fields = {"repetition_penalty": 1.1, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}
    answer = to_stand_in.post(f"{vllm.url}/v1/chat/completions", json=chat_body(**fields), timeout=10)
    assert answer.status_code == 200
    assert vllm.chats[-1].ignored == ["repeat_penalty"]  # vLLM spells it repetition_penalty
    answer = to_stand_in.post(f"{vllm.url}/v1/chat/completions", json=chat_body(top_k="forty"), timeout=10)
    assert (
        answer.status_code == 400 and "Input should be a valid integer" in answer.json()["error"]["message"]
    )

    ollama_v1 = make_server(flavour="ollama", native=True, answer=lambda chat: "A caption.")
    answer = to_stand_in.post(
        f"{ollama_v1.url}/v1/chat/completions", json=chat_body(top_k=40, top_p=0.9), timeout=10
    )
    assert answer.status_code == 200 and ollama_v1.chats[-1].ignored == ["top_k"]
    answer = to_stand_in.post(
        f"{ollama_v1.url}/v1/chat/completions", json=chat_body(top_p="high"), timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "json: cannot unmarshal string into Go struct field ChatCompletionRequest.top_p of type float64"
    )


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_the_stand_in_records_a_system_message_apart_from_the_prompt(make_server, path):
    server = make_server(answer=lambda chat: "A caption.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    answer = to_stand_in.post(f"{server.url}{path}", json=chat_body(messages=messages), timeout=10)
    assert answer.status_code == 200
    chat = server.chats[-1]
    assert (chat.system, chat.prompt, chat.roles) == ("Be brief.", "hi", ["system", "user"])


# -- --option -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, penalty", [("ollama", "repeat_penalty"), ("vllm", "repetition_penalty")], ids=["ollama", "vllm"]
)
def test_options_reach_the_server_typed_in_its_own_words(tmp_path, against, kind, penalty):
    distinct_pictures(tmp_path, 2)

    server, run = against(kind, tmp_path, "--option", f"{penalty}=1.1", "--option", "top_k=40")

    assert run.code == 0, run.err
    assert len(captions_sent(server)) == 2
    for chat in server.chats:  # the vLLM probe too: a server that refuses them says so at the start
        sent = chat.options if kind == "ollama" else chat.body
        assert (sent[penalty], sent["top_k"]) == (1.1, 40)
        assert type(sent[penalty]) is float and type(sent["top_k"]) is int
        assert chat.ignored == []
    if kind == "ollama":  # beside the options the flags set
        assert server.chats[0].options["num_ctx"] == 4096


def refused_at_the_start(server, run, *said: str) -> None:
    """The run stopped before anything was sent, in one line that says each of `said`."""
    assert run.code == 2
    assert run.err.count("\n") == 1 and all(part in run.err for part in said), run.err
    assert "Traceback" not in run.err and server.requests == []


@pytest.mark.parametrize(
    "kind, option, flag",
    [
        ("ollama", "num_ctx=8192", "--num-ctx"),
        ("ollama", "num_predict=100", "--max-tokens"),
        ("ollama", "temperature=0.2", "--temperature"),
        ("ollama", "seed=7", "--seed"),
        ("vllm", "max_tokens=100", "--max-tokens"),
        ("vllm", "max_completion_tokens=100", "--max-tokens"),
        ("vllm", "seed=7", "--seed"),
        ("vllm", "model=other", "--model"),
        ("vllm", "chat_template_kwargs={}", "--think"),
    ],
)
def test_an_option_a_flag_sets_is_refused_naming_the_flag(tmp_path, against, kind, option, flag):
    distinct_pictures(tmp_path, 1)

    server, run = against(kind, tmp_path, "--option", option)

    refused_at_the_start(server, run, f"--option {option}", flag)


@pytest.mark.parametrize("given", ["foo", "=1", "top_k=", "1x=2", "top k=2", "top_k=null"])
def test_a_malformed_option_is_refused(tmp_path, against, given):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", given)

    refused_at_the_start(server, run, "argument --option")


def test_an_option_given_twice_is_refused(tmp_path, against):
    distinct_pictures(tmp_path, 1)
    server, run = against("ollama", tmp_path, "--option", "top_k=40", "--option", "top_k=20")
    assert run.code == 2 and "--option top_k is given twice" in run.err
    assert server.requests == []


@pytest.mark.parametrize(
    "option, said",
    [
        ("repeat_penality=1.1", "would skip it, saying so only in its log; did you mean repeat_penalty?"),
        ("mirostat=2", "Ollama has no such option"),  # gone from api/types.go: Ollama skips it now
        ("top_k=forty", 'option "top_k" must be of type integer'),
        ("top_k=40.5", "a whole number: Ollama would cut 40.5 to 40"),
        ("use_mmap=1", "true or false"),
        ("stop=###", """a JSON list of strings, such as stop='["###"]'"""),
    ],
)
def test_an_option_ollama_would_skip_or_refuse_is_refused_before_anything_is_sent(
    tmp_path, against, option, said
):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", option)

    refused_at_the_start(server, run, said)


@pytest.mark.parametrize(
    "kind, option, said",
    [
        ("ollama", "top_k=1e400", "top_k=1e400: not a finite number"),
        ("ollama", "top_k=-1e400", "top_k=-1e400: not a finite number"),
        ("ollama", "num_keep=1e309", "num_keep=1e309: not a finite number"),
        ("ollama", "repeat_penalty=1e400", "repeat_penalty=1e400: not a finite number"),
        ("ollama", "stop=[1e400]", "stop=[1e400]: not a finite number"),
        ("vllm", "repetition_penalty=1e400", "repetition_penalty=1e400: not a finite number"),
        # A byte that is not UTF-8 reaches Python as a lone surrogate (surrogateescape), as
        # os.fsdecode gives it here: no request could carry it.
        ("ollama", os.fsdecode(b'stop=["\xff"]'), 'stop=["\\xff"]: not valid text (UTF-8)'),
        ("ollama", 'stop=["\\ud800"]', 'stop=["\\ud800"]: not valid text (UTF-8)'),
        ("vllm", os.fsdecode(b"user=<\xff>"), "user=<\\xff>: not valid text (UTF-8)"),
    ],
)
def test_a_value_no_request_can_carry_is_refused_in_one_line(tmp_path, against, kind, option, said):
    # JSON reads 1e400 as infinity, which no JSON encoder sends; a lone surrogate has no UTF-8.
    distinct_pictures(tmp_path, 1)

    server, run = against(kind, tmp_path, "--option", option)

    refused_at_the_start(server, run, said)


@pytest.mark.parametrize(
    "option, said",
    [
        ("top_k=9223372036854775808", "a whole number under 2**63 (Go's int"),
        ("num_keep=-1e19", "a whole number under 2**63 (Go's int"),
        ("repeat_penalty=3.5e38", "beyond float32's range (3.4e38"),
        ("top_p=-1e39", "beyond float32's range (3.4e38"),
    ],
)
def test_a_number_beyond_what_ollamas_type_holds_is_refused(tmp_path, against, option, said):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", option)

    refused_at_the_start(server, run, f"--option {option.split('=')[0]}=", said)


@pytest.mark.parametrize(
    "option, said",
    [
        ("top_p=.9", "write numbers as JSON does: top_p=0.9"),
        ("top_k=+5", "write numbers as JSON does: top_k=5"),
        ("top_p=1.", "write numbers as JSON does: top_p=1.0"),
        ("repeat_penalty=1,1", "write numbers as JSON does, with a decimal point: repeat_penalty=1.1"),
        ("top_k=1,000", "write numbers as JSON does, with a decimal point and no thousands separator"),
        ("top_p=Infinity", "top_p=Infinity: not a finite number"),
    ],
)
def test_a_number_not_spelt_as_json_is_told_its_spelling(tmp_path, against, option, said):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", option)

    refused_at_the_start(server, run, said)
    assert "must be of type" not in run.err


def test_an_option_name_that_is_not_ascii_is_told_so(tmp_path, against):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", "k\u00e9=1")

    assert run.code == 2
    assert run.err.count("\n") == 1 and "names are ASCII letters, digits and _" in run.err
    assert "is not KEY=VALUE" not in run.err
    assert server.requests == []


def test_typical_p_is_sent_with_a_warning_that_ollama_deprecated_it(tmp_path, against):
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", "typical_p=0.9")

    assert run.code == 0, run.err
    assert run.err.count("--option typical_p is deprecated since Ollama 0.35") == 1
    assert server.chats[0].options["typical_p"] == 0.9


@pytest.mark.parametrize(
    "kind, option, said",
    [
        ("vllm", "top_k=forty", "cannot take a picture sent with --option top_k=forty: "),
        ("vllm", "repeat_penalty=1.1", "vLLM spells it repetition_penalty"),
        ("ollama-v1", "top_k=40", "run with --api ollama"),
    ],
)
def test_an_option_a_server_would_refuse_or_pass_over_is_named_at_the_start(
    tmp_path, against, kind, option, said
):
    # vLLM refuses a wrongly typed field (400, at the probe picture); it passes over a field it
    # does not know, as Ollama's /v1 does a field not of its own: the captioner knows those.
    distinct_pictures(tmp_path, 2)

    server, run = against(kind, tmp_path, "--option", option)

    assert run.code == 2
    assert said in run.err
    assert captions_sent(server) == []
    assert list(tmp_path.glob("*.txt")) == []


def test_an_api_with_no_place_for_options_or_a_system_message_refuses_them(tmp_path, against):
    distinct_pictures(tmp_path, 1)
    (tmp_path / "system.txt").write_text("You are a helpful image captioner.", encoding="utf-8")

    server, with_option = against("toy", tmp_path, "--option", "top_k=40")
    _, with_system = against("toy", tmp_path, "--system", tmp_path / "system.txt")

    assert with_option.code == 2 and "the toy API has no place for model options" in with_option.err
    assert with_system.code == 2 and "the toy API has no place for a system message" in with_system.err
    assert server.requests == []


# -- --system -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "vllm"])
def test_the_system_prompt_is_the_first_message_with_its_placeholders_filled(tmp_path, against, kind):
    folder = tmp_path / "15_guideboat"
    distinct_pictures(folder, 2)
    system = tmp_path / "system.txt"
    system.write_text(
        "You are a helpful image captioner.\r\nThis is {name}, a {class}.\r\n", encoding="utf-8"
    )

    server, run = against(kind, folder, "--system", system)

    assert run.code == 0, run.err
    sent = sorted(captions_sent(server), key=lambda chat: chat.picture().width)
    assert [chat.roles for chat in sent] == [["system", "user"]] * 2
    assert [chat.system for chat in sent] == [
        "You are a helpful image captioner.\nThis is img000, a guideboat.",
        "You are a helpful image captioner.\nThis is img001, a guideboat.",
    ]
    assert all("helpful" not in chat.prompt for chat in sent)


def test_the_system_prompt_can_ask_for_the_existing_caption(tmp_path, against):
    [caption_file] = distinct_pictures(tmp_path, 1)
    caption_file.write_text("old, tags", encoding="utf-8")
    system = tmp_path.parent / f"{tmp_path.name}-system.txt"
    system.write_text("Keep these tags: {existing}", encoding="utf-8")

    server, run = against("ollama", tmp_path, "--system", system, "--existing", "overwrite")

    assert run.code == 0, run.err
    assert server.chats[0].system == "Keep these tags: old, tags"


@pytest.mark.parametrize(
    "content, said",
    [
        (None, "cannot read system prompt file"),
        ("  \n", "is empty"),
        ("Caption {subject}.", "asks for {subject}, which is not one of"),
    ],
)
def test_a_system_prompt_file_that_cannot_be_used_is_refused(tmp_path, against, content, said):
    distinct_pictures(tmp_path / "set", 1)
    system = tmp_path / "system.txt"
    if content is not None:
        system.write_text(content, encoding="utf-8")

    server, run = against("ollama", tmp_path / "set", "--system", system)

    refused_at_the_start(server, run, said, "system prompt file")


def test_an_output_is_not_written_over_the_system_prompt_file(tmp_path, against):
    distinct_pictures(tmp_path / "set", 1)
    system = tmp_path / "system.html"
    system.write_text("You are a helpful image captioner.", encoding="utf-8")

    _, run = against("ollama", tmp_path / "set", "--system", system, "--review", system)

    assert run.code == 2 and "would overwrite the system prompt file" in run.err
    assert system.read_text(encoding="utf-8") == "You are a helpful image captioner."


# -- the pass -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["option", "system"])
def test_a_run_with_a_new_option_or_system_prompt_is_a_new_pass_and_its_rerun_adds_nothing(
    tmp_path, caption, server, setting
):
    folder = tmp_path / "set"
    distinct_pictures(folder, 2)
    system = tmp_path / "system.txt"
    system.write_text("You are a helpful image captioner.", encoding="utf-8")
    given = ["--option", "repeat_penalty=1.1"] if setting == "option" else ["--system", system]

    sent = []
    for args in ([], [], given, given):  # the same pass twice, then a new pass twice
        run = caption(folder, "--existing", "overwrite", *args)
        assert run.code == 0, run.err
        sent.append(len(server.chats))

    assert sent == [2, 2, 4, 4]  # a rerun of either pass adds nothing


def test_ollamas_numbers_are_sent_in_the_options_type_whichever_way_they_are_typed(tmp_path, against):
    # Ollama keeps top_k as an int and repeat_penalty as a float32 (api/types.go): 40.0 and 40 are
    # one value to it, and so one value sent and one pass.
    distinct_pictures(tmp_path, 1)

    server, run = against("ollama", tmp_path, "--option", "top_k=40.0", "--option", "repeat_penalty=1")

    assert run.code == 0, run.err
    sent = server.chats[0].options
    assert (sent["top_k"], sent["repeat_penalty"]) == (40, 1.0)
    assert type(sent["top_k"]) is int and type(sent["repeat_penalty"]) is float


def test_a_field_of_an_openai_compatible_server_is_sent_as_typed(tmp_path, against):
    # Its type is the server's, which the captioner does not know (vLLM takes 40.0 for an int).
    distinct_pictures(tmp_path, 1)

    server, run = against("vllm", tmp_path, "--option", "top_k=40.0", "--option", "repetition_penalty=1")

    assert run.code == 0, run.err
    sent = captions_sent(server)[0].body
    assert type(sent["top_k"]) is float and type(sent["repetition_penalty"]) is int


@pytest.mark.parametrize(
    "typed, again", [("top_k=40", "top_k=40.0"), ("repeat_penalty=1.0", "repeat_penalty=1")], ids=str
)
def test_an_ollama_option_typed_another_way_is_the_same_pass(tmp_path, caption, server, typed, again):
    distinct_pictures(tmp_path, 2)

    first = caption(tmp_path, "--existing", "overwrite", "--option", typed)
    rerun = caption(tmp_path, "--existing", "overwrite", "--option", again)

    assert (first.code, rerun.code) == (0, 0), rerun.err
    assert len(server.chats) == 2  # the rerun adds nothing


# -- an upgrade -----------------------------------------------------------------------------
# tests/data/journal-7cd8973/folder.journal is the journal 7cd8973 (the version before --option
# and --system) wrote in a folder of three pictures (img000-002.png, PNGs 40-42 px wide, 32 high),
# each beside a caption "old, tags", with prompt.txt beside it, in a run stopped after two images:
#   llava-caption-ollama.py set --prompt prompt.txt --existing append --limit 2 --host STAND_IN
# against the stand-in's default llava:13b.


def test_an_unfinished_pass_of_the_version_before_options_finishes_adding_nothing_twice(
    tmp_path, caption, server
):
    folder = tmp_path / "set"
    expected = distinct_pictures(folder, 3)
    done = list(expected)[:2]
    for path, answer in expected.items():
        path.write_text(f"old, tags, {answer}" if path in done else "old, tags", encoding="utf-8")
    shutil.copy(DATA / "folder.journal", folder / JOURNAL)

    resumed = caption(folder, "--prompt", DATA / "prompt.txt", "--existing", "append")

    assert resumed.code == 0, resumed.err
    assert {path: path.read_text(encoding="utf-8") for path in expected} == {
        path: f"old, tags, {answer}" for path, answer in expected.items()
    }
    assert [chat.picture().width for chat in server.chats] == [42]
    assert json.loads((folder / JOURNAL).read_text().splitlines()[-2])["s"] == "e1d2ddaf4ceb72d5"


# What 7cd8973's Config.settings_digest() gives for these command lines (computed once with that
# version's config_from_args on an empty folder): settings added since must leave them as they were.
DIGESTS_OF_7CD8973 = [
    ([], "e1d2ddaf4ceb72d5"),
    (["--temperature", "0.2", "--seed", "7"], "1d22a79f0b470f5b"),
    (["--max-tokens", "300", "--num-ctx", "8192", "--max-size", "1024"], "a001e49c2f251477"),
    (["--think"], "4b9925fa1e97adb7"),
    (["--raw", "--prefix", "ohwx", "--suffix", "photo", "--ext", ".caption"], "f336558db8161df8"),
    (["--folder-prompt", "prompt.txt"], "76a2ea95e2217097"),
    (["--api", "openai", "--host", "http://127.0.0.1:8000", "--model", "m"], "54b9c0e1721f5fa1"),
]


# What 71d83e5 (the version with --option and --system, before their values were typed as Ollama
# types them) gives for these command lines, each typed the way that version sent: typed so, or
# the other way (40.0 for an integer, 1 for a float), a pass keeps its identity.
DIGESTS_OF_71D83E5 = [
    (["--option", "top_k=40"], "187de0c18a0a7ae2", ["--option", "top_k=40.0"]),
    (["--option", "repeat_penalty=1.1"], "6d6137a455ff721a", ["--option", "repeat_penalty=1.1"]),
    (["--option", "repeat_penalty=1.0"], "155c6f52338b963a", ["--option", "repeat_penalty=1"]),
    (
        ["--option", "top_k=40", "--option", "repeat_penalty=1.1", "--option", "top_p=0.9"],
        "de2d3bd13a5d0aae",
        ["--option", "top_k=4e1", "--option", "repeat_penalty=1.1", "--option", "top_p=0.9"],
    ),
    (
        [
            "--option",
            "num_keep=5",
            "--option",
            "min_p=0.05",
            "--option",
            'stop=["###"]',
            "--option",
            "use_mmap=false",
        ],
        "805646d3cdf410d7",
        [
            "--option",
            "num_keep=5.0",
            "--option",
            "min_p=0.05",
            "--option",
            'stop=["###"]',
            "--option",
            "use_mmap=false",
        ],
    ),
    (
        [
            "--api",
            "openai",
            "--host",
            "http://127.0.0.1:8000",
            "--model",
            "m",
            "--option",
            "top_k=40",
            "--option",
            "repetition_penalty=1",
        ],
        "30801d67456755fd",
        None,  # sent as typed: repetition_penalty=1.0 is another value to a server of unknown types
    ),
]


@pytest.mark.parametrize(
    "argv, expected, other_way", DIGESTS_OF_71D83E5, ids=[" ".join(a) for a, _, _ in DIGESTS_OF_71D83E5]
)
def test_a_pass_with_options_of_the_version_before_typing_them_keeps_its_identity(
    tmp_path, argv, expected, other_way
):
    for typed in [argv, other_way] if other_way else [argv]:
        args = captioner.build_parser().parse_args([str(tmp_path), *typed])
        assert captioner.config_from_args(args).settings_digest() == expected, typed


def test_a_pass_with_a_system_prompt_of_the_version_before_keeps_its_identity(tmp_path):
    (tmp_path / "set").mkdir()
    system = tmp_path / "system.txt"
    system.write_text("You are a helpful image captioner.\n", encoding="utf-8")
    for given, expected in [([], "93b81110dc53b49f"), (["--option", "top_k=40.0"], "c540b2540506adc2")]:
        args = captioner.build_parser().parse_args([str(tmp_path / "set"), "--system", str(system), *given])
        assert captioner.config_from_args(args).settings_digest() == expected


@pytest.mark.parametrize(
    "argv, expected", DIGESTS_OF_7CD8973, ids=[" ".join(a) or "defaults" for a, _ in DIGESTS_OF_7CD8973]
)
def test_a_pass_of_the_version_before_options_keeps_its_identity(tmp_path, argv, expected):
    args = captioner.build_parser().parse_args([str(tmp_path), *argv])
    assert captioner.config_from_args(args).settings_digest() == expected
