"""Hermes Agent's SessionDB, continued: context compression.

Locks and cooldowns, lineage, titles along a lineage, resuming.
A mixin of :class:`hermes_orm.integrations.hermes.sessiondb.SessionDB`.
"""

from __future__ import annotations


class LineageMethods:
    """SessionDB methods on context compression."""
