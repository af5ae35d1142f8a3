"""The built-in reference ACP agent: `python -m sessiongate.echo`.

A demo and a test agent, not part of the gateway: it speaks ACP over stdio with the same SDK
any agent would use, and its directives (`/sleep`, `/stall`, `/permission`, ...) let the tests
and a new user drive every path of the gateway without credentials. agent.py is the agent;
mcp_client.py reaches its sessions' MCP servers (`/mcp`) with the official `mcp` SDK.
"""
