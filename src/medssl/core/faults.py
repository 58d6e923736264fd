"""Named points at which a test can kill the running process.

Killed jobs are the commonest fault on a shared cluster (time limits,
pre-emption, the OOM killer). The guarantees that medssl gives about them (no
half-written file under a final name, resumption from the last checkpoint,
the same numbers after a rerun) are only worth stating if a test kills real
stage processes at chosen moments and checks them. Code marks those moments
with ``fault_point("name")``; the environment variable ``MEDSSL_FAULT_AT``
selects one, and the process then SIGKILLs itself, exactly as the cluster
would (no ``finally`` block, no ``atexit`` handler runs).

``MEDSSL_FAULT_AT=name`` kills at the first time ``name`` is reached,
``name#N`` at the N-th time. Unset (always, outside tests), a fault point is
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MEDSSL_FAULT_AT"
"""Environment variable naming the fault point to kill at (``name`` or ``name#N``)."""

_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``MEDSSL_FAULT_AT`` selects ``name`` now."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
