"""One run at a time per output folder: the second refuses naming the first; a crashed run never blocks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from fpt_monai.engine import RunLock, RunLockedError

#: A child process that takes the lock on argv[1], says so, and waits to be killed.
HOLDER = """
import sys, time
from fpt_monai.engine import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock on ``tmp_path / "eval"`` (killed at the end)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "eval")], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_refuses_naming_the_running_one(tmp_path, holder):
    with pytest.raises(RunLockedError) as refused:
        RunLock(tmp_path / "eval").acquire()
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'eval'} is in use by another run (pid {holder.pid} on host ")
    assert socket.gethostname() in message and "started 20" in message and HOLDER.strip()[:20] not in message
    assert "command: -c " in message and "give this run its own folder" in message


def test_a_killed_run_never_blocks_the_next_which_warns_that_it_ended_without_releasing(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="fpt_monai.engine.lock"):
        lock = RunLock(tmp_path / "eval").acquire()
    assert f"(pid {holder.pid} on host" in caplog.text and "ended without releasing it" in caplog.text
    held = json.loads((tmp_path / "eval" / "run.lock").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert (tmp_path / "eval" / "run.lock").read_text() == ""  # released normally: the next run has no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fpt_monai.engine.lock"), RunLock(tmp_path / "eval") as again:
        assert again.held
    assert caplog.text == "" and not again.held


def test_rank_zero_holds_the_folder_for_a_multi_process_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not RunLock(tmp_path / "eval").acquire().held  # the other ranks take nothing
    monkeypatch.setenv("RANK", "0")
    lock = RunLock(tmp_path / "eval").acquire()
    assert lock.held
    lock.release()


def test_an_unfinished_run_of_the_same_process_is_taken_over(tmp_path, caplog):
    first = RunLock(tmp_path / "eval").acquire()  # never released: a workflow that failed before finalize
    with caplog.at_level(logging.WARNING, logger="fpt_monai.engine.lock"):
        second = RunLock(tmp_path / "eval").acquire()
    assert "held by an earlier run in this process" in caplog.text
    assert second.held and not first.held
    second.release()
    assert not RunLock(tmp_path / "eval", enabled=False).acquire().held
