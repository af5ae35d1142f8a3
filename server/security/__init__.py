"""Who may do what: bearer tokens and mTLS principals and what each may use (`principals`),
the interceptor that authenticates every call and signs forwarded ones (`auth`), TLS
credentials (`tls`), per-principal quotas (`quotas`) and secrets kept at rest (`secrets`: the
Fernet key that seals client-supplied MCP servers).

May import: sandbox (a principal's home and roots) and the root modules.
"""
