"""What is kept: session records, tombstones and the `Store` interface (`base`), its SQLite
(`sqlite`) and PostgreSQL (`postgres`, `pg_schema`) backends, and turn transcripts' rows and
batched writes (`turn_records`). Backends never import each other; `app` chooses one.

May import: security (quotas checked in the database) and the layers below.
"""
