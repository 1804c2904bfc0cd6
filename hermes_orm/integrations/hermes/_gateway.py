"""Hermes Agent's SessionDB, continued: gateways.

Routing entries, handoffs, peers and origins, Telegram topics, cron runs.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.
"""

from __future__ import annotations


class GatewayMethods:
    """SessionDB methods on gateways."""
