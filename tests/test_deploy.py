"""The files in deploy/ and the commands the docs give for them: the worker target they run exists,
and every documented `flowctl trigger order` input is one that workflow accepts. (The compose stack
itself needs Docker, which CI lacks; these are the parts of it that can break silently.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flow_orchestrator.runtime._commands import load_workflows

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

# Where each deploy file names the worker's default target.
TARGETS = {
    "Dockerfile": r"(?m)^\s*FLOW_TARGET=(\S+)$",
    "compose.yaml": r"FLOW_TARGET:-([^}]+)\}",
    "k8s/worker.yaml": r"name: FLOW_TARGET\s+value: (\S+)",
    "README.md": r"default `([^`]+)`",
}
# Docs that trigger the deployed `order` workflow (the README's own `order` example is another one).
TRIGGER_DOCS = ["deploy/README.md", "deploy/k8s/README.md", "docs/observability.md"]


def _deploy_target() -> str:
    found = {}
    for name, pattern in TARGETS.items():
        match = re.search(pattern, (DEPLOY / name).read_text(encoding="utf-8"))
        assert match, f"deploy/{name} names no FLOW_TARGET"
        found[name] = match.group(1)
    assert len(set(found.values())) == 1, f"deploy files disagree on the worker target: {found}"
    return next(iter(found.values()))


def test_the_deploy_files_run_a_workflow_that_exists() -> None:
    (workflow,) = load_workflows(_deploy_target())
    assert workflow.name == "order"


@pytest.mark.parametrize("doc", TRIGGER_DOCS)
def test_documented_trigger_inputs_are_accepted_by_the_deployed_workflow(doc: str) -> None:
    (workflow,) = load_workflows(_deploy_target())
    model = workflow.definition.input_model
    assert model is not None
    inputs = re.findall(r"trigger order --input '([^']+)'", (ROOT / doc).read_text(encoding="utf-8"))
    assert inputs, f"{doc} has no `flowctl trigger order --input` example"
    for text in inputs:
        model.model_validate(json.loads(text))  # raises, naming the field, if the run would be rejected
