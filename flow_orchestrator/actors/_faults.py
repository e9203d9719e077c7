"""Fault injection for crash tests: ``FLOW_CRASH_AT=point[:node]`` makes this process kill itself
with SIGKILL the first time it reaches that point; with ``FLOW_CRASH_ONCE=<file>`` only the first
process to get there does (the file records it).

Points: ``node.before_action``, ``node.after_action`` (before the completion is published),
``node.after_publish`` (published, not acknowledged), ``node.after_join`` (the join record names this
message the winner, nothing run yet), ``trigger.after_record`` (run record written, run not
started), ``supervisor.after_record`` (run record finished, end not announced),
``supervisor.after_schedule`` (retry scheduled, failure not acknowledged).

When the variable is unset (production) ``crash_point`` is a single dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("FLOW_CRASH_AT", "")
_POINT, _, _NODE = _TARGET.partition(":")


def crash_point(point: str, node: str | None = None) -> None:
    """Die here, now, without any cleanup, if the environment asks for it."""
    if not _POINT or point != _POINT or (_NODE and node != _NODE):
        return
    once = os.environ.get("FLOW_CRASH_ONCE")
    if once:
        try:
            with open(once, "x") as marker:
                marker.write(f"{os.getpid()} {point} {node or ''}\n")
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
