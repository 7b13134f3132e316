"""``trustpay monitor``: every frame on every link, checked by the monitor itself (see ``model``)."""
