"""``NodeContext``: what an action sees of its run: ids, attempt, input, upstream outputs, data, logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flow_orchestrator._errors import FlowError
from flow_orchestrator.runtime._data import WorkflowData

_log = logging.getLogger("flow_orchestrator.node")


class NodeContext:
    """Passed to every action. ``attempt`` is 1-based; ``idempotency_key`` is stable per attempt so
    actions can hand it to external systems (payment APIs, emails) and make their effects exactly-once.
    """

    __slots__ = (
        "_input",
        "_input_model",
        "_raw_input",
        "attempt",
        "data",
        "log",
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
        data: WorkflowData,
    ) -> None:
        self.workflow = workflow
        self.run_id = run_id
        self.node = node
        self.attempt = attempt
        self._raw_input = raw_input
        self._input_model = input_model
        self._input: Any = _UNSET if input_model is not None else raw_input
        self.outputs = outputs
        self.data = data
        self.log = logging.LoggerAdapter(
            _log, {"workflow": workflow, "run_id": run_id, "node": node, "attempt": attempt}
        )

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
