"""Subject, stream, consumer and key names: the one place that knows how things are spelled on NATS.

Every workflow, node and run name becomes a subject token, so each is checked to be token-safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flow_orchestrator._errors import InvalidNameError, InvalidRunId

RUN_TOKEN = "_run"  # the node token of run-level events (a virtual node, so user nodes may not start with _)
TRIGGER_TOKEN = "_trigger"
DLQ_TOKEN = "_dlq"  # the node token of "dead_lettered" events in a run's journal
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DATA_KEY = re.compile(r"^[A-Za-z0-9_=/-]{1,200}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a safe workflow/node name, else raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidNameError(
            f"{kind} name {name!r} is not subject-token safe: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and bool(_RUN_ID.match(run_id))


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a valid run id, else raise :class:`InvalidRunId`."""
    if not is_valid_run_id(run_id):
        raise InvalidRunId(
            f"run id {run_id!r} is not subject-token safe: use 1-128 letters, digits, '_' or '-'"
        )
    return run_id


def check_data_key(key: str) -> str:
    if not isinstance(key, str) or not _DATA_KEY.match(key):
        raise InvalidNameError(
            f"WorkflowData key {key!r} is not valid: use 1-200 letters, digits, '_', '-', '=' or '/'"
        )
    return key


@dataclass(frozen=True, slots=True)
class Names:
    """All names derived from one prefix (default ``flow``), so test runs and tenants never collide."""

    prefix: str = "flow"

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)

    # streams and buckets
    @property
    def triggers_stream(self) -> str:
        return f"{self.prefix.upper()}_TRIGGERS"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.prefix.upper()}_DLQ"

    @property
    def state_bucket(self) -> str:
        return f"{self.prefix.upper()}_STATE"

    # subjects
    def trigger(self, workflow: str) -> str:
        return f"{self.prefix}.trigger.{workflow}"

    def event(self, workflow: str, run_id: str, node: str, kind: str) -> str:
        return f"{self.prefix}.evt.{workflow}.{run_id}.{node}.{kind}"

    def run_event(self, workflow: str, run_id: str, kind: str) -> str:
        return self.event(workflow, run_id, RUN_TOKEN, kind)

    def events_of_run(self, workflow: str, run_id: str) -> str:
        return f"{self.prefix}.evt.{workflow}.{run_id}.>"

    def schedule(self, workflow: str, run_id: str, node: str, attempt: int) -> str:
        return f"{self.prefix}.sched.{workflow}.{run_id}.{node}.{attempt}"

    def dlq(self, workflow: str, reason: str) -> str:
        return f"{self.prefix}.dlq.{workflow}.{reason}"

    # consumers (durable names may not contain dots)
    def node_consumer(self, workflow: str, node: str) -> str:
        return f"node_{workflow}_{node}"

    def supervisor_consumer(self, workflow: str) -> str:
        return f"supervisor_{workflow}"

    def trigger_consumer(self, workflow: str) -> str:
        return f"trigger_{workflow}"

    @property
    def router_consumer(self) -> str:
        return "trigger_router"

    # KV keys
    @staticmethod
    def workflow_key(workflow: str) -> str:
        return f"wf.{workflow}"

    @staticmethod
    def run_key(run_id: str) -> str:
        return f"run.{run_id}"

    @staticmethod
    def join_key(run_id: str, node: str) -> str:
        return f"join.{run_id}.{node}"

    @staticmethod
    def unstorable_key(run_id: str) -> str:
        """Which sink's result did not fit in the run's record (written once; ``flowctl retry`` then
        refuses the run: the sink, completed, never runs again, so the run could never complete)."""
        return f"unstorable.{run_id}"

    @staticmethod
    def claim_key(run_id: str, node: str, epoch: int) -> str:
        """Who starts ``node`` first after a run's ``epoch``-th ``flowctl retry`` (see ``_resume.py``)."""
        return f"claim.{run_id}.{node}.{epoch}"

    @staticmethod
    def data_key(run_id: str, key: str) -> str:
        return f"data.{run_id}.{key}"


def parse_event_subject(subject: str) -> tuple[str, str, str, str]:
    """Split ``<prefix>.evt.<workflow>.<run>.<node>.<kind>`` into (workflow, run, node, kind)."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[1] != "evt":
        raise ValueError(f"not an event subject: {subject!r}")
    return parts[2], parts[3], parts[4], parts[5]
