"""``flowctl retry`` and ``flowctl dlq``: the commands an operator reaches for after something failed."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable

from rich.table import Table

from flow_orchestrator.runtime._commands import connect_client, positive_int
from flow_orchestrator.runtime._view import make_console


async def retry(args: argparse.Namespace) -> int:
    """Re-run a failed run from its failed nodes; completed nodes and the run's data are kept."""
    async with await connect_client(args) as client:
        handle = await client.handle_for(args.run_id)
        nodes = await handle.retry()
        print(
            f"run {args.run_id} ({handle.workflow}) resumed: new attempts for {', '.join(nodes) or 'no node'}"
        )
        if not args.wait:
            return 0
        await handle.wait()
        snapshot = await handle.status()
    print(f"run {args.run_id} {snapshot.status.value}")
    return 0 if snapshot.status.value == "completed" else 1


async def dlq_list(args: argparse.Namespace) -> int:
    async with await connect_client(args) as client:
        letters = await client.dead_letters(args.workflow)
    if args.json:
        print(json.dumps([letter.to_json() for letter in letters], indent=2))
        return 0
    table = Table(title=f"{len(letters)} dead letter(s)")
    for column in ("id", "at", "workflow", "reason", "subject", "error"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        at = dt.datetime.fromtimestamp(letter.at).strftime("%Y-%m-%d %H:%M:%S") if letter.at else ""
        table.add_row(str(letter.id), at, letter.workflow, letter.reason, letter.subject, letter.error)
    make_console().print(table)
    return 0


async def dlq_replay(args: argparse.Namespace) -> int:
    async with await connect_client(args) as client:
        run_id = await client.replay_dead_letter(args.id)
    print(f"dead letter {args.id} published again; run {run_id}", file=sys.stdout)
    return 0


def add_commands(command: Callable[..., argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Register ``retry`` and ``dlq`` on the CLI's parser (``command`` adds one subcommand)."""
    p = command("retry", retry, "re-run a failed run from its failed nodes, keeping the rest")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--wait", action="store_true", help="wait for the run; exit 0 iff it completes")

    p = command("dlq", dlq_list, "dead letters: `dlq list` (default) or `dlq replay ID`")
    p.add_argument("--workflow")
    p.add_argument("--json", action="store_true")
    actions = p.add_subparsers(dest="dlq_command", metavar="ACTION")
    q = actions.add_parser("list", parents=[common], help="list dead letters")
    q.set_defaults(handler=dlq_list)
    q.add_argument("--workflow")
    q.add_argument("--json", action="store_true")
    q = actions.add_parser("replay", parents=[common], help="publish a dead-lettered trigger again")
    q.set_defaults(handler=dlq_replay)
    q.add_argument("id", type=positive_int, metavar="ID")
