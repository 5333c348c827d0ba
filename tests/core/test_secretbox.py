"""Credentials at rest (core/secretbox.py) and their key rotation."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.test import override_settings

from catalog.models import Provider
from core import secretbox


def test_sealed_values_are_not_the_plaintext_and_open_again() -> None:
    sealed = secretbox.seal("sk-upstream-secret")
    assert "sk-upstream-secret" not in sealed
    assert secretbox.unseal(sealed) == "sk-upstream-secret"
    assert secretbox.seal("") == "" and secretbox.unseal("") == ""


def test_a_value_sealed_under_another_key_does_not_open() -> None:
    with override_settings(MANTLE_PROVIDER_SECRET_KEYS=Fernet.generate_key().decode()):
        sealed = secretbox.seal("x")
    with pytest.raises(secretbox.SecretUnreadable) as refused:
        secretbox.unseal(sealed)
    assert "x" not in str(refused.value).replace("key", "")


def test_production_without_keys_refuses_clearly() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with (
        override_settings(MANTLE_PROVIDER_SECRET_KEYS="", MANTLE_ENVIRONMENT="production"),
        pytest.raises(ImproperlyConfigured, match="MANTLE_PROVIDER_SECRET_KEYS"),
    ):
        secretbox.seal("x")


@pytest.mark.django_db
def test_rotation_re_encrypts_every_credential_under_the_new_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(MANTLE_PROVIDER_SECRET_KEYS=old):
        provider = Provider.objects.create(
            name="p",
            kind="openai",
            base_url="https://api.openai.com/v1",
            credential_encrypted=secretbox.seal("sk-live-1"),
        )
    with override_settings(MANTLE_PROVIDER_SECRET_KEYS=f"{new},{old}"):
        call_command("provider_secrets_rotate")
    assert "sk-live-1" not in capsys.readouterr().out
    provider.refresh_from_db()
    with override_settings(MANTLE_PROVIDER_SECRET_KEYS=new):  # the old key dropped
        assert secretbox.unseal(provider.credential_encrypted) == "sk-live-1"
