"""The turn's buffer is bounded in bytes as well as in items (server/turns/turn.py): a flood of
large chunks holds the agent back on its pipe once a few MiB are buffered, not 256 chunks
of up to 64 MiB each; and once nobody reads, the same bound drops the rest.

The agent here stands in for the transport: it pushes while its reading is not paused,
as AgentTransport does (one line at a time, checking the pause before each).
"""

from __future__ import annotations

import acp
from sessiongate.server.turns import turn as turn_module
from sessiongate.server.turns.turn import TextRun, Turn, TurnEnd, item_bytes

CHUNK = 1_000_000  # characters of one flood chunk (1 MB, as `/flood 40 1000000` sends)
BOUND = turn_module.HIGH_WATER_BYTES + CHUNK + turn_module.ITEM_BYTES  # the high water plus one


class PipeAgent:
    """Just the backpressure side of an agent process."""

    def __init__(self) -> None:
        self.reading_paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.reading_paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading_paused = False


def chunk(index: int) -> object:
    return acp.update_agent_message_text(f"{index:08d}".ljust(CHUNK, "x"))


async def test_a_flood_of_large_chunks_is_held_back_by_bytes() -> None:
    """A reader that does not read: the agent is paused with a few MiB buffered (it used to
    be paused only at 256 chunks: 256 MB here, 16 GiB of 64 MiB lines)."""
    agent = PipeAgent()
    turn = Turn(stall_timeout=60, max_duration=600, agent=agent)  # type: ignore[arg-type]
    sent = 0
    while sent < 40 and not agent.reading_paused:
        turn.push(chunk(sent))
        sent += 1
    assert agent.reading_paused, f"{sent} chunks buffered, {turn.buffered_bytes()} bytes, and not held back"
    assert turn.buffered_bytes() <= BOUND
    assert sent <= turn_module.HIGH_WATER_BYTES // CHUNK + 1
    assert turn.buffered_bytes() == sum(item_bytes(i) for i in turn._items)


async def test_a_slow_reader_gets_every_chunk_in_order_within_the_bound() -> None:
    """Read one, push while allowed, and so on: every chunk arrives, in order, the buffer
    never over the bound, and the agent is let go again once the buffer drained."""
    agent = PipeAgent()
    turn = Turn(stall_timeout=60, max_duration=600, agent=agent)  # type: ignore[arg-type]
    total, sent, received = 40, 0, list[int]()
    while len(received) < total:
        while sent < total and not agent.reading_paused:
            turn.push(chunk(sent))
            sent += 1
            assert turn.buffered_bytes() <= BOUND
        item = await turn.next()
        text = item.text if isinstance(item, TextRun) else item.content.text
        while text:  # coalesced or split: cut back into chunks
            received.append(int(text[:8]))
            text = text[CHUNK:]
    assert received == list(range(total))
    assert agent.pauses > 1 and not agent.reading_paused
    assert turn.buffered() == 0 and turn.buffered_bytes() == 0


async def test_nobody_reading_drops_past_the_byte_bound_and_the_end_gets_through() -> None:
    agent = PipeAgent()
    turn = Turn(stall_timeout=60, max_duration=600, agent=agent)  # type: ignore[arg-type]
    turn.stop_holding_back()
    for index in range(40):
        turn.push(chunk(index))
        assert turn.buffered_bytes() <= BOUND
    assert not agent.reading_paused
    assert turn.dropped >= 40 - BOUND // CHUNK
    turn.end(TurnEnd("end_turn"))
    items = [await turn.next() for _ in range(turn.buffered())]
    assert items[-1] == TurnEnd("end_turn")
    assert turn.buffered_bytes() == 0


def test_sizes_are_estimated_from_strings_for_any_update() -> None:
    big = "d" * 500_000
    update = acp.schema.ToolCallStart(
        session_update="tool_call",
        tool_call_id="t1",
        title="edit",
        content=[acp.schema.FileEditToolCallContent(type="diff", path="/w/a", old_text=big, new_text=big)],
    )
    assert 1_000_000 <= item_bytes(update) < 1_010_000
    assert item_bytes(acp.update_agent_message_text("abc")) < 100
