"""Helpers the whole suite shares, and the benchmarks too (bench/ imports `tests.support`).

Naming in tests/: `test_*.py` hold tests, `conftest.py` fixtures, `factories.py` factory_boy
factories. Every other module is a helper: shared ones live in this package (`stack`: the
platform as real processes; `browser`: the browser fixtures; `needs`: the markers bin/test
reads; `raw_http`: a socket client that keeps sending a body until the server answers;
`upstream_fake`: a fake OpenAI / Azure OpenAI provider on loopback with faults on command), an
area's own ones sit beside its tests as `support.py`, or `<topic>_support.py` where the area
has several.
"""
