"""The two Flower 1.42 timings medfed changes, each only in a process medfed starts, each
only when asked (``node_poll_s``, ``worker``, FlowerLink's ``poll_s``).

1. The SuperNode's loop sleeps a fixed 3 s whenever its pull finds no message (and 0.5 s
   between looks for its ClientApp's reply); no flag sets it. :func:`cap_sleeps` caps the
   sleeps of that module.
2. A message travels as its header first and its objects (arrays, records) after it. A
   reader that sees the header before the objects are in (likely when it polls every
   0.05 s: the window lasts a few ms) retries each missing object after 1 s, then 2, 4 s
   (``PULL_INITIAL_BACKOFF``, capped at 10 s), so a fast poll often costs a whole second.
   :func:`quick_object_retries` makes the first retry ``first_s`` later, doubling up to
   ``cap_s``.

Both replace a module attribute that Flower's code looks up at call time (``time``, or the
``pull_objects`` function it imported); each raises RuntimeError when a Flower release no
longer has it, so a changed Flower fails loudly instead of silently running slow.
"""

from __future__ import annotations

import contextlib
import functools
import time
import types

PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


class CappedClock:
    """The ``time`` module with ``sleep`` capped at ``cap_s`` seconds."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_sleeps(module, cap_s: float) -> None:
    """Make every ``time.sleep`` in ``module`` last at most ``cap_s``."""
    if not isinstance(getattr(module, "time", None), (types.ModuleType, CappedClock)):
        raise RuntimeError(f"{module.__name__} does not use the time module: this Flower release waits differently")
    module.time = CappedClock(cap_s)


def quick_object_retries(module, first_s: float, cap_s: float = 1.0) -> None:
    """Give ``module``'s object-pull functions (whichever of :data:`PULL_FUNCTIONS` it imported
    from Flower) a first retry after ``first_s``, doubling up to ``cap_s``."""
    patched = False
    for name in PULL_FUNCTIONS:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        original = getattr(fn, "medfed_original", fn)
        quick = functools.partial(original, initial_backoff=first_s, backoff_cap=max(cap_s, first_s))
        quick.medfed_original = original
        setattr(module, name, quick)
        patched = True
    if not patched:
        raise RuntimeError(f"{module.__name__} has none of {', '.join(PULL_FUNCTIONS)}: "
                           "this Flower release pulls objects differently")


@contextlib.contextmanager
def quick_object_retries_in(module, first_s: float, cap_s: float = 1.0):
    """:func:`quick_object_retries` for the duration of a ``with`` block."""
    before = {name: getattr(module, name) for name in PULL_FUNCTIONS if hasattr(module, name)}
    quick_object_retries(module, first_s, cap_s)
    try:
        yield
    finally:
        for name, fn in before.items():
            setattr(module, name, fn)
