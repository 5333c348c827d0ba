"""The fake Stripe's hosted Checkout page, for browser journeys against the fake: what
checkout.stripe.com shows a customer (the amount, a card, Pay), served by the platform's
own process because the fake lives in its memory. 404 unless the backend is the fake."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render

from billing.payments.stripe_sync import stripe_backend
from billing.payments.stripe_types import StripeCardDeclined, StripeError, minor_unit_exponent


def fake_checkout(request: HttpRequest, session_id: str) -> HttpResponse:
    backend = stripe_backend()
    if backend is None:
        raise Http404("no such page")
    # Here, not at the top: the URLconf loads this module, and the SDK the fake imports
    # is loaded only where Stripe is in use (stripe_sync._build).
    from billing.payments.stripe_fake import TEST_CARDS, FakeStripe

    fake = backend
    if not isinstance(fake, FakeStripe):
        raise Http404("no such page")
    session = fake.checkout_sessions.get(session_id)
    if session is None or session["mode"] != "payment":
        raise Http404("no such Checkout session")
    error = None
    if request.method == "POST":
        card = request.POST.get("card", "")
        if card not in TEST_CARDS:
            error = "choose one of the test cards"
        else:
            try:
                fake.checkout_complete(session_id, card=card)
            except StripeCardDeclined as exc:
                error = exc.message
            except StripeError as exc:
                error = exc.message
            else:
                return HttpResponseRedirect(fake.checkout_success_url(session_id), status=303)
    amount = session["amount_total"] / 10 ** minor_unit_exponent(session["currency"])
    return render(
        request,
        "payments/fake_checkout.html",
        {
            "session": session,
            "amount": f"{amount:.2f}",
            "name": session["line_items"][0]["price_data"]["product_data"]["name"],
            "cards": list(TEST_CARDS),
            "error": error,
        },
        status=402 if error else 200,
    )
