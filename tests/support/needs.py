"""The markers bin/test reads to set up only what the selected tests need.

Beyond PostgreSQL and Redis, three things are slow to set up on a fresh machine, and
`bin/test tests/some_file.py` sets each up only when a selected test module carries its
marker (bin/_needs.sh); `bin/test` with no arguments sets up all three:

- `browser`: Debian's Chromium, for the Playwright journeys;
- `rabbitmq`: a RabbitMQ server, the second broker the suite checks;
- `models`: the built-in model artifacts (bin/prepare-models) and the prepare environment
  the compile tests export checkpoints in.

bin/test finds a marker by reading the selected files, so it is written in the test module
itself (`pytestmark` or a decorator), never only in a conftest. This plugin (loaded by
tests/conftest.py) keeps the markers true: a test that uses a fixture bringing a need
must carry its marker (checked at collection), and so must a test that asks for the
built-in models (checked when it does, through `require`).
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

# Fixtures that bring a need: the tests that use them (directly or through another fixture)
# carry its marker.
FIXTURE_NEEDS = {"browser": "browser", "live": "models", "faulty": "models"}

_running: list[pytest.Item] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} uses the `{fixture}` fixture: mark it pytest.mark.{need}"
        for item in items
        for fixture, need in FIXTURE_NEEDS.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(need) is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests need a marker bin/test reads (tests/support/needs.py):\n  "
            + "\n  ".join(unmarked)
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def require(need: str) -> None:
    """Fails the running test unless it carries the marker of `need`."""
    if _running and _running[-1].get_closest_marker(need) is None:
        pytest.fail(
            f"{_running[-1].nodeid} needs {need}: mark it pytest.mark.{need} (bin/test sets "
            f"{need} up only for selected tests that carry the marker)",
            pytrace=False,
        )
