#!/usr/bin/env python3
"""A scripted `adb` STAND-IN for the tests (no Android device is reachable from here).

It replays real data made with PyAV by the tests: an Annex-B H.264 stream for
`exec-out screenrecord` and raw RGBA frames (16-byte header) for `exec-out screencap`.
Its behaviour is read from files in $FAKE_ADB_DIR, so a test can change it while the
pipeline runs:
- `state`: `device` (default) or `offline` (commands fail like adb does);
- `stream.h264`, `units.json` (offset and length of each access unit), the same units
  without SPS/PPS in `bare.h264` and `bare_units.json`, and
  `frames_per_run`: screenrecord plays `frames_per_run` access units (then exits, as
  screenrecord does at its time limit), continuing where the last run stopped, paced at
  30 fps. As on a device, SPS and PPS come once, at the start of a run (MediaCodec's
  codec config): later IDRs of the run go without them;
- `screencap/NNNN.raw`: screencap frames, served in turn;
- `pids`: every invocation appends its pid (so tests can check none is left behind);
- `input.log`: every `shell input ...` call, one JSON list per line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

DIR = Path(os.environ["FAKE_ADB_DIR"])


def state() -> str:
    path = DIR / "state"
    return path.read_text().strip() if path.exists() else "device"


def fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(1)


def counter(name: str) -> int:
    path = DIR / name
    value = int(path.read_text()) if path.exists() else 0
    path.write_text(str(value + 1))
    return value


def screenrecord(serial: str) -> None:
    units = json.loads((DIR / "units.json").read_text())
    stream = (DIR / "stream.h264").read_bytes()
    bare_units = json.loads((DIR / "bare_units.json").read_text())
    bare = (DIR / "bare.h264").read_bytes()
    per_run = int((DIR / "frames_per_run").read_text())
    run = counter(f"runs-{serial}")
    start = (run * per_run) % len(units)
    out = sys.stdout.buffer
    begin = time.monotonic()
    for n in range(per_run):
        # The run's first unit with SPS/PPS, the others without.
        source, table = (stream, units) if n == 0 else (bare, bare_units)
        offset, length = table[(start + n) % len(table)]
        out.write(source[offset : offset + length])
        out.flush()
        delay = begin + (n + 1) / 30 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def screencap() -> None:
    frames = sorted((DIR / "screencap").glob("*.raw"))
    n = counter("screencaps")
    sys.stdout.buffer.write(frames[n % len(frames)].read_bytes())


def main(argv: list[str]) -> None:
    with (DIR / "pids").open("a") as pids:
        pids.write(f"{os.getpid()}\n")
    if argv[:1] == ["connect"]:
        if state() == "offline":
            fail(f"failed to connect to '{argv[1]}': Connection refused")
        print(f"connected to {argv[1]}")
        return
    if argv[:1] != ["-s"] or len(argv) < 3:
        fail("fake adb: expected -s SERIAL ...")
    rest = argv[2:]
    if state() == "offline":
        fail(f"error: device '{argv[1]}' not found")
    if rest[:2] == ["exec-out", "screenrecord"]:
        screenrecord(argv[1])
    elif rest[:2] == ["exec-out", "screencap"]:
        screencap()
    elif rest[:2] == ["shell", "input"]:
        with (DIR / "input.log").open("a") as log:
            log.write(json.dumps(rest[1:]) + "\n")
    else:
        fail(f"fake adb: unsupported command {rest}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
