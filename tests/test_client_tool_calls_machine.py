"""Client tool calls as a state machine (Hypothesis): the agent's calls, the clients' answers
(right, late, unknown), expiry, CancelPrompt and the turn's end, in any interleaving, against the
real Questions and Turn on one event loop per case.

Invariants after every step:
- every call is settled once, by exactly one of: the client's answer, its expiry, a cancel; and
  the agent gets what settled it (the client's text, or an error saying timeout or cancelled);
- an answer to a settled call is refused saying how it was settled (answered, expired,
  cancelled), and an answer to an id never asked is REQUEST_NOT_FOUND;
- the open count is the calls not settled yet; each settled call's outcome event is in the
  turn once, after its request, with the same `decided_by` (none after the turn ended).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sessiongate.server.errors import RequestAnswered, RequestNotFound
from sessiongate.server.turns.questions import Questions, ToolAnswer, ToolAsk, ToolReport
from sessiongate.server.turns.turn import Turn, TurnEnd

TIMEOUT = 0.1  # the turn's permission timeout: a call unanswered this long expires


@dataclass
class Call:
    number: int
    task: asyncio.Task[ToolAnswer]
    request_id: str = ""
    asked_at: float = 0.0  # loop time of the call
    settled: str = ""  # "", or how: "client", "timeout", "cancelled"
    text: str = ""  # the client's answer, when it gave one


class ToolCalls(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.questions = Questions("s1")
        self.turn = self.loop.run_until_complete(self._turn())
        self.pushed: list[Any] = []
        push = self.turn.push

        def recorded(item: Any) -> None:
            self.pushed.append(item)
            push(item)

        self.turn.push = recorded  # type: ignore[method-assign]
        self.asker = self.questions.asker(self.turn)
        self.calls: list[Call] = []
        self.ended = False

    async def _turn(self) -> Turn:
        return Turn(stall_timeout=60, max_duration=60, permission_timeout=TIMEOUT)

    def settle_loop(self, seconds: float = 0.0, cancelled: bool = False) -> None:
        """Run the loop; a call may expire whenever the loop runs (a busy machine makes any step
        long), never before its timeout; after a cancel, every open call is cancelled."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.loop.run_until_complete(asyncio.sleep(0))
        for call in self.calls:
            if call.request_id and not call.settled and call.task.done():
                how = call.task.result().decided_by
                assert how == "timeout" or (cancelled and how == "cancelled"), call
                if how == "timeout":
                    assert self.loop.time() - call.asked_at >= TIMEOUT, f"{call} expired early"
                call.settled = how

    def teardown(self) -> None:
        for call in self.calls:
            call.task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    # ---- what happens -------------------------------------------------------------------

    @rule()
    def the_agent_calls(self) -> None:
        number = len(self.calls)
        task = self.loop.create_task(self.asker.client_tool("add", {"n": number}))
        call = Call(number, task, asked_at=self.loop.time())
        self.calls.append(call)
        self.settle_loop()
        asks = [i for i in self.pushed if isinstance(i, ToolAsk) and i.arguments == {"n": number}]
        if self.ended:  # a turn that ended asks nothing: the call is cancelled at once
            assert not asks
            call.settled = "cancelled"
            return
        assert len(asks) == 1
        call.request_id = asks[0].request_id

    @rule(data=st.data(), is_error=st.booleans())
    @precondition(lambda self: any(c.request_id for c in self.calls))
    def a_client_answers(self, data: st.DataObject, is_error: bool) -> None:
        call = data.draw(st.sampled_from([c for c in self.calls if c.request_id]))
        text = f"answer {call.number}"
        try:
            self.questions.answer_tool(call.request_id, ToolAnswer(text, None, is_error, "client"))
        except RequestAnswered as refused:
            # Settled already (or just now: it expired between our steps); it says how.
            if not call.settled:
                assert "expired" in str(refused), refused
                call.settled = "timeout"
            expected = {"client": "answered", "timeout": "expired", "cancelled": "cancelled"}[call.settled]
            assert expected in str(refused), (call, refused)
        else:
            assert not call.settled, f"{call} answered twice"
            call.settled, call.text = "client", text
        self.settle_loop()

    @rule(request_id=st.text(min_size=1, max_size=20))
    def a_client_answers_an_id_never_asked(self, request_id: str) -> None:
        if any(c.request_id == request_id for c in self.calls):
            return
        try:
            self.questions.answer_tool(request_id, ToolAnswer("x", None, False, "client"))
        except RequestNotFound:
            return
        raise AssertionError("an unknown request id was accepted")

    @rule(seconds=st.sampled_from([0.05, TIMEOUT + 0.1]))
    def time_passes(self, seconds: float) -> None:
        self.settle_loop(seconds)

    @rule()
    def cancel_prompt(self) -> None:
        self.questions.cancel_all()
        self._all_open_cancelled()

    @rule()
    @precondition(lambda self: not self.ended)
    def the_turn_ends(self) -> None:
        self.turn.end(TurnEnd("end_turn"))
        self.ended = True
        self.questions.cancel_all()  # as the runner does when a turn is over
        self._all_open_cancelled()

    def _all_open_cancelled(self) -> None:
        self.settle_loop(cancelled=True)
        assert all(call.settled for call in self.calls if call.request_id), "a call outlived the cancel"

    # ---- what must hold -----------------------------------------------------------------

    @invariant()
    def each_call_gets_what_settled_it(self) -> None:
        self.settle_loop()
        for call in self.calls:
            if not call.settled:
                assert not call.task.done(), f"{call} got an answer no one gave"
                continue
            assert call.task.done(), f"{call} is settled but the agent still waits"
            answer = call.task.result()
            assert answer.decided_by == call.settled, (call, answer)
            if call.settled == "client":
                assert answer.text == call.text
            else:
                assert answer.is_error

    @invariant()
    def open_count_is_the_unsettled_calls(self) -> None:
        assert self.questions.open_count == sum(1 for c in self.calls if not c.settled)

    @invariant()
    def each_settled_call_has_one_outcome_event_after_its_request(self) -> None:
        for call in self.calls:
            if not call.request_id:
                continue
            asked = next(
                i for i, item in enumerate(self.pushed) if getattr(item, "request_id", "") == call.request_id
            )
            reports = [
                (i, item)
                for i, item in enumerate(self.pushed)
                if isinstance(item, ToolReport) and item.request_id == call.request_id
            ]
            assert len(reports) <= 1
            if call.settled and not self.ended:
                assert reports, f"{call} settled with no outcome event"
            if reports:
                assert reports[0][0] > asked and reports[0][1].decided_by == call.settled


def test_client_tool_calls_state_machine() -> None:
    run_state_machine_as_test(
        ToolCalls,
        settings=settings(
            max_examples=15,
            stateful_step_count=12,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_request_ids_never_read_as_an_option_in_a_shell() -> None:
    """`sessiongate respond-tool SID ID` takes the id as an argument: one starting with "-" was an
    unknown option there (1 id in 64 before, from secrets.token_urlsafe)."""

    async def asked() -> list[str]:
        questions = Questions("s1")
        turn = Turn(stall_timeout=60, max_duration=60, permission_timeout=60)
        pushed: list[Any] = []
        turn.push = pushed.append  # type: ignore[method-assign, assignment]
        asker = questions.asker(turn)
        for _ in range(20):  # 20 x 50 calls: MAX_OPEN is 64
            calls = [asyncio.ensure_future(asker.client_tool("add", {})) for _ in range(50)]
            await asyncio.sleep(0)
            questions.cancel_all()
            await asyncio.gather(*calls)
        return [item.request_id for item in pushed if isinstance(item, ToolAsk)]

    ids = asyncio.run(asked())
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert not [i for i in ids if i.startswith("-")]
