"""sessiongate's server: a gRPC session service in front of ACP coding agents.

Packages by job, bottom to top; a module imports its own package and the ones below, never
one above (tests/test_layers.py holds the order, docs/architecture.md explains it):

    errors, settings, logs, supervisor, loop_share   what every package may use
    sandbox/    where an agent runs: the launcher, workdirs, files, terminals, the network
    security/   who may do what: tokens and principals, TLS, quotas
    state/      what is kept: the store interface, SQLite, PostgreSQL, turn records
    agents/     agent processes and the ACP connection to them
    turns/      one prompt's life: the turn, its log, questions, transcripts, translation
    sessions/   sessions, their locks and the pool of them
    cluster/    replicas: who owns a session and forwarding to it
    api/        the gRPC face: the service and its metrics
    app, __main__   wiring it all together and starting it
"""
