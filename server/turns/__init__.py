"""One prompt's life: the turn and its bounded buffer (`turn`), running it against the agent
(`runner`), its durable, replayable log (`turn_log`), the client's questions
(`questions`), every session's transcripts (`transcripts`) and ACP to protobuf (`translate`).

May import: agents and the layers below. Never sessions: transcripts take a `LiveLogs`.
"""
