"""Prefixed, unguessable public ids (org_..., proj_..., key_...) for customer-facing objects."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 20) -> str:
    return f"{prefix}{random_token(length)}"


def new_org_id() -> str:
    return new_id("org_")


def new_project_id() -> str:
    return new_id("proj_")


def new_key_id() -> str:
    return new_id("key_")


def new_endpoint_id() -> str:
    return new_id("ep-", 16)


def new_model_version_id() -> str:
    return new_id("mv_")


def new_membership_id() -> str:
    return new_id("mem_")


def new_invitation_id() -> str:
    return new_id("inv_")


def new_provider_id() -> str:
    return new_id("prv-")


def new_route_target_id() -> str:
    return new_id("rt-")
