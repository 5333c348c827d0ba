"""Fixtures of the back-office tests."""

from __future__ import annotations

import pytest

from tests.backoffice.support import Staff, make_staff


@pytest.fixture
def staff(db: None) -> Staff:
    return make_staff()
