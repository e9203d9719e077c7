"""The actors: one per workflow node, a supervisor and a trigger actor per workflow, and their base."""

from flow_orchestrator.actors._actor import Actor, ConsumerSpec
from flow_orchestrator.actors._node import NodeActor
from flow_orchestrator.actors._supervisor import SupervisorActor
from flow_orchestrator.actors._system import ActorSystem, RunGate
from flow_orchestrator.actors._trigger import TriggerActor, TriggerRouter

__all__ = [
    "Actor",
    "ActorSystem",
    "ConsumerSpec",
    "NodeActor",
    "RunGate",
    "SupervisorActor",
    "TriggerActor",
    "TriggerRouter",
]
