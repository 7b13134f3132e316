"""Template code installed on devices: copied verbatim, then loaded from disk there.

Not imported by trustpay itself; ``ops.provision`` reads these files as bytes.
"""
