"""``NodeContext``: what an action sees of its run: ids, attempt, input, upstream outputs, data, logger."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flow_orchestrator._errors import FlowError
from flow_orchestrator.runtime._data import WorkflowData

_log = logging.getLogger("flow_orchestrator.node")


class NodeContext:
    """Passed to every action. ``attempt`` is 1-based; ``idempotency_key`` is stable per attempt so
    actions can hand it to external systems (payment APIs, emails) and make their effects exactly-once.
    """

    # ``data`` and ``log`` are made on first use: a worker holding 10,000 runs in their actions
    # would otherwise hold 10,000 of each that most actions never touch.
    __slots__ = (
        "_data",
        "_input",
        "_input_model",
        "_log",
        "_raw_input",
        "attempt",
        "node",
        "outputs",
        "run_id",
        "workflow",
    )

    def __init__(
        self,
        *,
        workflow: str,
        run_id: str,
        node: str,
        attempt: int,
        raw_input: Any,
        input_model: type[Any] | None,
        outputs: Mapping[str, Any],
        data: WorkflowData | Callable[[], WorkflowData],
    ) -> None:
        self.workflow = workflow
        self.run_id = run_id
        self.node = node
        self.attempt = attempt
        self._raw_input = raw_input
        self._input_model = input_model
        self._input: Any = _UNSET if input_model is not None else raw_input
        self.outputs = outputs
        self._data = data
        self._log: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def data(self) -> WorkflowData:
        """The run's shared data (``WorkflowData``, in the KV bucket)."""
        if not isinstance(self._data, WorkflowData):
            self._data = self._data()
        return self._data

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the run's workflow, run id, node and attempt."""
        if self._log is None:
            fields = {"workflow": self.workflow, "run_id": self.run_id, "node": self.node}
            self._log = logging.LoggerAdapter(_log, {**fields, "attempt": self.attempt})
        return self._log

    @property
    def input(self) -> Any:
        """The run's input, validated by the workflow's ``input_model`` when it has one."""
        if self._input is _UNSET:
            self._input = self._input_model.model_validate(self._raw_input)  # type: ignore[union-attr]
        return self._input

    @property
    def idempotency_key(self) -> str:
        """``<run>:<node>:<attempt>``: the same for a redelivered attempt, new for a retry."""
        return f"{self.run_id}:{self.node}:{self.attempt}"

    def output(self, node: str) -> Any:
        """The output of a direct upstream node."""
        try:
            return self.outputs[node]
        except KeyError:
            raise FlowError(
                f"node {self.node!r} of run {self.run_id!r} has no upstream {node!r} "
                f"(direct upstreams: {', '.join(self.outputs) or 'none'}); add it to depends_on"
            ) from None

    def __repr__(self) -> str:
        return (
            f"NodeContext(workflow={self.workflow!r}, run_id={self.run_id!r}, node={self.node!r}, "
            f"attempt={self.attempt})"
        )


_UNSET: Any = object()
