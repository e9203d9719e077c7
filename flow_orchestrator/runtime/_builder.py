"""The fluent builder, for people coming from the Go library; it yields the same :class:`Workflow`."""

from __future__ import annotations

from typing import Any

from flow_orchestrator._errors import WorkflowDefinitionError
from flow_orchestrator.runtime._retry import RetryPolicy
from flow_orchestrator.runtime._workflow import Workflow, make_node


class WorkflowBuilder:
    """``WorkflowBuilder("order").add_node("a", fa).add_node("b", fb).depends_on("a").build()``."""

    def __init__(self, name: str, *, input_model: type[Any] | None = None) -> None:
        self._name = name
        self._input_model = input_model
        self._nodes: list[dict[str, Any]] = []

    def add_node(
        self,
        name: str,
        action: Any,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        continue_on_error: bool = False,
        output_model: type[Any] | None = None,
    ) -> WorkflowBuilder:
        self._nodes.append(
            {
                "name": name,
                "action": action,
                "depends_on": [],
                "retry": retry,
                "timeout": timeout,
                "continue_on_error": continue_on_error,
                "output_model": output_model,
            }
        )
        return self

    def _last(self, method: str) -> dict[str, Any]:
        if not self._nodes:
            raise WorkflowDefinitionError(f"{method}() applies to the last added node; call add_node() first")
        return self._nodes[-1]

    def depends_on(self, *names: str) -> WorkflowBuilder:
        self._last("depends_on")["depends_on"].extend(names)
        return self

    def with_retry(self, policy: RetryPolicy) -> WorkflowBuilder:
        self._last("with_retry")["retry"] = policy
        return self

    def with_timeout(self, seconds: float) -> WorkflowBuilder:
        self._last("with_timeout")["timeout"] = seconds
        return self

    def continue_on_error(self) -> WorkflowBuilder:
        self._last("continue_on_error")["continue_on_error"] = True
        return self

    def build(self) -> Workflow:
        """Validate and return the workflow (raises the definition error that names the problem)."""
        workflow = Workflow(self._name, input_model=self._input_model)
        for node in self._nodes:
            options = dict(node)
            workflow.add(make_node(options.pop("name"), options.pop("action"), **options))
        _ = workflow.definition
        return workflow
