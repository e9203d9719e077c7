"""``python -m flow_orchestrator``: the ``flowctl`` command line, for when the script is not on PATH."""

from flow_orchestrator.runtime._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
