"""Where an agent runs: the bubblewrap launcher and what it shows the agent (`launcher`),
session working directories and allowed roots (`workdir`), the agent's process descendants
(`descendants`), the file system and terminals it asks for through ACP (`files`,
`terminals`), and its network: the gateway's proxy (`network_proxy`) and the relay inside the
sandbox (`bridge`, run there as a script); and the client tools' relay the agent starts as an
MCP server (`tools_relay`, a script too).

May import: the root modules (errors, settings, logs). Nothing above.
"""
