"""Users, organizations, memberships, projects, API keys and the audit log."""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.db.models import Q, TextChoices
from django.utils import timezone

from accounts.permissions import Role
from core import ids


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        if not email:
            raise ValueError("email is required")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self.create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    """A person; logs in with email. Belongs to organizations through memberships."""

    email = models.EmailField(unique=True)
    full_name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)
    # Set when the person proved they read mail at `email` (a sign-up or invitation link,
    # a password reset). Unverified accounts cannot join organizations (docs/console.md).
    email_verified_at = models.DateTimeField(null=True, blank=True)

    objects: ClassVar[UserManager] = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    def __str__(self) -> str:
        return self.email

    @property
    def email_verified(self) -> bool:
        return self.email_verified_at is not None


class Organization(models.Model):
    """A corporate customer: the unit of tenancy, billing and data residency."""

    # TextChoices by its own name: with django-otp's models installed beside these,
    # the django-stubs plugin fails to resolve `models.TextChoices` here (mypy 2.4).
    class Status(TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    id = models.CharField(primary_key=True, max_length=40, default=ids.new_org_id, editable=False)
    name = models.CharField(max_length=200)
    region = models.CharField(max_length=64, default="local")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    # Owners and admins must have a confirmed authenticator (TOTP) to reach anything of
    # the organization, in the console and the management API with a session
    # (accounts/two_factor.py, docs/console.md). Turned on and off by an owner.
    mfa_required = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class Membership(models.Model):
    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_membership_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=[(r.value, r.value) for r in Role])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["organization", "user"], name="uniq_membership"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.organization_id} as {self.role}"


class Invitation(models.Model):
    """An offer of membership, pending until accepted through the link mailed to `email`.

    Only a SHA-256 digest of the link's secret is stored: the secret is in the email alone,
    never shown to the inviter, so accepting proves control of the mailbox.
    """

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_invitation_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=[(r.value, r.value) for r in Role])
    invited_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    token_digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints: ClassVar = [
            # One open invitation per address and organization: a second is a resend.
            models.UniqueConstraint(
                fields=["organization", "email"],
                condition=Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="one_open_invitation",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization_id} as {self.role}"

    def status(self, now: Any = None) -> str:
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= (now or timezone.now()):
            return "expired"
        return "pending"


class PendingSignup(models.Model):
    """A sign-up waiting for its email link; the account exists only once it is followed.

    So nobody can hold an account (or an organization, or keys) under an address they do
    not read, and the sign-up page answers the same whether or not the address is taken.
    """

    email = models.EmailField(db_index=True)
    full_name = models.CharField(max_length=200, blank=True)
    organization_name = models.CharField(max_length=120)
    password = models.CharField(max_length=128)  # a hash, as User.password
    token_digest = models.CharField(max_length=64, unique=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"sign-up of {self.email}"


class Project(models.Model):
    """A grouping of keys and usage inside an organization (a team, an app, an environment)."""

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_project_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=120)
    is_default = models.BooleanField(default=False)
    # Requests and tokens per minute over all the project's keys; None: the platform default.
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["organization", "name"], name="uniq_project_name"),
            models.UniqueConstraint(
                fields=["organization"], condition=Q(is_default=True), name="one_default_project"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class BudgetMode(models.TextChoices):
    HARD = "hard"  # admission refuses what would pass the budget
    SOFT = "soft"  # never refuses: crossing it records an alert


class ApiKey(models.Model):
    """A secret for the SDK. Only its prefix and an HMAC-SHA256 under the pepper are stored."""

    id = models.CharField(primary_key=True, max_length=40, default=ids.new_key_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=120)
    prefix = models.CharField(max_length=16)
    digest = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Per-key controls (docs/billing.md, "Per-key budgets"): a monthly budget in the
    # billing currency (None: none), hard (refused at admission) or soft (alerts only),
    # and the model names the key may use (empty: every model its organization may use).
    monthly_budget = models.DecimalField(max_digits=14, decimal_places=2, null=True, blank=True)
    budget_mode = models.CharField(
        max_length=8, choices=BudgetMode.choices, default=BudgetMode.HARD, db_default="hard"
    )
    allowed_models = models.JSONField(default=list, blank=True)

    class Meta:
        indexes: ClassVar = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    def is_usable(self, now: Any = None) -> bool:
        now = now or timezone.now()
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > now


class AuditLog(models.Model):
    """Who did what to which object, from where. Append-only."""

    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=200, blank=True)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    metadata = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes: ClassVar = [models.Index(fields=["organization", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.action} {self.target_type}:{self.target_id} by {self.actor_label}"


def new_sso_connection_id() -> str:
    return ids.new_id("sso_")


def new_sso_domain_id() -> str:
    return ids.new_id("ssod_")


class SsoConnection(models.Model):
    """An organization's OpenID Connect identity provider (accounts/sso.py, docs/console.md,
    "Single sign-on"). The client secret is stored sealed (core/secretbox.py) and never
    shown again; the endpoints are what discovery found when the connection was saved."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_sso_connection_id, editable=False
    )
    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, related_name="sso_connection"
    )
    issuer = models.CharField(max_length=500)
    client_id = models.CharField(max_length=255)
    client_secret_sealed = models.TextField(blank=True)
    authorization_endpoint = models.CharField(max_length=2000)
    token_endpoint = models.CharField(max_length=2000)
    jwks_uri = models.CharField(max_length=2000)
    token_auth_method = models.CharField(max_length=32)
    signing_algorithms = models.JSONField(default=list)
    # Just-in-time membership: a person of a verified domain who is not a member yet joins
    # with `default_role` (never owner) at their first sign-in; off, only members may.
    jit_enabled = models.BooleanField(default=True)
    default_role = models.CharField(
        max_length=16,
        choices=[(r.value, r.value) for r in Role if r is not Role.OWNER],
        default=Role.VIEWER,
    )
    enabled = models.BooleanField(default=False)
    # Password sign-in refused to people of the connection's verified domains (its owners
    # excepted: the break-glass path).
    sso_required = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"SSO of {self.organization_id} ({self.issuer})"


class SsoDomain(models.Model):
    """An email domain a connection signs people in for, once verified: by a DNS TXT record
    holding `verification_token`, or by an operator who checked it another way. A domain is
    verified for one organization at most."""

    class Method(TextChoices):
        DNS = "dns"
        OPERATOR = "operator"

    id = models.CharField(
        primary_key=True, max_length=40, default=new_sso_domain_id, editable=False
    )
    connection = models.ForeignKey(SsoConnection, on_delete=models.CASCADE, related_name="domains")
    domain = models.CharField(max_length=253)
    verification_token = models.CharField(max_length=64)
    verified_at = models.DateTimeField(null=True, blank=True)
    verified_by = models.CharField(max_length=16, choices=Method.choices, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["connection", "domain"], name="uniq_sso_domain"),
            models.UniqueConstraint(
                fields=["domain"],
                condition=Q(verified_at__isnull=False),
                name="one_verified_sso_domain",
            ),
        ]

    def __str__(self) -> str:
        return self.domain

    @property
    def verified(self) -> bool:
        return self.verified_at is not None
