"""Everything that touches NATS: connection, subjects, codec, streams, KV, interceptor plumbing, server."""

from flow_orchestrator.bus._codec import decode, decode_trigger, encode
from flow_orchestrator.bus._connection import DEFAULT_URL, Bus, connect
from flow_orchestrator.bus._interceptors import Interceptor, InterceptorChain
from flow_orchestrator.bus._kv import StateStore, Versioned
from flow_orchestrator.bus._server import (
    EmbeddedCluster,
    EmbeddedServer,
    ServerError,
    find_server_binary,
    free_port,
)
from flow_orchestrator.bus._streams import StorageSettings, provision
from flow_orchestrator.bus._subjects import Names
from flow_orchestrator.bus.types import ExecuteNodeInput, PublishInput, TriggerInput

__all__ = [
    "DEFAULT_URL",
    "Bus",
    "EmbeddedCluster",
    "EmbeddedServer",
    "ExecuteNodeInput",
    "Interceptor",
    "InterceptorChain",
    "Names",
    "PublishInput",
    "ServerError",
    "StateStore",
    "StorageSettings",
    "TriggerInput",
    "Versioned",
    "connect",
    "decode",
    "decode_trigger",
    "encode",
    "find_server_binary",
    "free_port",
    "provision",
]
