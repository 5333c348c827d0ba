"""Payments: Stripe customers, invoice and meter pushes, webhooks and dunning.

The only package that talks to Stripe, and stripe_client.py is its only module that
imports `stripe` (docs/billing.md, "Stripe").
"""
