"""Chaos on the links: an MQTT fault proxy (:mod:`ops.chaos.proxy`), its rules
(:mod:`ops.chaos.faults`) and the packet codec it reads with (:mod:`ops.chaos.packets`)."""
