"""The reliability suite: hermes_orm's exactly-once promise, put to the test.

The session row holds the cursor ``flushed_idx``, advanced in the same
transaction as the message inserts. Whatever happens to a writer (a SIGKILL at
any moment, other processes flushing the same sessions, a dropped connection, a
server restart, a full disk) or whatever it is given, the database holds a
prefix of each conversation, no message twice, every acknowledged one, and a
refusal is a typed :class:`hermes_orm.HermesOrmError` that wrote nothing.

    python -m reliability                  # full run; writes docs/reliability.md
    python -m reliability --quick          # small counts, nothing written (CI)
    python -m reliability --only kill,disk # some scenarios, nothing written

Each scenario is a function returning an :class:`~reliability._common.Outcome`:
:func:`reliability.kill.run`, :func:`reliability.contention.run`,
:func:`reliability.connections.run`, :func:`reliability.disk.run` and
:func:`reliability.inputs.run`.
"""
