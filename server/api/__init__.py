"""The gRPC face: the SessionService (`service`), the checks of its requests (`validation`) and
the Prometheus metrics (`metrics`).

May import: cluster, sessions and the layers below. Only `app` imports it.
"""
