"""Replicas: this replica's leases on the sessions it owns and the fence when one is lost
(`ownership`), and finding a session's owner and forwarding calls to it (`router`).

May import: sessions and the layers below.
"""
