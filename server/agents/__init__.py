"""Agent processes and the ACP connection to them: what the layers above see of an agent
(`protocol`), the connection that speaks ACP to it and routes what it sends to each session
(`connection`), its OS process and process group (`process`), our answers to what it asks of
us: permissions, elicitations, files, terminals (`requests`), the JSON-RPC transport's bounds
(`transport`), logins (`logins`), session state the agent reports (`state`), who holds a
session's agent (`holder`), agent slots (`slots`) and warm spares (`spares`).

May import: state, security, sandbox and the root modules. Never turns: a turn hands the
connection the `protocol.Asker` and sink it needs.
"""
