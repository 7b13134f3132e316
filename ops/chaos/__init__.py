"""Chaos on the links: the MQTT fault proxy (:mod:`ops.chaos.proxy`, its rules :mod:`ops.chaos.faults`,
its record :mod:`ops.chaos.fault_log`, its codec :mod:`ops.chaos.packets`) and the fuzzers of the
decoders and the nodes (:mod:`ops.chaos.fuzz`, strategies in :mod:`ops.chaos.strategies`)."""
