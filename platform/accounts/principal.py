"""Who is acting: a console user or an admin-scoped API key, and from which address."""

from __future__ import annotations

from dataclasses import dataclass

from accounts.models import ApiKey, User


@dataclass(frozen=True)
class Principal:
    user: User | None = None
    api_key: ApiKey | None = None
    ip_address: str | None = None

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user.email
        if self.api_key is not None:
            return f"api-key:{self.api_key.id}"
        return "system"

    @property
    def organization_restriction(self) -> str | None:
        """An API key acts only inside its own organization."""
        return self.api_key.organization_id if self.api_key is not None else None


SYSTEM = Principal()
