"""Alerts that reach people: budget thresholds, hard-limit hits, low prepaid balance, failed
payments and finalized invoices, emailed to the billing contacts and POSTed, signed, to the
organization's webhook endpoints (docs/billing.md, "Alerts and webhooks").

`events` creates an event once per dedupe key (the emitting services call it in their own
transaction); `delivery` fans it out after commit on the billing queue; `webhooks` holds the
endpoints and their delivery log; `signing` the signature; `balance` the low-balance check.
"""
