"""POST /billing/stripe/webhook: Stripe's signed events, verified before anything is stored."""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing.payments.stripe_client import webhook_verify
from billing.payments.stripe_events import Outcome, stripe_event_receive
from billing.payments.stripe_types import StripeError

logger = logging.getLogger(__name__)


@csrf_exempt  # authenticated by the Stripe-Signature HMAC instead
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    secret: str = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        return _error("Stripe webhooks are not configured", code="stripe_disabled", status=404)
    try:
        event = webhook_verify(
            request.body,
            request.headers.get("Stripe-Signature"),
            secret=secret,
            tolerance_s=settings.STRIPE_WEBHOOK_TOLERANCE_S,
        )
    except StripeError as exc:
        logger.warning("Stripe webhook refused: %s", exc.message)
        return _error(exc.message, code=exc.code, status=400)
    outcome = stripe_event_receive(event)
    # A non-2xx answer makes Stripe redeliver (with backoff, for up to three days).
    status = 500 if outcome == Outcome.FAILED else 200
    return JsonResponse({"id": event.id, "status": str(outcome)}, status=status)


def _error(message: str, *, code: str, status: int) -> JsonResponse:
    # The management API's error shape (config.api.error_body).
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JsonResponse({"error": error}, status=status)
