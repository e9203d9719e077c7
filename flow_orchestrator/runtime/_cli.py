"""``flowctl``: run a server or a worker, start and inspect runs, draw a workflow, try the demo.

Exit codes: 0 success (for ``run``: the run completed), 1 the run failed, was cancelled or timed out,
2 usage errors and typed errors (unknown workflow, invalid payload, unknown run). The library never
configures logging; this is the one place that does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors

from flow_orchestrator._errors import FlowError
from flow_orchestrator.bus._connection import DEFAULT_URL
from flow_orchestrator.runtime import _commands as cmd
from flow_orchestrator.runtime import _recovery_commands as recovery
from flow_orchestrator.runtime._status import RunStatus
from flow_orchestrator.runtime._telemetry import RunFieldsFormatter, TraceContextFilter

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
Parser = argparse.ArgumentParser
_loop_factory: LoopFactory | None
try:
    import uvloop

    _loop_factory = uvloop.new_event_loop
except ImportError:  # the optional "fast" extra
    _loop_factory = None


# --- the parser ----------------------------------------------------------------------------------
def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before or after the subcommand (after it, they override)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--nats",
        default=default(None),
        metavar="URL",
        help=f"NATS server URL(s), comma-separated (default: $NATS_URL or {DEFAULT_URL})",
    )
    parser.add_argument("--prefix", default=default(None), help="subject/stream prefix (default: flow)")
    parser.add_argument(
        "--replicas",
        type=cmd.positive_int,
        default=default(None),
        metavar="N",
        help="stream replicas when provisioning (default: $FLOW_REPLICAS or 1)",
    )
    parser.add_argument(
        "--log-level",
        default=default(None),
        metavar="LEVEL",
        help="logging level (default: WARNING, INFO for worker)",
    )


def _add_hosting_commands(command: Callable[..., Parser]) -> None:
    """``server`` and ``worker``: the long-running processes."""
    p = command("server", cmd.server, "run an embedded nats-server with JetStream until Ctrl-C")
    p.add_argument("--port", type=int, default=4222)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--store-dir", default=".flow-data")

    p = command("worker", cmd.worker, "host workflows until SIGINT/SIGTERM, then drain")
    p.add_argument("target", metavar="MODULE:ATTR", help="a Workflow or a list of Workflows")
    p.add_argument(
        "--concurrency", type=cmd.positive_int, default=256, help="messages one actor handles at once"
    )
    p.add_argument(
        "--max-in-flight",
        type=cmd.positive_int,
        default=1024,
        help="node attempts this worker runs at once (back-pressure)",
    )
    p.add_argument(
        "--ack-wait",
        type=cmd.positive_seconds,
        default=30.0,
        help="seconds before a silent worker's work moves on",
    )
    p.add_argument(
        "--max-deliver",
        type=cmd.positive_int,
        default=20,
        help="deliveries before a message is dead-lettered",
    )
    p.add_argument(
        "--announce-starts-after",
        type=cmd.seconds,
        default=0.1,
        metavar="SECONDS",
        help="publish an attempt's started event once it has run this long (0: every attempt)",
    )
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowctl", description="Workflows on NATS JetStream.")
    _common_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], Any], help_text: str) -> Parser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    _add_hosting_commands(command)

    p = command("run", cmd.run, "start a run, wait for it and print its result")
    p.add_argument("workflow")
    p.add_argument("--input", help="the run's input: JSON, or @FILE")
    p.add_argument("--run-id", help="idempotency key: the same id starts one run")
    p.add_argument("--timeout", type=cmd.seconds, help="seconds to wait (default: forever)")
    p.add_argument("--json", action="store_true", help="print one JSON document (the run snapshot)")

    p = command("trigger", cmd.trigger, "start a run without waiting; print its run id")
    p.add_argument("workflow")
    p.add_argument("--input", help="the run's input: JSON, or @FILE")
    p.add_argument("--run-id", help="idempotency key: the same id starts one run")

    p = command("status", cmd.status, "show a run and its nodes")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true")

    p = command("watch", cmd.watch, "follow a run live until it ends (exit 0 if it completed)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--timeout", type=cmd.seconds, help="seconds to wait (default: forever)")

    p = command("show", cmd.show, "show a run's timeline: every node attempt, its duration and outcome")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print the timeline as one JSON document")

    p = command("runs", cmd.runs, "list recent runs, newest first")
    p.add_argument("--workflow")
    p.add_argument("--status", choices=[s.value for s in RunStatus])
    p.add_argument("--limit", type=cmd.positive_int, default=50)
    p.add_argument("--json", action="store_true")

    p = command("cancel", cmd.cancel, "cancel a running run")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--reason", help="recorded as the run's error message")

    recovery.add_commands(command, common)

    p = command("graph", cmd.graph, "print a workflow's DAG (no server needed)")
    p.add_argument("target", metavar="MODULE:ATTR")
    p.add_argument("--format", choices=["text", "mermaid", "both"], default="both")

    command("demo", cmd.demo, "run the order demo: an embedded server (unless --nats), a worker, a live view")
    return parser


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    args.prefix_given = args.prefix is not None
    args.prefix = args.prefix or "flow"
    level = (args.log_level or ("INFO" if args.command == "worker" else "WARNING")).upper()
    if not isinstance(logging.getLevelName(level), int):
        print(
            f"flowctl: error: unknown --log-level {args.log_level!r} (use DEBUG, INFO, WARNING or ERROR)",
            file=sys.stderr,
        )
        return 2
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=log_format)
    for handler in logging.getLogger().handlers:
        # Log lines about a run carry its workflow, run id, node, attempt and trace id.
        handler.addFilter(TraceContextFilter())
        handler.setFormatter(RunFieldsFormatter(log_format))
    try:
        result = args.handler(args)
        return _run_async(result) if asyncio.iscoroutine(result) else int(result)
    except KeyboardInterrupt:
        return 130
    except FlowError as exc:
        print(f"flowctl: error: {exc}", file=sys.stderr)
        return 2
    except nats.errors.NoServersError:
        print(
            f"flowctl: error: cannot reach NATS at {args.nats}; start a server (`flowctl server`) or set "
            "--nats / NATS_URL",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
