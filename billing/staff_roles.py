"""The two staff roles as Django Groups: billing admin (moves money) and support (reads).

Core billing: the app's post_migrate handler and management commands keep them exact, and
the back office checks them (billing/backoffice/views.py, billing/admin.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from django.apps import apps as global_apps
from django.apps.registry import Apps

logger = logging.getLogger(__name__)

BILLING_ADMIN = "billing admin"
SUPPORT = "support"

# Everything the back office shows. Both roles read all of it; nobody changes these rows
# through generic admin forms: changes go through the services, behind the permissions
# below.
VIEWABLE: tuple[str, ...] = (
    "accounts.user",
    "accounts.organization",
    "accounts.membership",
    "accounts.project",
    "accounts.apikey",
    "accounts.auditlog",
    "catalog.model",
    "catalog.modelversion",
    "catalog.acceleratorpool",
    "catalog.endpoint",
    "catalog.provider",
    "catalog.routetarget",
    "gateway.batch",
    "gateway.file",
    "billing.invoice",
    "billing.invoiceline",
    "billing.creditnote",
    "billing.creditledgerentry",
    "billing.price",
    "billing.priceoverride",
    "billing.tiermultiplier",
    "billing.billingaccount",
    "billing.budget",
    "billing.budgetalert",
    "billing.usagerollup",
    "billing.stripecustomer",
    "billing.stripeevent",
    "billing.taxrate",
    "billing.billingdetails",
    "billing.topup",
    "billing.topupreversal",
    "billing.autorecharge",
)
# Revenue: usage rated at each organization's prices (the dashboard's revenue, the usage
# explorer's charges) and, beside it, what relayed requests cost the operator (the margin
# page, the explorer's cost of goods). The view right of the rollups it is rated from:
# both roles hold it; staff in no role see none of it.
VIEW_REVENUE = "billing.view_usagerollup"
MOVE_MONEY = "billing.move_money"
# Upstream providers and endpoints' route targets (catalog/admin.py, docs/providers.md):
# Django's own permissions on those models; the billing admin, who keeps the price book,
# also keeps what the models cost and where they run.
MANAGE_PROVIDERS: tuple[str, ...] = (
    "catalog.add_provider",
    "catalog.change_provider",
    "catalog.delete_provider",
    "catalog.change_routetarget",
)
SUSPEND = "billing.suspend_organization"

ROLE_PERMISSIONS: Mapping[str, tuple[str, ...]] = {
    SUPPORT: tuple(f"{model.split('.')[0]}.view_{model.split('.')[1]}" for model in VIEWABLE),
    BILLING_ADMIN: (
        *(f"{model.split('.')[0]}.view_{model.split('.')[1]}" for model in VIEWABLE),
        MOVE_MONEY,
        SUSPEND,
        *MANAGE_PROVIDERS,
    ),
}


def roles_sync(*, apps: Apps = global_apps) -> dict[str, int]:
    """Creates both groups and sets exactly their permissions. Idempotent.

    Takes the app registry so that a data migration can run it on historical models;
    permissions that do not exist yet are created first (Django only creates them after
    the whole migrate run).
    """
    from django.contrib.auth.management import create_permissions

    for config in apps.get_app_configs():
        previous = getattr(config, "models_module", None)
        if previous is None:  # historical app configs have none; the check needs one
            config.models_module = True  # type: ignore[assignment]
        create_permissions(config, apps=apps, verbosity=0)
        config.models_module = previous
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    counts = {}
    for name, wanted in ROLE_PERMISSIONS.items():
        group, _ = group_model.objects.get_or_create(name=name)
        found = []
        for dotted in wanted:
            app_label, codename = dotted.split(".", 1)
            perm = permission_model.objects.filter(
                content_type__app_label=app_label, codename=codename
            ).first()
            if perm is None:
                logger.warning("permission %s does not exist; role %r lacks it", dotted, name)
                continue
            found.append(perm)
        group.permissions.set(found)
        counts[name] = len(found)
    return counts
