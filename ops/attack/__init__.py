"""``trustpay attack``: a compromised device's or a broker login's attacks on a running deployment.

:mod:`.frames` makes the hostile frames (no I/O), :mod:`.verdict` judges what the
target did with them (no I/O), :mod:`.session` holds the connections (the
attacker's login, the monitor's subscription, the operator's pings, the ledger)
and :mod:`.attacks` plays each attack and reports.
"""
