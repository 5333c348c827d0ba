"""Production settings refuse missing, placeholder and shared secrets; each role needs its own.

Settings are read once per process, so the refusals are shown by starting Django in a
fresh interpreter with the environment a deployment would give it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from core import secret_checks
from tests.support.stack import ROOT

SECRET = "s3cr3t-" + "a" * 40
PEPPER = "p3pp3r-" + "b" * 40
IDENTITY = "id3nt1ty-" + "c" * 40
GOOD = {
    "DJANGO_SECRET_KEY": SECRET,
    "MANTLE_API_KEY_PEPPER": PEPPER,
    "MANTLE_IDENTITY_KEY": IDENTITY,
}


def start_django(env: Mapping[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Django set up under config.settings.base with only `env` (and what Python needs)."""
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
            "DJANGO_SETTINGS_MODULE": "config.settings.base",
            "MANTLE_VAR_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # The pepper used to fall back to the Django secret without a word.
        ({"DJANGO_SECRET_KEY": SECRET, "MANTLE_IDENTITY_KEY": IDENTITY}, "MANTLE_API_KEY_PEPPER"),
        # The template's placeholder.
        ({**GOOD, "DJANGO_SECRET_KEY": "change-me"}, "DJANGO_SECRET_KEY"),
        # The pepper set to the Django secret, or derived from it.
        ({**GOOD, "MANTLE_API_KEY_PEPPER": SECRET}, "MANTLE_API_KEY_PEPPER"),
        # The fake Stripe: its public Checkout page credits top-ups nobody paid for.
        ({**GOOD, "MANTLE_STRIPE_BACKEND": "fake"}, "MANTLE_STRIPE_BACKEND"),
    ],
    ids=["pepper-missing", "placeholder", "pepper-is-secret", "fake-stripe"],
)
def test_production_settings_refuse_to_start(
    env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = start_django(env, tmp_path)
    assert done.returncode != 0
    assert "started" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured: "), done.stderr
    assert named in last


def test_production_settings_start_with_distinct_random_secrets(tmp_path: Path) -> None:
    done = start_django(GOOD, tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "started"), done.stderr


def test_the_fake_stripe_starts_in_development(tmp_path: Path) -> None:
    env = {**GOOD, "MANTLE_STRIPE_BACKEND": "fake", "MANTLE_ENVIRONMENT": "development"}
    done = start_django(env, tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "started"), done.stderr


def test_a_drain_starts_with_no_secret_at_all(tmp_path: Path) -> None:
    done = start_django({"MANTLE_ROLE": "drain"}, tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "started"), done.stderr


def test_development_falls_back_as_before(tmp_path: Path) -> None:
    done = start_django({"MANTLE_ENVIRONMENT": "development", "DJANGO_DEBUG": "1"}, tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "started"), done.stderr


# --- the rules, case by case ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "values", "named"),
    [
        ("gateway", {**GOOD, "MANTLE_IDENTITY_KEY": ""}, "MANTLE_IDENTITY_KEY"),
        ("control", {**GOOD, "DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY"),
        ("drain", {"MANTLE_API_KEY_PEPPER": "CHANGE-ME-please"}, "MANTLE_API_KEY_PEPPER"),
        ("all", {**GOOD, "DJANGO_SECRET_KEY": "django-insecure-abc"}, "DJANGO_SECRET_KEY"),
        ("all", {**GOOD, "MANTLE_API_KEY_PEPPER": SECRET + "x"}, "MANTLE_API_KEY_PEPPER"),
        ("all", {**GOOD, "MANTLE_IDENTITY_KEY": PEPPER}, "MANTLE_IDENTITY_KEY"),
    ],
)
def test_each_rule_names_the_variable(role: str, values: dict[str, str], named: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=named):
        secret_checks.check(environment="production", role=role, values=values)


@pytest.mark.parametrize("role", ["control", "drain", "beat", "migrate"])
def test_roles_need_only_their_own_secrets(role: str) -> None:
    needed = secret_checks.ROLE_SECRETS[role]
    secret_checks.check(
        environment="production", role=role, values={n: v for n, v in GOOD.items() if n in needed}
    )
    assert "MANTLE_API_KEY_PEPPER" not in needed


@pytest.mark.parametrize(
    ("environment", "role", "named"),
    [("staging", "all", "MANTLE_ENVIRONMENT"), ("production", "worker", "MANTLE_ROLE")],
)
def test_unknown_environments_and_roles_are_refused(
    environment: str, role: str, named: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=named):
        secret_checks.check(environment=environment, role=role, values=GOOD)
