"""Secrets stored in the database, encrypted: upstream providers' credentials.

Fernet (the `cryptography` package: AES-128-CBC with an HMAC-SHA256, authenticated and
timestamped) under MANTLE_PROVIDER_SECRET_KEYS, a comma-separated list of Fernet keys
(`Fernet.generate_key()`), from the environment or a secret file (`..._FILE`). The first
key encrypts; every key decrypts, so a key is rotated by putting the new one first,
re-encrypting (`manage.py provider_secrets_rotate`), then dropping the old one. In
development and test, with no keys set, one is derived from the Django secret.

Nothing here logs a value; a value that does not decrypt is an error naming no content.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SecretUnreadable(Exception):
    """A stored secret that none of the configured keys decrypts."""


def _keys() -> list[bytes]:
    configured = [k.strip() for k in (settings.MANTLE_PROVIDER_SECRET_KEYS or "").split(",")]
    keys = [k.encode() for k in configured if k]
    if keys:
        return keys
    if settings.MANTLE_ENVIRONMENT in ("development", "test") and settings.SECRET_KEY:
        digest = hashlib.sha256(b"mantle-provider-secrets:" + settings.SECRET_KEY.encode())
        return [base64.urlsafe_b64encode(digest.digest())]
    raise ImproperlyConfigured(
        "MANTLE_PROVIDER_SECRET_KEYS (or MANTLE_PROVIDER_SECRET_KEYS_FILE) is not set: "
        "provider credentials cannot be stored or read. Generate one with "
        "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())'`."
    )


def _box() -> MultiFernet:
    try:
        return MultiFernet([Fernet(k) for k in _keys()])
    except ValueError as exc:  # a key that is not 32 url-safe base64-encoded bytes
        raise ImproperlyConfigured(
            "MANTLE_PROVIDER_SECRET_KEYS holds a value that is not a Fernet key"
        ) from exc


def seal(plaintext: str) -> str:
    """`plaintext` encrypted under the first key ('' stays '')."""
    if not plaintext:
        return ""
    return _box().encrypt(plaintext.encode()).decode("ascii")


def unseal(sealed: str) -> str:
    """A value `seal` made, decrypted with whichever configured key made it."""
    if not sealed:
        return ""
    try:
        return _box().decrypt(sealed.encode("ascii")).decode()
    except (InvalidToken, UnicodeError) as exc:
        raise SecretUnreadable(
            "a stored credential does not decrypt with any configured key"
        ) from exc


def reseal(sealed: str) -> str:
    """A sealed value encrypted again under the first key (key rotation)."""
    if not sealed:
        return ""
    try:
        return _box().rotate(sealed.encode("ascii")).decode("ascii")
    except InvalidToken as exc:
        raise SecretUnreadable(
            "a stored credential does not decrypt with any configured key"
        ) from exc
