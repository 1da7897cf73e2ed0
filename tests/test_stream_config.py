"""The stream's pure parts: which patterns a consumer's allowance covers, the consumers
file's problems one line each, and check-config for the stream role. No broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.__main__ import main
from bridge.settings import SettingsError
from bridge.stream.consumers import load_consumers
from bridge.topics import covers, matches

TOKEN = "a-token-of-twenty-chars"


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("#", "#", True),
        ("#", "netdevbpf.*", True),
        ("netdevbpf.*", "netdevbpf.patch-created", True),
        ("netdevbpf.*", "netdevbpf.*", True),
        ("netdevbpf.*", "#", False),
        ("netdevbpf.*", "*.patch-created", False),
        ("netdevbpf.*", "netdevbpf.#", False),  # netdevbpf.#  also matches "netdevbpf"
        ("netdevbpf.#", "netdevbpf.*", True),
        ("netdevbpf.#", "netdevbpf", True),
        ("*.patch-created", "dpdk.patch-created", True),
        ("*.patch-created", "dpdk.*", False),
        ("#.check-created", "dpdk.check-created", True),
        ("dpdk.patch-created", "dpdk.patch-created", True),
        ("dpdk.patch-created", "dpdk.series-created", False),
        ("*", "*.*", False),
    ],
)
def test_covers(allowed, requested, covered):
    assert covers(allowed, requested) is covered


WORDS = st.lists(st.sampled_from(["a", "b", "*", "#"]), min_size=1, max_size=4).map(".".join)
KEYS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5).map(".".join)


@given(WORDS, WORDS, st.lists(KEYS, max_size=30))
def test_a_covered_pattern_never_matches_a_key_its_allowance_does_not(allowed, requested, keys):
    if covers(allowed, requested):
        for key in keys:
            assert not matches(requested, key) or matches(allowed, key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consumers.toml"
    path.write_text(text)
    return path


def test_a_consumers_file_loads_tokens_inline_or_from_a_file(tmp_path):
    (tmp_path / "dpdk.token").write_text("dpdk-token-from-a-file\n")
    consumers = load_consumers(
        write(
            tmp_path,
            f'[[consumer]]\nname = "nipa"\ntoken = "{TOKEN}"\n\n'
            '[[consumer]]\nname = "dpdk"\ntoken_file = "dpdk.token"\nevents = ["dpdk.*"]\n',
        )
    )
    assert consumers.names == ["nipa", "dpdk"]
    assert consumers.by_token("dpdk-token-from-a-file").events == ["dpdk.*"]
    assert consumers.by_token(TOKEN).events == ["#"]
    assert consumers.by_token(TOKEN + "x") is None


def test_every_problem_of_a_consumers_file_is_one_line_and_no_token_is_shown(tmp_path):
    path = write(
        tmp_path,
        f'[[consumer]]\nname = "a"\ntoken = "{TOKEN}"\n\n'
        f'[[consumer]]\nname = "a"\ntoken = "{TOKEN}-2"\n\n'
        f'[[consumer]]\nname = "b"\ntoken = "{TOKEN}"\n\n'
        '[[consumer]]\nname = "c"\ntoken = "short"\n\n'
        '[[consumer]]\nname = "d"\n\n'
        f'[[consumer]]\nname = "e"\ntoken = "{TOKEN}-3"\nevents = ["a..b"]\n\n'
        f'[[consumer]]\nname = "f"\ntoken = "{TOKEN}-4"\ntoken_file = "x"\n\n'
        f'[[consumer]]\nname = "g"\ntoken = "{TOKEN}-5"\ncolour = "blue"\n',
    )
    with pytest.raises(SettingsError) as caught:
        load_consumers(path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}: consumer 'a': name: duplicate name (also consumer #1)",
        f"{path}: consumer 'b': token: the same token as consumer 'a'",
        f"{path}: consumer 'c': token: must be at least 16 characters",
        f"{path}: consumer 'd': token: required (or token_file)",
        f"{path}: consumer 'e': events: bad topic pattern 'a..b': words of letters, digits,"
        " '-' or '_' separated by '.', with '*' (one word) and '#' (any words) only as whole"
        " words",
        f"{path}: consumer 'f': token_file: set either token or token_file, not both",
        f"{path}: consumer 'g': colour: unknown key",
    ]
    assert TOKEN not in str(caught.value)


def test_a_consumers_file_without_consumers_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="no \\[\\[consumer\\]\\] tables"):
        load_consumers(write(tmp_path, ""))


def test_check_config_for_the_stream_role(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRIDGE_STREAM_CONSUMERS", str(write(tmp_path, "[[consumer]]\n")))
    assert main(["check-config", "--role", "stream"]) == 2
    assert "consumer #1: token: required" in capsys.readouterr().err
    good = f'[[consumer]]\nname = "nipa"\ntoken = "{TOKEN}"\n'
    monkeypatch.setenv("BRIDGE_STREAM_CONSUMERS", str(write(tmp_path, good)))
    assert main(["check-config"]) == 0  # without --role: only consumers set, so stream
    assert capsys.readouterr().out == "configuration ok for stream\n"
    monkeypatch.delenv("BRIDGE_STREAM_CONSUMERS")
    assert main(["check-config", "--role", "stream"]) == 2
    assert "BRIDGE_STREAM_CONSUMERS: required" in capsys.readouterr().err
