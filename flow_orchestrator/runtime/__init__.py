"""Workflow definitions, the DAG and status rules, WorkflowData, the client, the worker and the CLI."""

from flow_orchestrator.runtime._builder import WorkflowBuilder
from flow_orchestrator.runtime._client import Client, NodeSnapshot, RunHandle, RunSnapshot
from flow_orchestrator.runtime._context import NodeContext
from flow_orchestrator.runtime._data import KVWorkflowStore, WorkflowData
from flow_orchestrator.runtime._events import RunEvent
from flow_orchestrator.runtime._interceptors import (
    LoggingInterceptor,
    PayloadValidationInterceptor,
    RetryInterceptor,
    TimeoutInterceptor,
)
from flow_orchestrator.runtime._metrics import MetricsInterceptor
from flow_orchestrator.runtime._retry import RetryPolicy
from flow_orchestrator.runtime._status import NodeStatus, RunStatus
from flow_orchestrator.runtime._telemetry import Telemetry, configure_telemetry
from flow_orchestrator.runtime._tracing import TracingInterceptor
from flow_orchestrator.runtime._worker import Worker
from flow_orchestrator.runtime._workflow import NodeSpec, Workflow, WorkflowDefinition
from flow_orchestrator.runtime.types import Action, ActionObject, WorkflowStore

__all__ = [
    "Action",
    "ActionObject",
    "Client",
    "KVWorkflowStore",
    "LoggingInterceptor",
    "MetricsInterceptor",
    "NodeContext",
    "NodeSnapshot",
    "NodeSpec",
    "NodeStatus",
    "PayloadValidationInterceptor",
    "RetryInterceptor",
    "RetryPolicy",
    "RunEvent",
    "RunHandle",
    "RunSnapshot",
    "RunStatus",
    "Telemetry",
    "TimeoutInterceptor",
    "TracingInterceptor",
    "Worker",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowData",
    "WorkflowDefinition",
    "WorkflowStore",
    "configure_telemetry",
]
