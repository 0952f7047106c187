"""Input events from viewers (tap, swipe, key, text), validated, and what a device does
with them.

The ingress parses every message of a viewer's `input` data channel with `parse_event`;
a bad event is answered with an error naming the field and is never forwarded. A valid
event reaches the device's capture actor, which hands it to its source: a synthetic
device draws a marker where it was tapped; an ADB device runs `adb shell input ...`,
built by `adb_input_args` from an argument list (never a shell string of ours), with
text escaped for the device's shell.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TapEvent(_Event):
    """A tap at normalised coordinates (0..1 from the top-left corner)."""

    type: Literal["tap"]
    x: Unit
    y: Unit


class SwipeEvent(_Event):
    """A swipe from (x1, y1) to (x2, y2), normalised, over `duration_ms`."""

    type: Literal["swipe"]
    x1: Unit
    y1: Unit
    x2: Unit
    y2: Unit
    duration_ms: Annotated[int, Field(ge=1, le=10_000)] = 300


class KeyEvent(_Event):
    """An Android key code (KEYCODE_BACK = 4, KEYCODE_HOME = 3, KEYCODE_ENTER = 66, ...)."""

    type: Literal["key"]
    code: Annotated[int, Field(ge=0, le=400)]


class TextEvent(_Event):
    """Text typed into the focused field."""

    type: Literal["text"]
    text: Annotated[str, Field(min_length=1, max_length=500)]


InputEvent = Annotated[TapEvent | SwipeEvent | KeyEvent | TextEvent, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(InputEvent)
MAX_MESSAGE_BYTES = 4096


class InputError(ValueError):
    """The event is invalid; the message names the field."""


def parse_event(message: str | bytes) -> TapEvent | SwipeEvent | KeyEvent | TextEvent:
    """Validate one data-channel message; raise InputError naming the field."""
    if isinstance(message, bytes):
        raise InputError("message: must be JSON text, not binary")
    if len(message.encode()) > MAX_MESSAGE_BYTES:
        raise InputError(f"message: larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        data = json.loads(message)
    except json.JSONDecodeError as exc:
        raise InputError(f"message: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError("message: must be a JSON object with a 'type'")
    try:
        return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:] or first["loc"]) or "type"
        if first["type"] == "union_tag_invalid":
            loc = "type"
            msg = "must be one of 'tap', 'swipe', 'key', 'text'"
        elif first["type"] == "union_tag_not_found":
            loc, msg = "type", "is required ('tap', 'swipe', 'key' or 'text')"
        else:
            msg = first["msg"]
        raise InputError(f"{loc}: {msg}") from exc


# Characters the device's shell would interpret in `input text` arguments.
_SHELL_SPECIAL = set("\\'\"`$&|;<>()*?~#![]{}^")


def escape_input_text(text: str) -> str:
    """Escape `text` for `adb shell input text` (spaces become %s, as `input` expects)."""
    out = []
    for char in text:
        if char == " ":
            out.append("%s")
        elif char == "%":
            out.append("\\%")
        elif char in _SHELL_SPECIAL:
            out.append("\\" + char)
        elif char in "\n\r\t":
            raise InputError("text: control characters cannot be typed; send key events")
        else:
            out.append(char)
    return "".join(out)


def adb_input_args(
    event: TapEvent | SwipeEvent | KeyEvent | TextEvent, *, width: int, height: int
) -> list[str]:
    """The `input ...` arguments (after `adb -s SERIAL shell`) for one event."""

    def px(value: float, size: int) -> str:
        return str(min(size - 1, max(0, round(value * (size - 1)))))

    if isinstance(event, TapEvent):
        return ["input", "tap", px(event.x, width), px(event.y, height)]
    if isinstance(event, SwipeEvent):
        return [
            "input", "swipe",
            px(event.x1, width), px(event.y1, height),
            px(event.x2, width), px(event.y2, height),
            str(event.duration_ms),
        ]  # fmt: skip
    if isinstance(event, KeyEvent):
        return ["input", "keyevent", str(event.code)]
    return ["input", "text", escape_input_text(event.text)]
