"""A workflow built from a JSON spec in ``FLOW_TEST_DAG`` (so worker subprocesses can host a DAG a
property test generated). Spec: ``{"nodes": {name: {"deps": [...], "mode": ..., "coe": bool}}}``.

Each node returns the sum of its upstream outputs plus its own weight, so outputs depend on every
path. Modes: ``ok``; ``flaky`` (first attempt fails, retried); ``fatal`` (always fails, no retry).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flow_orchestrator import NodeContext, NonRetryableError, RetryPolicy, Workflow


def build(spec: dict[str, Any]) -> Workflow:
    wf = Workflow("randomdag")
    for index, (name, node) in enumerate(spec["nodes"].items()):
        wf.node(
            name,
            depends_on=node["deps"],
            retry=RetryPolicy(max_attempts=3, initial=0.05, jitter=0.0),
            continue_on_error=node["coe"],
        )(_action(index + 1, node["mode"], node["deps"]))
    return wf


def _action(weight: int, mode: str, deps: list[str]) -> Any:
    async def action(ctx: NodeContext) -> int:
        if mode == "fatal":
            raise NonRetryableError("this node always fails")
        if mode == "flaky" and ctx.attempt == 1:
            raise ConnectionError("first attempt fails")
        return weight + sum(ctx.output(dep) or 0 for dep in deps)

    return action


wf = build(json.loads(os.environ["FLOW_TEST_DAG"])) if "FLOW_TEST_DAG" in os.environ else None
