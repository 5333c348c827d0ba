"""Which secrets each process needs, and the refusal to start on a missing or weak one.

Every process is given only the secrets its role uses (docs/deployment.md): a drain
that parses usage has no business holding the key that seals cached identities, and a
leak of one process's environment then reveals only its own. Outside development and
test, settings refuse to start when a secret the role needs is missing, when any secret
is a known placeholder (`change-me` from a template), or when two of them are the same
value: the pepper must not be (or contain) the Django secret, which signs sessions and
is rotated for other reasons; before, a missing pepper silently became the Django secret.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

ENVIRONMENTS = ("production", "development", "test")
LENIENT_ENVIRONMENTS = ("development", "test")

# The variables' names, not their values.
DJANGO_SECRET_KEY = "DJANGO_SECRET_KEY"  # noqa: S105
API_KEY_PEPPER = "MANTLE_API_KEY_PEPPER"
IDENTITY_KEY = "MANTLE_IDENTITY_KEY"
SECRETS = (DJANGO_SECRET_KEY, API_KEY_PEPPER, IDENTITY_KEY)

# What each role needs (MANTLE_ROLE). The gateway verifies keys (pepper), reads and fills
# the identity cache (identity key) and serves the console (sessions, signed links); the
# control worker writes cached identities through (suspensions) and sends signed links;
# the drain, beat and migrations need none. `all` is one process doing everything
# (bin/run, tests). Inference and compile workers do not load these settings at all.
ROLE_SECRETS: Mapping[str, tuple[str, ...]] = {
    "all": SECRETS,
    "gateway": SECRETS,
    "control": (DJANGO_SECRET_KEY, IDENTITY_KEY),
    "drain": (),
    "beat": (),
    "migrate": (),
    "build": (),  # collectstatic while the image is built
}

_PLACEHOLDERS = frozenset(
    {
        "secret",
        "password",
        "pepper",
        "changeit",
        "default",
        "todo",
        "xxx",
        "none",
        "null",
    }
)
_PLACEHOLDER_PARTS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "replace_me",
    "placeholder",
    "insecure",
)


def is_placeholder(value: str) -> bool:
    """A value copied from a template or example rather than generated."""
    lowered = value.strip().lower()
    if lowered in _PLACEHOLDERS:
        return True
    # Django's startproject prefix and the dev fallback both contain "insecure".
    return any(part in lowered for part in _PLACEHOLDER_PARTS)


def check(*, environment: str, role: str, values: Mapping[str, str]) -> None:
    """Raises ImproperlyConfigured naming the variable unless `values` suit `role`.

    In development and test only presence is checked (settings fill the pepper and the
    identity key from the Django secret there): bin/run generates secrets into var/, and
    the test settings use fixed ones.
    """
    if environment not in ENVIRONMENTS:
        raise ImproperlyConfigured(
            f"MANTLE_ENVIRONMENT={environment!r}: expected one of {', '.join(ENVIRONMENTS)}"
        )
    if role not in ROLE_SECRETS:
        raise ImproperlyConfigured(
            f"MANTLE_ROLE={role!r}: expected one of {', '.join(ROLE_SECRETS)}"
        )
    for name in ROLE_SECRETS[role]:
        if not values.get(name):
            raise ImproperlyConfigured(
                f"{name} (or {name}_FILE) is not set; MANTLE_ROLE={role} needs it "
                "(bin/run generates development secrets in var/)"
            )
    if environment in LENIENT_ENVIRONMENTS:
        return
    given = [(name, values[name]) for name in SECRETS if values.get(name)]
    for name, value in given:
        if is_placeholder(value):
            raise ImproperlyConfigured(
                f"{name} is a placeholder value; set a random secret (e.g. `openssl rand "
                "-base64 48`)"
            )
    for i, (name, value) in enumerate(given):
        for other, other_value in given[i + 1 :]:
            if value in other_value or other_value in value:
                raise ImproperlyConfigured(
                    f"{other} must be a secret of its own, not equal to or derived from {name}"
                )
