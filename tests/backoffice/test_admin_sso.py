"""The back office's single sign-on lists and the operator's "mark verified" action."""

from __future__ import annotations

import pytest
from django.urls import reverse

from accounts.models import AuditLog, SsoConnection, SsoDomain
from tests.backoffice.support import Staff, client_for
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

SECRET = "the-client-secret-nobody-reads-back"


def claimed(org_name: str, domain: str) -> SsoDomain:
    from core import secretbox

    org = OrganizationFactory(name=org_name)
    connection = SsoConnection.objects.create(
        organization=org,
        issuer="https://login.example.com",
        client_id="mantle",
        client_secret_sealed=secretbox.seal(SECRET),
        authorization_endpoint="https://login.example.com/authorize",
        token_endpoint="https://login.example.com/token",
        jwks_uri="https://login.example.com/jwks",
        token_auth_method="client_secret_basic",
        signing_algorithms=["RS256"],
    )
    return SsoDomain.objects.create(connection=connection, domain=domain, verification_token="t")


def run_action(client: object, *ids: str) -> object:
    return client.post(  # type: ignore[attr-defined]
        reverse("admin:accounts_ssodomain_changelist"),
        {"action": "mark_verified", "_selected_action": list(ids)},
        follow=True,
    )


def test_a_superuser_verifies_a_domain_and_it_is_audited(staff: Staff) -> None:
    domain = claimed("Acme", "acme.test")
    answer = run_action(client_for(staff.superuser), domain.id)
    assert answer.status_code == 200  # type: ignore[attr-defined]
    domain.refresh_from_db()
    assert domain.verified and domain.verified_by == "operator"
    entry = AuditLog.objects.get(action="sso.domain_verified")
    assert entry.actor_user == staff.superuser
    assert entry.organization == domain.connection.organization
    assert entry.metadata == {"domain": "acme.test", "method": "operator"}


def test_a_domain_verified_elsewhere_is_refused_with_its_reason(staff: Staff) -> None:
    first = claimed("Acme", "acme.test")
    second = claimed("Copycat", "acme.test")
    client = client_for(staff.superuser)
    run_action(client, first.id)
    answer = run_action(client, second.id)
    assert "already verified for another organization" in answer.content.decode()  # type: ignore[attr-defined]
    second.refresh_from_db()
    assert not second.verified


@pytest.mark.parametrize("who", ["support", "billing_admin"])
def test_other_staff_cannot_verify(staff: Staff, who: str) -> None:
    domain = claimed("Acme", "acme.test")
    run_action(client_for(getattr(staff, who)), domain.id)
    domain.refresh_from_db()
    assert not domain.verified
    assert not AuditLog.objects.filter(action="sso.domain_verified").exists()


def test_the_connection_page_never_shows_the_secret(staff: Staff) -> None:
    domain = claimed("Acme", "acme.test")
    client = client_for(staff.superuser)
    listing = client.get(reverse("admin:accounts_ssoconnection_changelist"))
    detail = client.get(reverse("admin:accounts_ssoconnection_change", args=[domain.connection_id]))
    assert listing.status_code == 200 and detail.status_code == 200
    for page in (listing, detail):
        text = page.content.decode()
        assert SECRET not in text
        assert domain.connection.client_secret_sealed not in text
