"""Operator tooling: provisioning a deployment and the ``trustpay`` command line."""
