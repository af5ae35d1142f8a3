"""Replicas: this replica's lease, which replica holds each session (its leaseholder) and the
fence when this replica's lease is lost (`leases`), and where a call's session is served
(`routing`, the interface the service holds): `local` serves every session here (no replicas),
`router` finds a session's leaseholder, takes the session over or forwards the call to it.

May import: sessions and the layers below.
"""
