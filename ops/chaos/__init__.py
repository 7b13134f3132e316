"""Chaos on the links: an MQTT fault proxy (:mod:`ops.chaos.proxy`), its rules
(:mod:`ops.chaos.faults`), its record of what it did (:mod:`ops.chaos.fault_log`)
and the packet codec it reads with (:mod:`ops.chaos.packets`)."""
