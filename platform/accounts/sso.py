"""Single sign-on: an organization's OpenID Connect connection, its verified email domains,
the sign-in it grants (just-in-time membership) and the password sign-in it forbids.

The rules (docs/console.md, "Single sign-on"):
- A connection signs in only addresses of its **verified** domains: an identity provider
  vouches for the mailboxes of domains its organization proved it owns, never others. A
  domain is verified for one organization at most (a partial unique index), by a DNS TXT
  record `_mantle-verification.<domain>` holding the domain's token, or by an operator.
- Just-in-time members join with the connection's default role, never owner.
- Only owners set the provider (issuer, client id, secret): it can sign in as anyone of the
  verified domains, owners included. Admins manage domains, switches and the default role.
- "SSO required" refuses password sign-in to people of the verified domains, except the
  organization's owners (break-glass when the identity provider is broken or misconfigured).
- Staff accounts never sign in by single sign-on: a tenant's identity provider must not
  open an operator's session.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import dns.exception
import dns.resolver
import idna
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import oidc
from accounts.models import Membership, Organization, SsoConnection, SsoDomain, User
from accounts.permissions import Perm, Role, role_allows
from accounts.principal import Principal
from accounts.services import audit_record
from core import secretbox
from core.errors import Conflict, InvalidInput, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

MAX_DOMAINS = 20
MAX_CLIENT_ID_CHARS = 255
MAX_CLIENT_SECRET_CHARS = 1000
DNS_LIFETIME_S = 5.0
TXT_PREFIX = "_mantle-verification"
TXT_VALUE_PREFIX = "mantle-verification="


@dataclass(frozen=True, slots=True)
class SignedIn:
    user: User
    organization: Organization
    joined: bool  # a membership was made just in time


# --- reads ------------------------------------------------------------------------------


def connection_of(org: Organization) -> SsoConnection | None:
    return SsoConnection.objects.filter(organization=org).first()


def domains_of(connection: SsoConnection) -> list[SsoDomain]:
    return list(connection.domains.order_by("domain"))


def domain_get(connection: SsoConnection, domain_id: str) -> SsoDomain:
    found = connection.domains.filter(pk=domain_id).first()
    if found is None:
        raise NotFound("no such domain")
    return found


def provider_of(connection: SsoConnection) -> oidc.Provider:
    return oidc.Provider(
        issuer=connection.issuer,
        authorization_endpoint=connection.authorization_endpoint,
        token_endpoint=connection.token_endpoint,
        jwks_uri=connection.jwks_uri,
        token_auth_method=connection.token_auth_method,
        algorithms=tuple(connection.signing_algorithms),
    )


def email_domain(email: str) -> str:
    return email.rsplit("@", 1)[-1].strip().lower() if "@" in email else ""


def connection_for_email(email: str) -> SsoConnection | None:
    """The enabled connection whose verified domains hold `email`'s domain, if any."""
    domain = email_domain(email)
    if not domain:
        return None
    found = (
        SsoDomain.objects.select_related("connection__organization")
        .filter(domain=domain, verified_at__isnull=False, connection__enabled=True)
        .first()
    )
    return found.connection if found is not None else None


def password_sign_in_refusal(user: User) -> str | None:
    """Why `user` may not sign in with a password (an organization requires single sign-on
    for their address's domain), or None. The organization's owners may (break-glass)."""
    connection = connection_for_email(user.email)
    if connection is None or not connection.sso_required:
        return None
    org = connection.organization
    if Membership.objects.filter(organization=org, user=user, role=Role.OWNER).exists():
        return None
    return (
        f"{org.name} requires single sign-on for {email_domain(user.email)} addresses: "
        "use “Sign in with SSO” with your work email."
    )


# --- the connection -----------------------------------------------------------------------


def _check_may_manage(principal: Principal, org: Organization) -> Role:
    from accounts.selectors import role_in

    role = role_in(principal, org.id)
    if principal.user is None or role is None or not role_allows(role, Perm.ORG_UPDATE):
        raise PermissionDenied("only owners and admins may configure single sign-on")
    return role


def _check_may_set_provider(
    role: Role, existing: SsoConnection | None, *, issuer: str, client_id: str, secret: str
) -> None:
    """The identity provider (issuer, client id, client secret) is set by owners only:
    whoever sets it can sign in as any address of the verified domains, the owners'
    included, so an admin who could point it at a provider of their own would make
    themselves an owner (and reach the owners' other organizations)."""
    if role == Role.OWNER:
        return
    if (
        existing is None
        or existing.issuer != issuer
        or existing.client_id != client_id
        or bool(secret)
    ):
        raise PermissionDenied(
            "only an owner may set the identity provider (issuer, client id, client secret): "
            "it can sign in as anyone of the verified domains, owners included",
            param="issuer",
        )


def _clean_role(value: str) -> Role:
    try:
        role = Role(value)
    except ValueError:
        raise InvalidInput(
            f"default_role must be one of {', '.join(r.value for r in Role if r != Role.OWNER)}",
            param="default_role",
        ) from None
    if role == Role.OWNER:
        raise InvalidInput(
            "just-in-time members cannot be owners: choose another default role",
            param="default_role",
        )
    return role


def _clean_client_id(value: str) -> str:
    client_id = (value or "").strip()
    if not client_id:
        raise InvalidInput("the client id is required", param="client_id")
    if len(client_id) > MAX_CLIENT_ID_CHARS or not client_id.isprintable():
        raise InvalidInput(
            f"the client id must be printable and at most {MAX_CLIENT_ID_CHARS} characters",
            param="client_id",
        )
    return client_id


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def sso_connection_save(
    *,
    principal: Principal,
    org: Organization,
    issuer: str,
    client_id: str,
    client_secret: str = "",
    default_role: str = Role.VIEWER,
    jit_enabled: bool = True,
    enabled: bool = False,
    sso_required: bool = False,
) -> SsoConnection:
    """Creates or changes the organization's connection: owners; admins only its switches
    and default role, never the provider (`_check_may_set_provider`). The issuer's
    discovery document is fetched and checked first, outside any transaction; an empty
    `client_secret` keeps the stored one, except when the issuer moves to another host
    (the secret must not follow the connection there). Audited, never with the secret."""
    manager_role = _check_may_manage(principal, org)
    role = _clean_role(default_role)
    client_id = _clean_client_id(client_id)
    # Before discovery: an admin's attempt costs no request to the provider it names.
    _check_may_set_provider(
        manager_role,
        SsoConnection.objects.filter(organization=org).first(),
        issuer=oidc.clean_issuer(issuer),
        client_id=client_id,
        secret=client_secret,
    )
    if len(client_secret) > MAX_CLIENT_SECRET_CHARS:
        raise InvalidInput(
            f"the client secret is longer than {MAX_CLIENT_SECRET_CHARS} characters",
            param="client_secret",
        )
    if sso_required and not enabled:
        raise InvalidInput("single sign-on must be enabled to be required", param="sso_required")
    provider = asyncio.run(oidc.discover_once(issuer))
    with transaction.atomic():
        Organization.objects.select_for_update().get(pk=org.pk)
        existing = SsoConnection.objects.filter(organization=org).first()
        # Again under the lock: an owner may have changed the provider meanwhile.
        _check_may_set_provider(
            manager_role,
            existing,
            issuer=provider.issuer,
            client_id=client_id,
            secret=client_secret,
        )
        connection = existing or SsoConnection(organization=org)
        moved = existing is not None and _origin(existing.issuer) != _origin(provider.issuer)
        if client_secret:
            connection.client_secret_sealed = secretbox.seal(client_secret)
        elif existing is None or moved:
            raise InvalidInput(
                "the client secret is required"
                + (" again: the issuer moved to another host" if moved else ""),
                param="client_secret",
            )
        before = _summary(existing) if existing is not None else {}
        connection.issuer = provider.issuer
        connection.client_id = client_id
        connection.authorization_endpoint = provider.authorization_endpoint
        connection.token_endpoint = provider.token_endpoint
        connection.jwks_uri = provider.jwks_uri
        connection.token_auth_method = provider.token_auth_method
        connection.signing_algorithms = list(provider.algorithms)
        connection.default_role = role
        connection.jit_enabled = jit_enabled
        connection.enabled = enabled
        connection.sso_required = sso_required
        connection.save()
        after = _summary(connection)
        changed = sorted(k for k in after if before.get(k) != after[k])
        audit_record(
            principal=principal,
            action="sso.connection_created" if existing is None else "sso.connection_updated",
            target=connection,
            organization=org,
            metadata={
                **{k: after[k] for k in changed},
                "client_secret_changed": bool(client_secret),
            },
        )
    return connection


def _summary(connection: SsoConnection) -> dict[str, Any]:
    return {
        "issuer": connection.issuer,
        "client_id": connection.client_id,
        "default_role": str(connection.default_role),
        "jit_enabled": connection.jit_enabled,
        "enabled": connection.enabled,
        "sso_required": connection.sso_required,
    }


# --- domains ------------------------------------------------------------------------------


def clean_domain(value: str) -> str:
    """A lower-case, IDNA-encoded domain of at least two labels."""
    raw = (value or "").strip().lower().rstrip(".")
    if raw.startswith("@"):
        raw = raw[1:]
    if not raw or len(raw) > 253 or "." not in raw:
        raise InvalidInput("the domain must be a name like example.com", param="domain")
    try:
        name = idna.encode(raw, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise InvalidInput(f"{raw[:80]!r} is not a valid domain name", param="domain") from None
    labels = name.split(".")
    if any(not label or len(label) > 63 for label in labels) or labels[-1].isdigit():
        raise InvalidInput(f"{raw[:80]!r} is not a valid domain name", param="domain")
    return name


def sso_domain_add(*, principal: Principal, org: Organization, domain: str) -> SsoDomain:
    """Adds an unverified domain with a new verification token. Audited."""
    _check_may_manage(principal, org)
    name = clean_domain(domain)
    with transaction.atomic():
        connection = SsoConnection.objects.select_for_update().filter(organization=org).first()
        if connection is None:
            raise Conflict("save the identity provider before adding domains", param="domain")
        if connection.domains.count() >= MAX_DOMAINS:
            raise Conflict(f"a connection has at most {MAX_DOMAINS} domains", param="domain")
        if connection.domains.filter(domain=name).exists():
            raise Conflict(f"{name} is already listed", param="domain")
        added = SsoDomain.objects.create(
            connection=connection, domain=name, verification_token=secrets.token_hex(16)
        )
        audit_record(
            principal=principal,
            action="sso.domain_added",
            target=added,
            organization=org,
            metadata={"domain": name},
        )
    return added


def sso_domain_remove(*, principal: Principal, domain: SsoDomain) -> None:
    org = domain.connection.organization
    _check_may_manage(principal, org)
    with transaction.atomic():
        audit_record(
            principal=principal,
            action="sso.domain_removed",
            target=domain,
            organization=org,
            metadata={"domain": domain.domain},
        )
        domain.delete()


def txt_record_name(domain: SsoDomain) -> str:
    return f"{TXT_PREFIX}.{domain.domain}"


def txt_record_value(domain: SsoDomain) -> str:
    return f"{TXT_VALUE_PREFIX}{domain.verification_token}"


def _resolver() -> dns.resolver.Resolver:
    """The system's resolver, or the name servers MANTLE_SSO_DNS_NAMESERVERS lists
    (`address` or `address:port`; the tests' own server on loopback)."""
    servers = [str(s).strip() for s in settings.MANTLE_SSO_DNS_NAMESERVERS or () if str(s).strip()]
    if not servers:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    addresses: list[str] = []
    for server in servers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        addresses.append(host)
        if port:
            resolver.port = int(port)
    resolver.nameservers = addresses
    return resolver


def txt_values(name: str) -> list[str]:
    """The TXT strings at `name` (dnspython, within DNS_LIFETIME_S). InvalidInput naming
    what the resolver said when there are none."""
    try:
        answer = _resolver().resolve(name, "TXT", lifetime=DNS_LIFETIME_S)
    except dns.resolver.NXDOMAIN:
        raise InvalidInput(f"{name} does not exist in DNS", param="domain") from None
    except dns.resolver.NoAnswer:
        raise InvalidInput(f"{name} has no TXT record", param="domain") from None
    except dns.exception.Timeout:
        raise InvalidInput(
            f"looking up {name} took longer than {DNS_LIFETIME_S:g}s", param="domain"
        ) from None
    except dns.exception.DNSException as exc:
        raise InvalidInput(
            f"looking up {name} failed ({type(exc).__name__})", param="domain"
        ) from None
    values: list[str] = []
    for record in answer:
        strings: Iterable[bytes] = getattr(record, "strings", ())
        values.append(b"".join(strings).decode("utf-8", "replace"))
    return values


def sso_domain_check_dns(*, principal: Principal, domain: SsoDomain) -> SsoDomain:
    """Verifies `domain` when its TXT record holds its token. Audited when verified."""
    org = domain.connection.organization
    _check_may_manage(principal, org)
    if domain.verified:
        return domain
    name = txt_record_name(domain)
    expected = txt_record_value(domain)
    if expected not in txt_values(name):
        raise InvalidInput(
            f"no TXT record {expected!r} at {name} (DNS changes can take a while to appear)",
            param="domain",
        )
    return _mark_verified(principal, domain, SsoDomain.Method.DNS)


def sso_domain_mark_verified(*, principal: Principal, domain: SsoDomain) -> SsoDomain:
    """The operator's path: staff who checked ownership another way (a support ticket,
    a record they looked up themselves) verify the domain. Audited with the staff member."""
    user = principal.user
    if user is None or not user.is_staff:
        raise PermissionDenied("only operator staff may mark a domain verified")
    return _mark_verified(principal, domain, SsoDomain.Method.OPERATOR)


def _mark_verified(principal: Principal, domain: SsoDomain, method: str) -> SsoDomain:
    org = domain.connection.organization
    try:
        with transaction.atomic():
            locked = SsoDomain.objects.select_for_update().get(pk=domain.pk)
            if locked.verified:
                return locked
            locked.verified_at = timezone.now()
            locked.verified_by = method
            locked.save(update_fields=["verified_at", "verified_by"])
            audit_record(
                principal=principal,
                action="sso.domain_verified",
                target=locked,
                organization=org,
                metadata={"domain": locked.domain, "method": method},
            )
    except IntegrityError:
        raise Conflict(
            f"{domain.domain} is already verified for another organization", param="domain"
        ) from None
    return locked


# --- signing in ---------------------------------------------------------------------------


def sso_sign_in(
    *, connection_id: str, issuer: str, claims: Mapping[str, Any], ip_address: str | None
) -> SignedIn:
    """Whom verified `claims` (oidc.validate_id_token) sign in, for the connection that
    started the sign-in: the address must be verified by the provider (`email_verified`)
    and in one of the connection's verified domains. An existing account with that
    address is signed in (and joins the organization just in time when it is not a member
    and the connection allows it); a new address gets an account (confirmed) and the
    default role. Audited as `user.sso_signed_in` (and `member.joined` with `via: sso`)."""
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > 254:
        raise oidc.SignInRefused("the identity provider sent no email address")
    email = email.strip().lower()
    try:
        # One mailbox, nothing else: text that merely ends in a verified domain after its
        # last '@' ("a@victim.example@acme.example", a list) is no address of that domain.
        validate_email(email)
    except ValidationError:
        shown = "".join(c for c in email[:120] if c.isprintable())
        raise oidc.SignInRefused(
            f"the identity provider's email {shown!r} is not a valid email address"
        ) from None
    if claims.get("email_verified") is not True:
        raise oidc.SignInRefused(
            f"the identity provider has not verified {email} (email_verified is not true)"
        )
    domain = email_domain(email)
    with transaction.atomic():
        connection = (
            SsoConnection.objects.select_for_update()
            .select_related("organization")
            .filter(pk=connection_id)
            .first()
        )
        if connection is None or not connection.enabled or connection.issuer != issuer:
            raise oidc.SignInRefused("single sign-on was turned off or changed meanwhile")
        org = connection.organization
        if not connection.domains.filter(domain=domain, verified_at__isnull=False).exists():
            raise oidc.SignInRefused(
                f"{domain} is not a verified domain of {org.name}'s single sign-on: its "
                "identity provider cannot sign in addresses of other domains"
            )
        user = User.objects.filter(email__iexact=email).first()
        created = user is None
        if user is None:
            name = claims.get("name")
            user = User.objects.create_user(
                email=email,
                password=None,
                full_name=name[:200] if isinstance(name, str) else "",
                email_verified_at=timezone.now(),
            )
        elif not user.is_active:
            raise PermissionDenied("this account is deactivated")
        elif user.is_staff:
            raise PermissionDenied(
                "operator staff accounts sign in with their password and authenticator, "
                "never through an organization's identity provider"
            )
        elif user.email_verified_at is None:
            # The organization proved it owns the domain, and its provider vouches for the
            # mailbox: as good as the link of a password reset.
            user.email_verified_at = timezone.now()
            user.save(update_fields=["email_verified_at"])
        principal = Principal(user=user, ip_address=ip_address)
        joined = False
        if not Membership.objects.filter(organization=org, user=user).exists():
            if not connection.jit_enabled:
                raise PermissionDenied(
                    f"{email} is not a member of {org.name}: ask one of its admins to invite you"
                )
            membership = Membership.objects.create(
                organization=org, user=user, role=connection.default_role
            )
            joined = True
            audit_record(
                principal=principal,
                action="member.joined",
                target=membership,
                organization=org,
                metadata={"email": email, "role": str(membership.role), "via": "sso"},
            )
        audit_record(
            principal=principal,
            action="user.sso_signed_in",
            target=connection,
            organization=org,
            metadata={
                "email": email,
                "issuer": connection.issuer,
                "subject": str(claims.get("sub", ""))[:255],
                "account_created": created,
            },
        )
    logger.info("sso sign-in of %s into %s (joined: %s)", email, org.id, joined)
    return SignedIn(user=user, organization=org, joined=joined)
