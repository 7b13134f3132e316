"""trustpay's nodes: the processes that put the sans-I/O protocol on the wire.

``nodes.deployment`` reads a provisioned deployment directory (keys,
certificates, broker credentials, the installed client and payment apps);
``ops.provision`` writes one.
"""
