"""The run's terminal output: plain lines off a terminal, one live line on one."""

from __future__ import annotations

import io
import logging

from evolve.progress import Progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_only_messages_and_one_line_per_round():
    out, clock = io.StringIO(), Clock()
    p = Progress(3, stream=out, clock=clock)
    p.say("seed set: 6 prompts")
    p.update(heldout=0.0)  # the start's score: no line
    clock.t += 10
    p.start()
    with p.phase("train"), p.phase("judge"):
        clock.t += 50
    p.update(round=1, heldout=0.125, spend=0.84, images=28)
    p.update(spend=0.9)  # nothing finished: no line
    p.say("round 1: ...")
    clock.t += 70
    p.update(round=2, heldout=0.25, spend=1.44, images=48)
    p.close()
    assert out.getvalue() == (
        "seed set: 6 prompts\n"
        "1/3 rounds done | held-out 12.5% | spend $0.84 | 28 images | 1m00s, ~1m40s left\n"
        "round 1: ...\n"
        "2/3 rounds done | held-out 25.0% | spend $1.44 | 48 images | 2m10s, ~1m00s left\n")
    p.update(round=3)
    assert p.status() == "3/3 rounds done | held-out 25.0% | spend $1.44 | 48 images | 2m10s"  # no guess at the rest


def test_time_left_never_past_max_wall_s():
    out, clock = io.StringIO(), Clock()
    p = Progress(10, max_wall_s=300, stream=out, clock=clock)
    assert p.status() == "0/10 rounds done | 0s, ~5m00s left"  # no round timed yet: the wall clock
    p.start()
    clock.t += 60
    p.update(round=1)
    assert p.left_s() == 240  # 9 rounds of 60 s would be 540
    clock.t += 400
    assert p.left_s() == 0


def test_a_resumed_run_times_only_its_own_rounds():
    out, clock = io.StringIO(), Clock()
    p = Progress(4, stream=out, clock=clock)
    clock.t += 30  # set-up
    p.start(2)
    clock.t += 20
    p.update(round=3)
    assert out.getvalue() == "3/4 rounds done | 50s, ~20s left\n"


def test_the_run_s_warnings_are_said():
    out = io.StringIO()
    p = Progress(1, stream=out)
    log = logging.getLogger("evolve.test_progress")
    h = p.log_handler()
    log.addHandler(h)
    try:
        log.info("not this")
        log.warning("no teacher delivered %r", "a red circle")
    finally:
        log.removeHandler(h)
    assert out.getvalue() == "warning: no teacher delivered 'a red circle'\n"


def test_on_a_terminal_one_live_line_with_messages_above_it():
    tty, clock = Tty(), Clock()
    p = Progress(2, stream=tty, clock=clock, refresh_s=3600)
    assert p._bar is not None
    p.start()
    with p.phase("train"):
        assert p.status().startswith("0/2 rounds done | train | ")
        p.say("seed set: 6 prompts")
    clock.t += 30
    p.update(round=1, heldout=0.5, spend=1.0, images=10)
    p.close()
    text = tty.getvalue()
    assert "\n" not in text.replace("seed set: 6 prompts\n", "")  # the status is never a line of its own
    assert "\r" in text
    assert "0/2 rounds done | train" in text
    assert "1/2 rounds done | held-out 50.0% | spend $1.00 | 10 images | 30s, ~30s left" in text
    # The message is printed whole, the live line cleared before it and drawn again after.
    before, after = text.split("seed set: 6 prompts\n")
    assert before.endswith("\r") and "0/2 rounds done | train" in after
    assert text.endswith("\r")  # close() clears the live line: nothing of it stays


def test_live_false_on_a_terminal_prints_plain_lines():
    tty = Tty()
    p = Progress(1, stream=tty, live=False)
    p.say("hello")
    p.update(round=1)
    p.close()
    assert "\r" not in tty.getvalue() and tty.getvalue().startswith("hello\n1/1 rounds done")
