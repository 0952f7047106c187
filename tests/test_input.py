"""Input events: validation that names the field, and the ADB command built from them."""

from __future__ import annotations

import json

import pytest

from actors.input import InputError, adb_input_args, escape_input_text, parse_event


def test_valid_events_parse() -> None:
    assert parse_event('{"type": "tap", "x": 0, "y": 1}').type == "tap"
    swipe = parse_event('{"type": "swipe", "x1": 0.1, "y1": 0.9, "x2": 0.1, "y2": 0.1}')
    assert swipe.duration_ms == 300  # type: ignore[union-attr]
    assert parse_event('{"type": "key", "code": 4}').code == 4  # type: ignore[union-attr]
    assert parse_event('{"type": "text", "text": "hello"}').text == "hello"  # type: ignore[union-attr]


def test_binary_and_oversized_messages_are_refused() -> None:
    with pytest.raises(InputError, match="^message: must be JSON text"):
        parse_event(b'{"type": "tap"}')
    with pytest.raises(InputError, match="^message: larger than"):
        parse_event('{"type": "text", "text": "' + "a" * 5000 + '"}')


def test_adb_commands_are_argument_lists_in_device_pixels() -> None:
    tap = parse_event('{"type": "tap", "x": 0.5, "y": 1.0}')
    assert adb_input_args(tap, width=720, height=1280) == ["input", "tap", "360", "1279"]
    swipe = parse_event(
        '{"type": "swipe", "x1": 0, "y1": 0.5, "x2": 1, "y2": 0.5, "duration_ms": 120}'
    )
    assert adb_input_args(swipe, width=720, height=1280) == [
        "input", "swipe", "0", "640", "719", "640", "120",
    ]  # fmt: skip
    key = parse_event('{"type": "key", "code": 66}')
    assert adb_input_args(key, width=720, height=1280) == ["input", "keyevent", "66"]


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("hello world", "hello%sworld"),
        ("a;rm -rf /", "a\\;rm%s-rf%s/"),
        ("$(reboot)", "\\$\\(reboot\\)"),
        ('it\'s "q" `x` & y | z', 'it\\\'s%s\\"q\\"%s\\`x\\`%s\\&%sy%s\\|%sz'),
        ("100%", "100\\%"),
    ],
)
def test_text_is_escaped_for_the_device_shell(text: str, escaped: str) -> None:
    assert escape_input_text(text) == escaped
    event = parse_event(json.dumps({"type": "text", "text": text}))
    assert adb_input_args(event, width=1, height=1) == ["input", "text", escaped]


def test_control_characters_are_refused_for_text() -> None:
    with pytest.raises(InputError, match="^text: control characters"):
        escape_input_text("line\nbreak")
