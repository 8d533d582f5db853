"""The audit trail for the site's audit repository: DICOM audit messages (PS3.15 A.5) over syslog (A.6).

``codes`` the coded values and enumerations of the schema, ``message`` one AuditMessage and its XML,
``trail`` the wording of the node's own audit events that the messages are made from, ``events``
those events as messages, ``syslog`` RFC 5424 messages over TCP or TLS, ``forwarder`` the loop that
sends the ``audit_events`` table's events and marks them sent.
"""
