"""The CLI's process settings: what the garbage collector skips after the imports, and what it still collects."""

from __future__ import annotations

import gc
import weakref

from ascend_llm.cli.process import freeze_imported_objects


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
