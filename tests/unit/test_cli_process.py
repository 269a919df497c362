"""The CLI's process settings: what the garbage collector skips after the imports, what it still collects, and
that only a process the command owns is touched, once."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest

from ascend_llm.cli import process
from ascend_llm.cli.process import freeze_imported_objects, freeze_once


class _Node:
    pass


def _tracked(obj) -> bool:
    return any(o is obj for o in gc.get_objects())  # generations 0-2: what a collection traverses


def test_freeze_skips_what_lives_now_and_still_collects_later_cycles():
    alive = _Node()
    alive.self = alive
    before = gc.get_freeze_count()
    assert _tracked(alive)
    freeze_imported_objects()
    assert gc.get_freeze_count() > before and not _tracked(alive)  # in the permanent generation
    later = _Node()
    later.self = later  # a reference cycle made after the freeze
    ref = weakref.ref(later)
    del later
    gc.collect()
    assert ref() is None  # collected as usual: nothing created after the freeze leaks


@pytest.fixture
def fresh_process(monkeypatch):
    monkeypatch.setitem(process._process, "owned", False)
    monkeypatch.setitem(process._process, "frozen", False)


def test_a_process_the_command_does_not_own_is_left_alone_and_an_owned_one_freezes_once(fresh_process):
    first = _Node()
    freeze_once()  # in-process caller (a test, a notebook): nothing happens
    assert _tracked(first)
    process.own_process()
    freeze_once()
    assert not _tracked(first)
    second = _Node()
    freeze_once()  # a second MindSpore start in the same command: no second freeze
    assert _tracked(second)


def test_main_owns_the_process_only_when_run_as_the_program(fresh_process):
    from ascend_llm.cli.main import main

    assert main(["--help"]) == 0 and not process._process["owned"]  # called in-process with its argv
    code = ("import sys; from ascend_llm.cli import process; from ascend_llm.cli.main import main; "
            "sys.argv = ['ascend-llm', '--help']; main(); print(process._process['owned'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]
