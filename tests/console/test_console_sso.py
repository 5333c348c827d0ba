"""Single sign-on through the console against the local OpenID provider (a real HTTP server
on loopback): the sign-in with just-in-time membership, every refusal signing nobody in,
"SSO required", the settings page (the secret never rendered), domains and their owners."""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.test import Client

from accounts import sso, two_factor
from accounts.models import AuditLog, Membership, Organization, SsoConnection, SsoDomain, User
from accounts.permissions import Role
from accounts.principal import Principal
from core.errors import Conflict
from tests.console.support import logged_in, org_url
from tests.factories import OrganizationFactory, UserFactory, add_member
from tests.support.dns_server import LocalDnsServer
from tests.support.oidc_provider import LocalOidcProvider

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"  # tests.factories.UserFactory's
DOMAIN = "acme.test"


@pytest.fixture
def idp(settings: Any) -> Iterator[LocalOidcProvider]:
    with LocalOidcProvider() as provider:
        for name, value in provider.settings().items():
            setattr(settings, name, value)
        yield provider


def staff() -> Principal:
    return Principal(user=UserFactory(is_staff=True), ip_address="10.0.0.9")


def connect(
    org: Organization,
    idp: LocalOidcProvider,
    *,
    domains: tuple[str, ...] = (DOMAIN,),
    verify: bool = True,
    **options: Any,
) -> SsoConnection:
    """The owner configures the connection; an operator verifies its domains."""
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    principal = Principal(user=owner, ip_address="10.0.0.1")
    connection = sso.sso_connection_save(
        principal=principal,
        org=org,
        issuer=idp.issuer,
        client_id=idp.client_id,
        client_secret=idp.client_secret,
        default_role=options.pop("default_role", Role.DEVELOPER),
        enabled=options.pop("enabled", True),
        **options,
    )
    for name in domains:
        added = sso.sso_domain_add(principal=principal, org=org, domain=name)
        if verify:
            sso.sso_domain_mark_verified(principal=staff(), domain=added)
    return connection


def start(client: Client, email: str, **extra: str) -> Any:
    return client.post("/console/login/sso/", {"sso-email": email, **extra})


def provider_url(started: Any) -> str:
    """Where the start page sends the browser on (its refresh and its link)."""
    assert started.status_code == 200, started.content.decode()[:500]
    assert "no-store" in started["Cache-Control"]
    url = str(started.context["url"])
    assert f'content="0;url={url.replace("&", "&amp;")}"' in started.content.decode()
    return url


def through_idp(client: Client, email: str) -> str:
    """Starts a sign-in and lets the provider answer: the callback URL (path and query)."""
    answer = httpx.get(provider_url(start(client, email)), follow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    back = urlsplit(answer.headers["location"])
    return f"{back.path}?{back.query}"


def sign_in(client: Client, idp: LocalOidcProvider, email: str) -> Any:
    idp.auto_approve = email
    return client.get(through_idp(client, email))


def signed_in_user(client: Client) -> User | None:
    response = client.get("/console/account/")
    return response.context["user"] if response.status_code == 200 else None


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(name="Acme", owner=UserFactory(email=f"owner@{DOMAIN}"))


def test_a_new_person_joins_with_the_default_role_and_lands_in_the_organization(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    idp.add_user(f"new.person@{DOMAIN}", name="New Person")
    client = Client()
    done = sign_in(client, idp, f"new.person@{DOMAIN}")
    assert done.status_code == 302, done.content.decode()[:800]
    assert done["Location"] == org_url("console-quickstart", org.id)
    user = User.objects.get(email=f"new.person@{DOMAIN}")
    assert user.email_verified and not user.has_usable_password()
    assert user.full_name == "New Person"
    assert Membership.objects.get(organization=org, user=user).role == Role.DEVELOPER
    assert signed_in_user(client) == user
    assert client.get(done["Location"]).status_code == 200
    actions = list(
        AuditLog.objects.filter(organization=org, actor_user=user)
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["member.joined", "user.sso_signed_in"]
    # The token request carried the PKCE verifier and the client's credentials.
    sent = idp.token_requests[-1]
    assert sent["authorization"] and sent["form"]["code_verifier"]


def test_an_existing_member_keeps_their_role(idp: LocalOidcProvider, org: Organization) -> None:
    connect(org, idp)
    member = add_member(org, Role.ADMIN, UserFactory(email=f"boss@{DOMAIN}"))
    idp.add_user(member.email)
    client = Client()
    assert sign_in(client, idp, member.email).status_code == 302
    assert signed_in_user(client) == member
    assert Membership.objects.get(organization=org, user=member).role == Role.ADMIN
    assert not AuditLog.objects.filter(action="member.joined", actor_user=member).exists()


def test_without_just_in_time_membership_only_members_sign_in(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp, jit_enabled=False)
    idp.add_user(f"stranger@{DOMAIN}")
    client = Client()
    refused = sign_in(client, idp, f"stranger@{DOMAIN}")
    assert refused.status_code == 403
    assert (
        "is not a member of Acme: ask one of its admins to invite you" in refused.content.decode()
    )
    assert not User.objects.filter(email=f"stranger@{DOMAIN}").exists()
    assert signed_in_user(client) is None


@pytest.mark.parametrize(
    ("misbehaviour", "message"),
    [
        ({"sign_with_other_key": True}, "signature does not verify"),
        ({"claim_overrides": {"aud": "another-client"}}, "is for another client (aud)"),
        ({"claim_overrides": {"iss": "https://evil.example.com"}}, "from another issuer (iss)"),
        ({"claim_overrides": {"exp": 1_000_000_000}}, "the ID token has expired"),
        ({"claim_overrides": {"nonce": "from-another-sign-in"}}, "nonce is not the one"),
        ({"claim_overrides": {"email_verified": False}}, "has not verified new@acme.test"),
        ({"claim_overrides": {"email_verified": "true"}}, "has not verified new@acme.test"),
    ],
    ids=["bad-signature", "wrong-aud", "wrong-iss", "expired", "nonce", "unverified", "string"],
)
def test_a_bad_id_token_signs_nobody_in(
    idp: LocalOidcProvider, org: Organization, misbehaviour: dict[str, Any], message: str
) -> None:
    connect(org, idp)
    idp.add_user(f"new@{DOMAIN}")
    for name, value in misbehaviour.items():
        setattr(idp, name, value)
    client = Client()
    refused = sign_in(client, idp, f"new@{DOMAIN}")
    assert refused.status_code == 400
    assert message in refused.content.decode()
    assert not User.objects.filter(email=f"new@{DOMAIN}").exists()
    assert signed_in_user(client) is None
    assert not AuditLog.objects.filter(action="user.sso_signed_in").exists()


def test_a_provider_cannot_sign_in_addresses_of_a_domain_it_does_not_own(
    idp: LocalOidcProvider, org: Organization
) -> None:
    """The attacker's organization runs its own provider, which vouches for the victim's
    address: its connection's verified domains do not hold it, so nobody is signed in."""
    victim_org = OrganizationFactory(name="Victim", owner=UserFactory(email="ceo@victim.test"))
    connect(org, idp)
    idp.add_user("ceo@victim.test")
    client = Client()
    # The sign-in starts for an address of the attacker's domain; the provider answers
    # with the victim's.
    idp.auto_approve = "ceo@victim.test"
    refused = client.get(through_idp(client, f"anyone@{DOMAIN}"))
    assert refused.status_code == 400
    assert "victim.test is not a verified domain of Acme" in refused.content.decode()
    assert signed_in_user(client) is None
    assert not Membership.objects.filter(organization=org, user__email="ceo@victim.test").exists()
    assert Membership.objects.filter(organization=victim_org).count() == 1


@pytest.mark.parametrize(
    "answered",
    [
        f"ceo@victim.test@{DOMAIN}",
        f"ceo@victim.test,someone@{DOMAIN}",
        f"ceo@victim.test someone@{DOMAIN}",
        f"ceo@victim.test\nsomeone@{DOMAIN}",
        f"<ceo@victim.test>@{DOMAIN}",
    ],
    ids=["two-ats", "comma-list", "space", "newline", "angle-brackets"],
)
def test_an_address_that_only_ends_in_a_verified_domain_signs_nobody_in(
    idp: LocalOidcProvider, org: Organization, answered: str
) -> None:
    """The provider answers with text whose last '@' is followed by the organization's
    domain but which is no mailbox of it (it names another address first): refused as an
    invalid address, no account made for it."""
    connect(org, idp)
    idp.add_user(answered)
    client = Client()
    idp.auto_approve = answered
    refused = client.get(through_idp(client, f"anyone@{DOMAIN}"))
    assert refused.status_code == 400, refused.content.decode()[:800]
    assert "not a valid email address" in refused.content.decode()
    assert signed_in_user(client) is None
    assert not User.objects.filter(email__icontains="victim.test").exists()
    assert Membership.objects.filter(organization=org).count() == 1


@pytest.mark.parametrize(
    "answered",
    [
        f"ceo@{DOMAIN}.",
        f"ceo@sub.{DOMAIN}",
        f"ceo@{DOMAIN}.evil.test",
        "ceo@\u0430cme.test",  # a Cyrillic a (U+0430)
        f"ceo@xn--{DOMAIN}",
    ],
    ids=["trailing-dot", "subdomain", "suffix", "homoglyph", "xn-prefix"],
)
def test_only_the_verified_domain_itself_signs_in(
    idp: LocalOidcProvider, org: Organization, answered: str
) -> None:
    connect(org, idp)
    idp.add_user(answered)
    client = Client()
    idp.auto_approve = answered
    refused = client.get(through_idp(client, f"anyone@{DOMAIN}"))
    assert refused.status_code == 400, refused.content.decode()[:800]
    assert signed_in_user(client) is None
    assert Membership.objects.filter(organization=org).count() == 1
    assert not User.objects.filter(email__istartswith="ceo@").exists()


def test_a_domain_verified_by_one_organization_cannot_be_verified_by_another(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    other = OrganizationFactory(name="Copycat")
    connect(other, idp, domains=())
    owner = Membership.objects.get(organization=other, role=Role.OWNER).user
    claimed = sso.sso_domain_add(
        principal=Principal(user=owner, ip_address=None), org=other, domain=DOMAIN.upper()
    )
    assert claimed.domain == DOMAIN
    with pytest.raises(Conflict, match="already verified for another organization"):
        sso.sso_domain_mark_verified(principal=staff(), domain=claimed)
    assert not SsoDomain.objects.get(pk=claimed.pk).verified
    assert sso.connection_for_email(f"x@{DOMAIN}").organization == org  # type: ignore[union-attr]


def test_an_unverified_domain_or_a_disabled_connection_offers_no_single_sign_on(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp, verify=False)
    answer = start(Client(), f"someone@{DOMAIN}")
    assert answer.status_code == 400
    assert "No organization signs in this address" in answer.content.decode()
    SsoDomain.objects.update(verified_at="2026-01-01T00:00:00Z", verified_by="operator")
    assert start(Client(), f"someone@{DOMAIN}").status_code == 200
    SsoConnection.objects.update(enabled=False)
    assert start(Client(), f"someone@{DOMAIN}").status_code == 400


def test_an_answer_is_good_once_and_only_in_the_browser_that_started(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    idp.add_user(f"new@{DOMAIN}")
    idp.auto_approve = f"new@{DOMAIN}"
    first, second = Client(), Client()
    callback = through_idp(first, f"new@{DOMAIN}")
    # Another browser (an attacker who sends the victim the link, or who got it): no state.
    stolen = second.get(callback)
    assert stolen.status_code == 400
    assert "No single sign-on is in progress in this browser" in stolen.content.decode()
    # A browser that started its own sign-in: the state does not match.
    through_idp(second, f"new@{DOMAIN}")
    mixed = second.get(callback)
    assert mixed.status_code == 400
    assert "state does not match" in mixed.content.decode()
    assert signed_in_user(second) is None
    # The browser that started it signs in once; the same answer again is refused.
    assert first.get(callback).status_code == 302
    replayed = first.get(callback)  # the same browser, signed in or not: used up
    assert replayed.status_code == 400
    assert "No single sign-on is in progress in this browser" in replayed.content.decode()
    first.logout()
    assert first.get(callback).status_code == 400
    assert signed_in_user(first) is None
    assert AuditLog.objects.filter(action="user.sso_signed_in").count() == 1


def test_the_providers_refusal_is_shown(idp: LocalOidcProvider, org: Organization) -> None:
    connect(org, idp)
    client = Client()
    query = urlsplit(provider_url(start(client, f"new@{DOMAIN}"))).query
    state = dict(p.split("=", 1) for p in query.split("&"))["state"]
    refused = client.get(
        "/console/login/sso/callback/",
        {"state": state, "error": "access_denied", "error_description": "user said no"},
    )
    assert refused.status_code == 403
    assert "refused the sign-in: access_denied (user said no)" in refused.content.decode()


def test_sso_required_refuses_password_sign_in_except_to_the_owners(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp, sso_required=True)
    member = add_member(org, Role.DEVELOPER, UserFactory(email=f"dev@{DOMAIN}"))
    refused = Client().post("/console/login/", {"username": member.email, "password": PASSWORD})
    assert refused.status_code == 403
    assert (
        "Acme requires single sign-on for acme.test addresses: use “Sign in with SSO”"
        in refused.content.decode()
    )
    # The owner's password still works (break-glass when the provider is broken).
    owner_client = Client()
    ok = owner_client.post("/console/login/", {"username": f"owner@{DOMAIN}", "password": PASSWORD})
    assert ok.status_code == 302
    # Addresses of other domains are not concerned; without "required", passwords work.
    outsider = add_member(org, Role.DEVELOPER, UserFactory(email="dev@elsewhere.test"))
    assert (
        Client()
        .post("/console/login/", {"username": outsider.email, "password": PASSWORD})
        .status_code
        == 302
    )
    SsoConnection.objects.update(sso_required=False)
    assert (
        Client()
        .post("/console/login/", {"username": member.email, "password": PASSWORD})
        .status_code
        == 302
    )


def test_a_person_with_an_authenticator_still_gives_a_code(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    member = add_member(org, Role.DEVELOPER, UserFactory(email=f"careful@{DOMAIN}"))
    two_factor.two_factor_enrol_unattended(principal=staff(), user=member)
    idp.add_user(member.email)
    client = Client()
    answer = sign_in(client, idp, member.email)
    assert answer.status_code == 302
    assert answer["Location"].startswith("/console/login/code/")
    assert client.get(org_url("console-quickstart", org.id)).status_code == 302  # not in yet


def test_staff_accounts_never_sign_in_through_a_tenants_provider(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    operator = UserFactory(email=f"ops@{DOMAIN}", is_staff=True)
    idp.add_user(operator.email)
    client = Client()
    refused = sign_in(client, idp, operator.email)
    assert refused.status_code == 403
    assert signed_in_user(client) is None


# --- the settings page ----------------------------------------------------------------------


def test_the_owner_configures_it_and_the_secret_is_never_rendered(
    idp: LocalOidcProvider, org: Organization
) -> None:
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    client = logged_in(owner)
    url = org_url("console-sso", org.id)
    form = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "default_role": "developer",
        "jit_enabled": "on",
        "enabled": "on",
    }
    saved = client.post(url, form)
    assert saved.status_code == 302, saved.content.decode()[:1000]
    connection = SsoConnection.objects.get(organization=org)
    assert connection.token_endpoint == f"{idp.issuer}/token"
    assert idp.client_secret not in connection.client_secret_sealed
    shown = client.get(url)
    assert shown.status_code == 200 and "no-store" in shown["Cache-Control"]
    text = shown.content.decode()
    assert idp.client_secret not in text
    assert "A client secret is stored" in text
    assert "http://testserver/console/login/sso/callback/" in text
    # Saved again without a secret: the stored one is kept.
    again = client.post(url, {**form, "client_secret": "", "default_role": "viewer"})
    assert again.status_code == 302
    connection.refresh_from_db()
    assert connection.default_role == Role.VIEWER
    from core import secretbox

    assert secretbox.unseal(connection.client_secret_sealed) == idp.client_secret
    audits = AuditLog.objects.filter(organization=org, action__startswith="sso.")
    assert list(audits.order_by("id").values_list("action", flat=True)) == [
        "sso.connection_created",
        "sso.connection_updated",
    ]
    assert all(idp.client_secret not in str(a.metadata) for a in audits)
    assert audits.order_by("id").last().metadata == {  # type: ignore[union-attr]
        "default_role": "viewer",
        "client_secret_changed": False,
    }
    # Domains: added with a TXT record to publish; the owner can remove it.
    added = client.post(org_url("console-sso-domain-add", org.id), {"domain": "Acme.TEST"})
    assert added.status_code == 302
    domain = SsoDomain.objects.get(connection=connection)
    assert domain.domain == DOMAIN and not domain.verified
    listed = client.get(url).content.decode()
    assert f"_mantle-verification.{DOMAIN}" in listed
    assert f"mantle-verification={domain.verification_token}" in listed


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"issuer": "ftp://idp.example.com"}, "issuer", "must use https"),
        ({"issuer": "https://10.1.2.3"}, "issuer", "refused by the outbound policy"),
        ({"issuer": "ISSUER/realms/none"}, "issuer", "discovery failed"),
        ({"default_role": "owner"}, "default_role", "Select a valid choice"),
        ({"enabled": "", "sso_required": "on"}, "sso_required", "must be enabled"),
        ({"client_secret": ""}, "client_secret", "the client secret is required"),
    ],
)
def test_configuration_errors_are_named_on_their_field(
    idp: LocalOidcProvider,
    org: Organization,
    settings: Any,
    change: dict[str, str],
    field: str,
    message: str,
) -> None:
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    form = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": "s3cret",
        "default_role": "viewer",
        "enabled": "on",
    }
    form.update({k: v.replace("ISSUER", idp.issuer) for k, v in change.items()})
    answer = logged_in(owner).post(org_url("console-sso", org.id), form)
    assert answer.status_code == 400
    errors = answer.context["form"].errors
    assert any(message in e for e in errors[field]), errors
    assert not SsoConnection.objects.filter(organization=org).exists()


def test_a_loopback_issuer_is_refused_unless_the_operator_allows_it(
    idp: LocalOidcProvider, org: Organization, settings: Any
) -> None:
    settings.MANTLE_SSO_ALLOWED_PRIVATE = []
    settings.MANTLE_SSO_ALLOWED_HTTP = []
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    answer = logged_in(owner).post(
        org_url("console-sso", org.id),
        {"issuer": idp.issuer, "client_id": "x", "client_secret": "y", "default_role": "viewer"},
    )
    assert answer.status_code == 400
    assert "the issuer URL is refused by the outbound policy" in answer.content.decode()


def test_who_may_see_the_settings(idp: LocalOidcProvider, org: Organization) -> None:
    connect(org, idp)
    url = org_url("console-sso", org.id)
    for role, status in [(Role.ADMIN, 200), (Role.DEVELOPER, 403), (Role.BILLING, 403)]:
        assert logged_in(add_member(org, role)).get(url).status_code == status, role
    outsider = OrganizationFactory(name="Elsewhere")
    stranger = Membership.objects.get(organization=outsider, role=Role.OWNER).user
    assert logged_in(stranger).get(url).status_code == 404
    # Another organization's domain through one's own page: 404, nothing removed.
    domain = SsoDomain.objects.get(connection__organization=org)
    connect(outsider, idp, domains=())
    removed = logged_in(stranger).post(
        org_url("console-sso-domain-action", outsider.id, domain_id=domain.id, action="remove")
    )
    assert removed.status_code == 404
    assert SsoDomain.objects.filter(pk=domain.pk).exists()


def test_an_admin_cannot_point_single_sign_on_at_a_provider_of_their_own(
    idp: LocalOidcProvider, org: Organization, settings: Any
) -> None:
    """The attack: an admin swaps the organization's provider for one they run, which
    vouches for the owner's address, and signs in as the owner (an owner's role here, and
    every other organization of the owner's). Only owners set the provider."""
    connection = connect(org, idp)
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    admin = add_member(org, Role.ADMIN, UserFactory(email=f"admin@{DOMAIN}"))
    url = org_url("console-sso", org.id)
    client = logged_in(admin)
    with LocalOidcProvider(client_id="admins-own") as own:
        for name, value in own.settings().items():
            setattr(settings, name, [*getattr(settings, name), *value])
        own.add_user(owner.email)
        form = {
            "issuer": own.issuer,
            "client_id": own.client_id,
            "client_secret": own.client_secret,
            "default_role": "developer",
            "jit_enabled": "on",
            "enabled": "on",
        }
        swapped = client.post(url, form)
        assert swapped.status_code == 403, swapped.content.decode()[:800]
        assert any(
            "only an owner may set the identity provider" in e
            for e in swapped.context["form"].errors["issuer"]
        )
        # Nor the client id alone, nor the secret alone, at the organization's own issuer.
        same_issuer = {**form, "issuer": idp.issuer}
        for change in (
            {"client_id": "another-client", "client_secret": ""},
            {"client_id": idp.client_id, "client_secret": "a-secret-of-my-own"},
        ):
            assert client.post(url, {**same_issuer, **change}).status_code == 403, change
        connection.refresh_from_db()
        from core import secretbox

        assert connection.issuer == idp.issuer and connection.client_id == idp.client_id
        assert secretbox.unseal(connection.client_secret_sealed) == idp.client_secret
        # A sign-in still goes to the organization's provider, not the admin's.
        started = provider_url(start(Client(), owner.email))
        assert started.startswith(f"{idp.issuer}/authorize?") and not own.token_requests
        # The admin still manages the switches and the default role...
        kept = client.post(
            url,
            {**form, "issuer": idp.issuer, "client_id": idp.client_id, "client_secret": ""},
        )
        assert kept.status_code == 302, kept.content.decode()[:800]
        connection.refresh_from_db()
        assert connection.default_role == Role.DEVELOPER
        # ...and an owner sets the provider.
        moved = logged_in(owner).post(url, form)
        assert moved.status_code == 302, moved.content.decode()[:800]
        connection.refresh_from_db()
        assert connection.issuer == own.issuer
    assert not AuditLog.objects.filter(
        organization=org,
        actor_user=admin,
        action="sso.connection_updated",
        metadata__issuer=own.issuer,
    ).exists()


@pytest.fixture
def dns_server(settings: Any) -> Iterator[LocalDnsServer]:
    with LocalDnsServer() as server:
        settings.MANTLE_SSO_DNS_NAMESERVERS = [server.address]
        yield server


def test_a_domain_is_verified_by_its_txt_record(
    idp: LocalOidcProvider, org: Organization, dns_server: LocalDnsServer
) -> None:
    connect(org, idp, verify=False)
    owner = Membership.objects.get(organization=org, role=Role.OWNER).user
    client = logged_in(owner)
    domain = SsoDomain.objects.get(domain=DOMAIN)
    check = org_url("console-sso-domain-action", org.id, domain_id=domain.id, action="verify")
    record = f"_mantle-verification.{DOMAIN}"

    missing = client.post(check)  # no record at all
    assert missing.status_code == 400
    assert f"{record} does not exist in DNS" in missing.content.decode()
    dns_server.txt[record] = ["v=spf1 -all", "mantle-verification=someone-elses-token"]
    wrong = client.post(check)  # records, but not this domain's token
    assert wrong.status_code == 400
    assert f"no TXT record 'mantle-verification={domain.verification_token}' at {record}" in (
        html.unescape(wrong.content.decode())
    )
    assert not SsoDomain.objects.get(pk=domain.pk).verified

    dns_server.txt[record].append(f"mantle-verification={domain.verification_token}")
    assert client.post(check).status_code == 302
    domain.refresh_from_db()
    assert domain.verified and domain.verified_by == "dns"
    assert AuditLog.objects.get(action="sso.domain_verified").metadata == {
        "domain": DOMAIN,
        "method": "dns",
    }
    assert dns_server.queries == [record] * 3


def test_failed_sign_ins_count_like_failed_passwords(
    idp: LocalOidcProvider, org: Organization, settings: Any
) -> None:
    """Each failed callback cost requests to the organization's provider: past the log-in
    limit for the (email, address) pair, no new sign-in starts for that email."""
    settings.MANTLE_LOGIN_MAX_FAILURES_PER_PAIR = 2
    connect(org, idp)
    idp.add_user(f"new@{DOMAIN}")
    idp.sign_with_other_key = True
    client = Client()
    for _ in range(2):
        assert sign_in(client, idp, f"new@{DOMAIN}").status_code == 400
    refused = start(client, f"new@{DOMAIN}")
    assert refused.status_code == 429
    assert "Too many failed log-ins for this email address" in refused.content.decode()
    assert len(idp.token_requests) == 2
    # Another address of the domain is not held back by this one's failures.
    assert start(client, f"other@{DOMAIN}").status_code == 200


def test_the_password_form_points_people_of_an_sso_domain_to_single_sign_on(
    idp: LocalOidcProvider, org: Organization
) -> None:
    connect(org, idp)
    answer = Client().post("/console/login/", {"username": f"Someone@{DOMAIN}", "password": ""})
    assert answer.status_code == 400
    text = answer.content.decode()
    assert "Acme signs in acme.test addresses with single sign-on" in text
    assert answer.context["sso_form"].initial == {"email": f"Someone@{DOMAIN}"}
    # Other domains get the usual answer only.
    other = Client().post("/console/login/", {"username": "a@elsewhere.test", "password": "x"})
    assert other.status_code == 400
    assert "single sign-on" not in other.context["form"].non_field_errors().as_text()
