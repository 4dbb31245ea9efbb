"""Ray's output into the run folder: what the driver's streams and handlers carry."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from evolve.logs import RunLogs


def terminal(monkeypatch):
    """Stand-ins for the terminal (set in the test: pytest sets its own streams after fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    return out, err


def test_streams_and_handlers_go_to_the_file(monkeypatch, tmp_path):
    out, err = terminal(monkeypatch)
    early = logging.getLogger("test_logs.early")  # like Serve's: made before, holding the terminal
    handler = logging.StreamHandler(err)
    early.addHandler(handler)
    try:
        with RunLogs(tmp_path / "logs") as logs:
            print("(ServeReplica pid=1) CALL discriminate OK")  # as Ray forwards worker output
            early.warning("Started Serve")
            logs.err.write("the run's own line\n")
        early.warning("after")
    finally:
        early.removeHandler(handler)
    text = (tmp_path / "logs" / "ray.log").read_text()
    assert "CALL discriminate OK" in text and "Started Serve" in text
    assert "own line" not in text and "after" not in text
    assert err.getvalue() == "the run's own line\nafter\n" and out.getvalue() == ""
    assert sys.stdout is out and sys.stderr is err and handler.stream is err


def test_an_error_is_logged_and_raised(monkeypatch, tmp_path):
    _, err = terminal(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"), RunLogs(tmp_path / "logs"):
        raise RuntimeError("boom")
    assert "RuntimeError: boom" in (tmp_path / "logs" / "ray.log").read_text()
    assert sys.stderr is err


def test_verbose_changes_nothing(monkeypatch, tmp_path):
    out, _ = terminal(monkeypatch)
    with RunLogs(tmp_path / "logs", verbose=True) as logs:
        print("shown")
    assert logs.path is None and not (tmp_path / "logs").exists()
    assert out.getvalue() == "shown\n"
