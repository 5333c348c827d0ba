"""Metering: the usage stream into raw events and hourly rollups, exactly once.

One module per step of docs/billing.md's "Exactly once, step by step": stream (read,
claim, acknowledge, trim), parse (entries into rows or dead letters), store (one
transaction: events, rollups, spend outbox), outbox (after the commit: spend in Redis,
the `on_counted` hooks), and drain, the loop that runs them. Beside them: partitions
(monthly partitions and retention), lag (the lag history the back office charts) and
tasks (their Celery tasks).
"""
