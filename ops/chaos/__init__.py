"""Chaos on the links: faults, attacks and fuzzing against trustpay's decoders and nodes."""
