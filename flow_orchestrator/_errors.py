"""The error hierarchy: one root, :class:`FlowError`, and typed subclasses that carry retry semantics.

Every error a user meets says what happened, to which workflow/run/node, and what to do next.
"""

from __future__ import annotations


class FlowError(Exception):
    """Root of every error Flow Orchestrator raises."""


# --- definitions ---------------------------------------------------------------------------------
class WorkflowDefinitionError(FlowError, ValueError):
    """A workflow definition is invalid; raised when the workflow is built, never at run time."""


class CycleError(WorkflowDefinitionError):
    """The dependencies form a cycle; ``cycle`` lists it with the first node repeated at the end."""

    def __init__(self, workflow: str, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(
            f"workflow {workflow!r} has a dependency cycle: {' -> '.join(cycle)}; remove one of these edges"
        )


class UnknownDependencyError(WorkflowDefinitionError):
    """A node depends on a node the workflow does not define."""


class DuplicateNodeError(WorkflowDefinitionError):
    """Two nodes share a name."""


class InvalidNameError(WorkflowDefinitionError):
    """A workflow, node or data key name is not safe as a NATS subject token."""


class EmptyWorkflowError(WorkflowDefinitionError):
    """The workflow has no nodes."""


# --- messages ------------------------------------------------------------------------------------
class UnencodableValue(FlowError, TypeError):
    """A value cannot be encoded for the bus (not JSON-like data or a pydantic model)."""


class MessageError(FlowError):
    """A message on the bus cannot be processed; it is dead-lettered, never redelivered forever."""

    reason = "invalid_message"


class MalformedMessage(MessageError, ValueError):
    """The payload cannot be decoded (not msgpack, or not JSON when the header says JSON)."""

    reason = "malformed"


class PayloadTooLarge(MessageError, ValueError):
    """The payload is larger than the configured limit."""

    reason = "oversized"


class InvalidPayload(MessageError, ValueError):
    """The payload decoded but failed the workflow's input model validation."""

    reason = "invalid_payload"


def message_error_for(reason: str, message: str) -> MessageError:
    """The typed error for a dead-letter reason (as recorded in the ``rejected`` event)."""
    kinds: dict[str, type[MessageError]] = {
        cls.reason: cls
        for cls in (MalformedMessage, PayloadTooLarge, InvalidPayload, UnknownWorkflow, InvalidRunId)
    }
    return kinds.get(reason, MessageError)(message)


class UnknownWorkflow(MessageError, LookupError):
    """No worker has registered a workflow of this name."""

    reason = "unknown_workflow"


class InvalidRunId(MessageError, ValueError):
    """A run id is not subject-token safe: a trigger's (its ``Flow-Run-Id`` or ``Nats-Msg-Id``
    header), or one given to a client call."""

    reason = "invalid_run_id"


# --- running -------------------------------------------------------------------------------------
class NodeError(FlowError):
    """Base for errors raised while running a node's action."""


class NonRetryableError(NodeError):
    """Raise from an action to fail the node at once, whatever its retry policy says."""


class RetryAfter(NodeError):
    """Raise from an action to ask for another attempt after ``delay`` seconds (within the policy)."""

    def __init__(self, message: str = "retry requested", *, delay: float) -> None:
        self.delay = delay
        super().__init__(message)


class NodeTimeout(NodeError, TimeoutError):
    """An attempt ran past its node's timeout; the attempt is cancelled and counts as failed."""


class RunFailed(FlowError):
    """A run ended Failed; ``status`` holds the run's final snapshot."""

    def __init__(self, message: str, status: object = None) -> None:
        self.status = status
        super().__init__(message)


class RunCancelled(RunFailed):
    """A run was cancelled before it finished."""


class RunNotFound(FlowError, LookupError):
    """No run has this id (it never started, or its record expired)."""


class PermissionDenied(FlowError, PermissionError):
    """The NATS server refused this connection's user something (see ``deploy/nats/accounts.conf``)."""


# --- state ---------------------------------------------------------------------------------------
class StateConflict(FlowError):
    """A compare-and-set on workflow state lost a race: someone else wrote first."""


class DataKeyNotFound(FlowError, KeyError):
    """A ``WorkflowData`` key has no value in this run."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence.
        return str(self.args[0]) if self.args else "key not found"


class DataTypeError(FlowError, TypeError):
    """A ``WorkflowData`` value does not have the type a typed getter asked for."""


class ActorStopped(FlowError, RuntimeError):
    """Work was pending on an actor that stopped; it is left unacknowledged for redelivery."""
