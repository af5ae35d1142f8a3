"""Sessions: one session and its lock, turns and agent (`session`), the work a session's
owner holds (`owner`), and the pool: the map of sessions, their creation, restore and
eviction (`pool`).

May import: turns, agents and the layers below.
"""
