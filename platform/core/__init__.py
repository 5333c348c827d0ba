"""The base every app builds on: errors, ids, Redis, logs, metrics, integrity seals,
middleware and the operations endpoints. It imports no app; config/ is the wiring that
imports every app."""
