"""Invitations: pending until the link mailed to the address is accepted, once, in time."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts import services
from accounts.models import AuditLog, Invitation, Membership, User
from accounts.permissions import Role
from accounts.principal import Principal
from core.errors import PermissionDenied
from tests.conftest import OrgWorld
from tests.console.support import logged_in, org_url
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

VICTIM = "cfo@victim.example"
INVITE_LINK = re.compile(r"https?://[^/\s]+(/console/invitations/[^/\s]+/)")
NEW_ACCOUNT = {
    "full_name": "Carol Finance",
    "password": "the real cfo's passphrase",
    "password_again": "the real cfo's passphrase",
}


def invite(world: OrgWorld, capture: Any, email: str = VICTIM, role: str = "admin") -> Any:
    with capture(execute=True):
        return world.client_for(Role.OWNER).post(
            org_url("console-team", world.org.id), {"email": email, "role": role}
        )


def act_on(world: OrgWorld, role: Role, invitation_id: str, action: str) -> Any:
    """Resend or revoke through the team page, as `world`'s member of `role`."""
    url = org_url(
        "console-invitation-action", world.org.id, invitation_id=invitation_id, action=action
    )
    return world.client_for(role).post(url)


def link_in(message: mail.EmailMessage) -> str:
    found = INVITE_LINK.search(str(message.body))
    assert found is not None, message.body
    return found.group(1)


def invitation_mails(email: str = VICTIM) -> list[mail.EmailMessage]:
    return [m for m in mail.outbox if m.to == [email] and "invited you" in m.subject]


def members(world: OrgWorld, email: str = VICTIM) -> list[str]:
    return list(
        Membership.objects.filter(organization=world.org, user__email=email).values_list(
            "role", flat=True
        )
    )


def test_inviting_creates_a_pending_invitation_and_mails_a_link(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    response = invite(world, django_capture_on_commit_callbacks, email="New@Example.com")
    assert response.status_code == 302
    invitation = Invitation.objects.get(organization=world.org)
    assert (invitation.email, invitation.role, invitation.status()) == (
        "new@example.com",
        "admin",
        "pending",
    )
    assert invitation.invited_by == world.users[Role.OWNER]
    assert not User.objects.filter(email="new@example.com").exists()
    assert members(world, "new@example.com") == []
    (message,) = invitation_mails("new@example.com")
    assert message.subject == f"{world.users[Role.OWNER].email} invited you to Acme on Mantle"
    # Only a digest is stored: the link's secret is nowhere in the database.
    secret = link_in(message).rstrip("/").rsplit("/", 1)[1]
    assert secret not in str(list(Invitation.objects.values()))
    page = world.client_for(Role.OWNER).get(org_url("console-team", world.org.id))
    assert "Pending invitations" in page.content.decode()
    assert "new@example.com" in page.content.decode()
    assert secret not in page.content.decode()


def test_a_pre_registered_account_cannot_hijack_an_invitation(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    """The attack: someone signs up with the victim's address before the invitation."""
    with django_capture_on_commit_callbacks(execute=True):
        signed_up = Client().post(
            "/console/signup/",
            {
                "email": VICTIM,
                "full_name": "Not the CFO",
                "organization_name": "Decoy",
                "password": "attacker passphrase 1",
                "password_again": "attacker passphrase 1",
            },
        )
    assert signed_up.status_code == 302
    # A legacy unverified account under the address (made before sign-up links existed)
    # is just as powerless; the attacker holds its password.
    attacker = User.objects.create_user(email=VICTIM, password="attacker passphrase 1")
    assert not attacker.email_verified
    invite(world, django_capture_on_commit_callbacks)
    assert members(world) == []  # inviting added nobody, not even the existing account
    as_attacker = logged_in(attacker)
    # Without the link there is nothing to accept: guessed links are 404.
    guessed = as_attacker.post("/console/invitations/" + "A" * 43 + "/")
    assert guessed.status_code == 404
    # Even holding the link, an unverified account cannot accept it.
    link = link_in(invitation_mails()[0])
    refused = as_attacker.post(link)
    assert refused.status_code == 403
    assert "not confirmed" in refused.content.decode()
    with pytest.raises(PermissionDenied):
        services.invitation_accept(token=link.split("/")[-2], user=attacker)
    assert members(world) == []
    # The mailbox's real owner: the reset link proves the address and ends the attacker's
    # password; then the invitation link, signed in, joins them with the invited role.
    owner = Client()
    owner.post("/console/password-reset/", {"email": VICTIM})
    reset = re.search(r"http://testserver(/console/reset/\S+/)", mail.outbox[-1].body)
    assert reset is not None
    form_url = owner.get(reset.group(1))["Location"]
    chosen = "the real cfo's passphrase"
    owner.post(form_url, {"new_password1": chosen, "new_password2": chosen})
    assert (
        owner.post("/console/login/", {"username": VICTIM, "password": chosen}).status_code == 302
    )
    joined = owner.post(link)
    assert joined.status_code == 302
    assert joined["Location"] == org_url("console-quickstart", world.org.id)
    assert members(world) == ["admin"]
    attacker.refresh_from_db()
    assert attacker.email_verified and not attacker.check_password("attacker passphrase 1")
    assert as_attacker.get(org_url("console-team", world.org.id)).status_code == 302  # logged out


def test_the_mailbox_owner_creates_their_account_through_the_link(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(world, django_capture_on_commit_callbacks, role="developer")
    link = link_in(invitation_mails()[0])
    client = Client()
    page = client.get(link)
    assert page.status_code == 200
    assert "Create your account for cfo@victim.example" in page.content.decode()
    response = client.post(link, NEW_ACCOUNT)
    assert response.status_code == 302
    user = User.objects.get(email=VICTIM)
    assert user.email_verified and user.check_password(NEW_ACCOUNT["password"])
    assert members(world) == ["developer"]
    assert client.get(org_url("console-team", world.org.id)).status_code == 200
    invitation = Invitation.objects.get(organization=world.org)
    assert (invitation.status(), invitation.accepted_by) == ("accepted", user)
    joined = AuditLog.objects.get(organization=world.org, action="member.joined")
    assert joined.metadata["invitation"] == invitation.id


def test_an_invitation_link_works_once(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    link = link_in(invitation_mails()[0])
    assert Client().post(link, NEW_ACCOUNT).status_code == 302
    again = Client().post(link, {**NEW_ACCOUNT, "password": "x" * 20, "password_again": "x" * 20})
    assert again.status_code == 404
    assert "it was used, revoked or expired" in again.content.decode()
    assert members(world) == ["admin"]
    assert User.objects.get(email=VICTIM).check_password(NEW_ACCOUNT["password"])


@pytest.mark.parametrize("spoil", ["expired", "tampered", "revoked"])
def test_a_spoilt_invitation_link_joins_nobody(
    world: OrgWorld, django_capture_on_commit_callbacks: Any, spoil: str
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    link = link_in(invitation_mails()[0])
    invitation = Invitation.objects.get(organization=world.org)
    if spoil == "expired":
        Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    elif spoil == "revoked":
        assert act_on(world, Role.ADMIN, invitation.id, "revoke").status_code == 302
    else:
        token = link.split("/")[-2]
        link = link.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert Client().get(link).status_code == 404
    assert Client().post(link, NEW_ACCOUNT).status_code == 404
    assert members(world) == []
    assert not User.objects.filter(email=VICTIM).exists()


def test_resending_replaces_the_link(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    invitation = Invitation.objects.get(organization=world.org)
    with django_capture_on_commit_callbacks(execute=True):
        response = act_on(world, Role.ADMIN, invitation.id, "resend")
    assert response.status_code == 302
    old, new = (link_in(m) for m in invitation_mails())
    assert old != new
    assert Client().post(old, NEW_ACCOUNT).status_code == 404
    assert Client().post(new, NEW_ACCOUNT).status_code == 302
    assert members(world) == ["admin"]


def test_a_signed_in_account_with_another_email_cannot_accept(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    link = link_in(invitation_mails()[0])
    someone = logged_in(UserFactory(email="someone@example.com"))
    page = someone.get(link)
    assert "This invitation is for cfo@victim.example" in page.content.decode()
    response = someone.post(link)
    assert response.status_code == 403
    assert members(world, "someone@example.com") == []
    assert Invitation.objects.get(organization=world.org).status() == "pending"


def test_a_verified_account_of_the_invited_address_joins_after_logging_in(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    cfo = UserFactory(email=VICTIM)
    invite(world, django_capture_on_commit_callbacks, role="billing")
    link = link_in(invitation_mails()[0])
    anonymous = Client().post(link)
    assert anonymous.status_code == 302
    assert anonymous["Location"] == f"/console/login/?next={link}"
    assert members(world) == []
    assert logged_in(cfo).post(link).status_code == 302
    assert members(world) == ["billing"]


def test_an_invitation_from_a_since_removed_admin_is_void(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        world.client_for(Role.ADMIN).post(
            org_url("console-team", world.org.id), {"email": VICTIM, "role": "admin"}
        )
    link = link_in(invitation_mails()[0])
    Membership.objects.filter(organization=world.org, user=world.users[Role.ADMIN]).delete()
    response = Client().post(link, NEW_ACCOUNT)
    assert response.status_code == 403
    assert "may no longer invite" in response.content.decode()
    assert members(world) == []


def test_an_unverified_account_cannot_invite(world: OrgWorld) -> None:
    owner = world.users[Role.OWNER]
    User.objects.filter(pk=owner.pk).update(email_verified_at=None)
    owner.refresh_from_db()
    with pytest.raises(PermissionDenied, match="confirm your own email address"):
        services.member_invite(
            principal=Principal(user=owner), org=world.org, email=VICTIM, role=Role.VIEWER
        )
    assert not Invitation.objects.exists()


def test_a_second_invitation_to_a_pending_address_is_a_conflict(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    response = invite(world, django_capture_on_commit_callbacks, role="viewer")
    assert response.status_code == 409
    assert "already has a pending invitation" in response.content.decode()
    assert list(Invitation.objects.values_list("role", flat=True)) == ["admin"]
    # Once expired, inviting again replaces it.
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert invite(world, django_capture_on_commit_callbacks, role="viewer").status_code == 302
    states = {i.role: i.status() for i in Invitation.objects.all()}
    assert states == {"admin": "revoked", "viewer": "pending"}


@pytest.mark.parametrize("action", ["resend", "revoke"])
def test_another_organizations_invitation_is_404(
    world: OrgWorld,
    other_world: OrgWorld,
    django_capture_on_commit_callbacks: Any,
    action: str,
) -> None:
    invite(other_world, django_capture_on_commit_callbacks)
    theirs = Invitation.objects.get(organization=other_world.org)
    sent = len(mail.outbox)
    assert act_on(world, Role.OWNER, theirs.id, action).status_code == 404
    after = Invitation.objects.get(pk=theirs.pk)
    assert (after.token_digest, after.revoked_at) == (theirs.token_digest, None)
    assert len(mail.outbox) == sent


def test_an_invitation_joins_only_its_own_organization(
    world: OrgWorld, other_world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    invite(other_world, django_capture_on_commit_callbacks, role="viewer")
    link = link_in(invitation_mails()[0])
    assert Client().post(link, NEW_ACCOUNT).status_code == 302
    assert members(world) == []
    assert members(other_world) == ["viewer"]


@pytest.mark.parametrize("role", [Role.DEVELOPER, Role.BILLING, Role.VIEWER])
def test_members_who_may_not_invite_cannot_resend_or_revoke(
    world: OrgWorld, django_capture_on_commit_callbacks: Any, role: Role
) -> None:
    invite(world, django_capture_on_commit_callbacks)
    invitation = Invitation.objects.get(organization=world.org)
    assert act_on(world, role, invitation.id, "revoke").status_code == 403
    assert Invitation.objects.get(pk=invitation.pk).status() == "pending"


def test_invitations_cannot_mail_bomb_an_address(
    world: OrgWorld,
    other_world: OrgWorld,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    # Resend (and revoke-then-invite) each mail the address again: past the limit per
    # recipient of the organization no more mail goes out and the page says why.
    settings.MANTLE_INVITATION_MAX_PER_EMAIL = 3
    invite(world, django_capture_on_commit_callbacks)
    invitation = Invitation.objects.get(organization=world.org)
    for _ in range(4):
        with django_capture_on_commit_callbacks(execute=True):
            response = act_on(world, Role.OWNER, invitation.id, "resend")
        assert response.status_code == 302
    act_on(world, Role.OWNER, invitation.id, "revoke")
    refused = invite(world, django_capture_on_commit_callbacks)
    assert len(invitation_mails()) == 3
    assert "Too many invitation emails for this email address" in refused.content.decode()
    assert Invitation.objects.filter(organization=world.org).count() == 1
    # Another organization's invitation to the same person is its own count.
    invite(other_world, django_capture_on_commit_callbacks)
    assert len(invitation_mails()) == 4


def test_an_organization_cannot_send_invitations_in_bulk(
    world: OrgWorld, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.MANTLE_INVITATION_MAX_PER_ORG = 2
    for n in range(3):
        invite(world, django_capture_on_commit_callbacks, email=f"person{n}@example.com")
    sent = [m for m in mail.outbox if "invited you" in m.subject]
    assert [m.to for m in sent] == [["person0@example.com"], ["person1@example.com"]]
    assert Invitation.objects.filter(organization=world.org).count() == 2
