"""Receive: the C-STORE service provider, the spool that keeps each instance, and the index that records it."""
