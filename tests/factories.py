"""factory_boy factories for the suite's rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import factory

from accounts import services
from accounts.models import ApiKey, Membership, Organization, Project, User
from accounts.permissions import Role
from accounts.principal import SYSTEM


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.com")
    full_name = factory.Faker("name")
    password = "correct horse battery"

    @classmethod
    def _create(cls, model_class: type[User], *args: Any, **kwargs: Any) -> User:
        return User.objects.create_user(*args, **kwargs)


class OrganizationFactory(factory.Factory):
    """Through the service, so every organization has its owner and default project."""

    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Org {n}")
    owner = factory.SubFactory(UserFactory)

    @classmethod
    def _create(cls, model_class: type, *args: Any, **kwargs: Any) -> Organization:
        return services.organization_create(
            principal=SYSTEM, name=kwargs["name"], owner=kwargs["owner"]
        )


def add_member(org: Organization, role: Role, user: User | None = None) -> User:
    user = user or UserFactory()
    Membership.objects.create(organization=org, user=user, role=role)
    return user


def default_project(org: Organization) -> Project:
    return Project.objects.get(organization=org, is_default=True)


def make_api_key(
    org: Organization,
    *,
    scopes: Sequence[str] = ("inference",),
    project: Project | None = None,
    **kwargs: Any,
) -> tuple[ApiKey, str]:
    return services.api_key_create(
        principal=SYSTEM,
        project=project or default_project(org),
        name="test key",
        scopes=list(scopes),
        **kwargs,
    )
