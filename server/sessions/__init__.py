"""Sessions: one session and its lock, turns and agent (`session`), the lock on a session's
work (`lock`), and the pool: the map of sessions, their creation, restore and
eviction (`pool`).

May import: turns, agents and the layers below.
"""
