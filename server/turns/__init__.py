"""One prompt's life: the turn and its bounded buffer (`turn`), running it against the agent
(`runner`), its durable, replayable log (`turn_log`), the client's questions
(`questions`) and the tools it serves the agent (`client_tools`, an MCP server behind the
session's socket), every session's transcripts (`transcripts`) and ACP to protobuf (`translate`).

May import: agents and the layers below. Never sessions: transcripts take a `LiveLogs`.
"""
