"""`mace serve` builds its engine in a thread that exits (torch's OpenMP team goes with it)."""

import threading

import pytest

from server.app import _in_a_passing_thread


def test_start_up_runs_in_another_thread_that_is_gone_after():
    seen = []
    assert _in_a_passing_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    (thread,) = seen
    assert thread is not threading.main_thread() and thread.name == "mace-start-up" and not thread.is_alive()


def test_a_start_up_error_is_raised_on_the_calling_thread():
    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        _in_a_passing_thread(fail)
