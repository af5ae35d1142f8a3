"""Replicas: this replica's leases on the sessions it owns and the fence when one is lost
(`ownership`), and where a call's session is served (`routing`, the interface the service
holds): `local` serves every session here (no replicas), `router` finds a session's owner,
takes it over or forwards the call to it.

May import: sessions and the layers below.
"""
