"""Where an agent runs: the bubblewrap launcher and what it shows the agent (`launcher`),
session working directories and allowed roots (`workdir`), the agent's process descendants
(`descendants`), the file system and terminals it asks for through ACP (`files`,
`terminals`), and its network: the gateway's proxy (`network_proxy`) and the relay inside the
sandbox (`bridge`, run there as a script).

May import: the root modules (errors, settings, logs). Nothing above.
"""
