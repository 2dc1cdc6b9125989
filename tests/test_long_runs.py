"""Long runs (the 1,000-cycle figures come from `eval/long_run.py`): apply -> generate -> remove cycles through
every method leave no hooks, registered attention functions, live objects or handles behind, and two threads each
driving its own model with different methods get exactly the answers they get alone."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import long_run  # noqa: E402


def test_cycles_leave_nothing_behind():
    r = long_run.run(cycles=len(long_run.SETTINGS), every=len(long_run.SETTINGS))  # every method once more
    first, last = r["checkpoints"][0], r["checkpoints"][-1]
    assert not last["handle_left"]
    for key in ("hooks", "attention_functions", "mask_functions"):
        assert last[key] == first[key], (key, r["checkpoints"])
    # a cycle allocates and frees; what survives a collection does not grow with the number of cycles
    assert last["objects"] - first["objects"] < 50, r["checkpoints"]
    assert last["python_mib"] - first["python_mib"] < 1.0, r["checkpoints"]


def test_two_threads_with_their_own_models_do_not_interfere():
    r = long_run.threaded(cycles=16)
    assert r["errors"] == [] and r["answers"] == 32 and r["mismatches"] == 0, r
