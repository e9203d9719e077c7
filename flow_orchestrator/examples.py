"""Sample workflows to try a deployment with.

``order`` is the workflow ``flowctl demo`` runs: validate an order, then reserve stock and charge the
payment in parallel (the payment fails twice, then succeeds on its third attempt: retries, backoff
and their spans show in the live view and in Jaeger), ship, notify. The files in ``deploy/`` run it
by default (``flowctl worker flow_orchestrator.examples:order``); trigger it with ``ORDER_INPUT``::

    flowctl trigger order --input '{"order_id": "o-1", "amount": 42, "items": ["keyboard", "mouse"]}'
"""

from flow_orchestrator.runtime._demo import DEMO_INPUT as ORDER_INPUT
from flow_orchestrator.runtime._demo import OrderIn, order

__all__ = ["ORDER_INPUT", "OrderIn", "order"]
