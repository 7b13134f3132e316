"""trustpay's wire protocol, sans-I/O: pure functions and frozen records.

No asyncio, no sockets, no files: everything here can be tested, fuzzed and
reasoned about alone. The node runtime (``nodes``) puts it on the wire.
"""
