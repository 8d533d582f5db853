"""Notifications: webhooks told when a job ends or a delivery is given up (``webhooks`` in the config)."""
