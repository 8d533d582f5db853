"""Operate: the ``ainode`` command line, the status it shows, logging, and the offline ``ainode run``."""
