"""A deliberately broken ACP agent for the tests: `python -m tests.misbehaving_agent`.

It speaks raw JSON-RPC 2.0 over stdio (one JSON message a line, no SDK) so that it can break
the protocol in ways an SDK-built agent cannot. Without a directive a turn streams the
prompt text back as one `agent_message_chunk` and ends with `end_turn`. The prompt text's
first word picks a misbehaviour (issue 9):

  /garbage N       N lines that are not JSON in one write, then a normal reply "after garbage"
  /garbageforever  one chunk "garbage follows", then lines that are not JSON as fast as it can
                   until session/cancel; then `cancelled` (the benchmark's noisy neighbour)
  /closeout        close stdout and stay alive (stdin still read): the connection is gone,
                   the process is not
  /nonobject VALUE one line VALUE (valid JSON that is not an object: null, [1,2], 5), then silence
  /listid          answer the prompt with a response whose id is a list, then silence
  /badresult       answer the prompt with {"stopReason": "bogus"}
  /deep N          a tool_call whose rawInput, and a message chunk whose _meta, nest N levels
                   deep; then a reply chunk "still here"
  /unknown         a session/update of a kind no ACP version has ("future_update_kind")
  /bigchunk MB     one agent_message_chunk of MB megabytes (PATTERN repeated)
  /bigtool MB      a tool_call whose rawInput holds an MB-megabyte string
  /planflood [N]   plan updates (of N entries, default 1) as fast as it can, forever; ignores
                   session/cancel
  /terminal        calls terminal/create, terminal/output and terminal/kill on the client and
                   replies with what each returned ("METHOD: error CODE" or "METHOD: result JSON")
  /grandchild      starts `sleep 300` in a new session (it leaves the process group), replies
                   "spawned PID"
  /reads N PATH    N fs/read_text_file requests for PATH at once, reading the answers; replies
                   "read OK of N: BYTES bytes" (OK answers with content, BYTES of it in all)
  /readflood N PATH  stops reading its stdin, then sends N fs/read_text_file requests for PATH
                   at once; then silence (it cannot even see a cancel)

The silent directives (/nonobject, /listid) and /garbageforever answer a session/cancel
with `cancelled`; /planflood ignores it; received cancels are noted on stderr. With
MISBEHAVING_PID_FILE set, the agent appends "agent PID" at start and "grandchild PID" for
each grandchild.
Start-up option: --protocol-version N (what `initialize` answers; default 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

AGENT_NAME = "misbehaving"
PATTERN = "0123456789abcdef"  # bulk text is this repeated, so concatenation can be checked
MIB = 1024 * 1024
METHOD_NOT_FOUND = -32601
ANSWER_TIMEOUT = 10.0  # seconds to wait for the client's answer to one of our requests
FLOOD_BATCH = 256  # plan updates per write: as fast as a pipe takes them
GARBAGE_BATCH = 4096  # lines per write of /garbageforever
SILENCE = 3600.0  # how long a silent directive waits (for a cancel) before giving up


def nested(depth: int, leaf: Any = "bottom") -> Any:
    """{"a": {"a": ... leaf}} with `depth` levels of objects."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def bulk(megabytes: float) -> str:
    return PATTERN * int(megabytes * MIB / len(PATTERN))


class Turn:
    """One running session/prompt request."""

    def __init__(self, request_id: Any, session_id: str) -> None:
        self.request_id = request_id
        self.session_id = session_id
        self.cancelled = threading.Event()


class Agent:
    def __init__(self, protocol_version: int) -> None:
        self.protocol_version = protocol_version
        self._write_lock = threading.Lock()
        self._turns: dict[str, Turn] = {}
        self._answers: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._pid_file = os.environ.get("MISBEHAVING_PID_FILE", "")
        self._stdout_closed = False  # fd 1 may be reused by a later open(): never write to it then
        self._deaf = threading.Event()  # set: stdin is read no more (/readflood)

    # ---- output --------------------------------------------------------------------------

    def write_raw(self, text: str) -> None:
        """Write to stdout at once (unbuffered); once stdout is closed, writes are dropped."""
        data = memoryview(text.encode())
        with self._write_lock:
            try:
                while data and not self._stdout_closed:
                    data = data[os.write(1, data) :]
            except OSError:  # the reader is gone: stop writing (and flooding) for good
                self._stdout_closed = True

    def send(self, message: dict[str, Any]) -> None:
        self.write_raw(json.dumps({"jsonrpc": "2.0", **message}, separators=(",", ":")) + "\n")

    def answer(self, request_id: Any, result: Any) -> None:
        self.send({"id": request_id, "result": result})

    def update(self, turn: Turn, update: dict[str, Any]) -> None:
        self.send({"method": "session/update", "params": {"sessionId": turn.session_id, "update": update}})

    def plan_line(self, turn: Turn, step: int, entries: int) -> str:
        plan = [
            {"content": f"step {step}.{n}", "priority": "medium", "status": "pending"} for n in range(entries)
        ]
        params = {"sessionId": turn.session_id, "update": {"sessionUpdate": "plan", "entries": plan}}
        return json.dumps({"jsonrpc": "2.0", "method": "session/update", "params": params}) + "\n"

    def say(self, turn: Turn, text: str, **extra: Any) -> None:
        content = {"type": "text", "text": text}
        self.update(turn, {"sessionUpdate": "agent_message_chunk", "content": content, **extra})

    def end_turn(self, turn: Turn, stop_reason: str = "end_turn") -> None:
        self._turns.pop(turn.session_id, None)
        self.answer(turn.request_id, {"stopReason": stop_reason})

    def request(self, method: str, params: dict[str, Any]) -> tuple[threading.Event, list[dict[str, Any]]]:
        """Send a request to the client; its answer lands in the box once the event is set."""
        request_id = f"misbehaving-{next(self._ids)}"
        waiter = self._answers[request_id] = (threading.Event(), [])
        self.send({"id": request_id, "method": method, "params": params})
        return waiter

    def call_client(self, method: str, params: dict[str, Any]) -> str:
        """Send a request to the client and describe its answer."""
        done, box = self.request(method, params)
        if not done.wait(ANSWER_TIMEOUT):
            return f"{method}: no answer"
        reply = box[0]
        if "error" in reply:
            return f"{method}: error {reply['error'].get('code')}"
        return f"{method}: result {json.dumps(reply.get('result'))}"

    def note_pid(self, role: str, pid: int) -> None:
        if self._pid_file:
            with open(self._pid_file, "a") as handle:
                handle.write(f"{role} {pid}\n")

    # ---- input ---------------------------------------------------------------------------

    def run(self) -> None:
        self.note_pid("agent", os.getpid())
        for line in sys.stdin.buffer:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self.dispatch(message)
            if self._deaf.is_set():
                threading.Event().wait(SILENCE)  # what the gateway writes to us piles up

    def dispatch(self, message: dict[str, Any]) -> None:
        method, request_id, params = message.get("method"), message.get("id"), message.get("params") or {}
        if method is None:  # an answer to one of our requests
            waiter = self._answers.pop(str(request_id), None)
            if waiter is not None:
                waiter[1].append(message)
                waiter[0].set()
        elif method == "session/cancel":
            session_id = str(params.get("sessionId"))
            print(f"misbehaving agent: cancel {session_id}", file=sys.stderr, flush=True)
            turn = self._turns.get(session_id)
            if turn is not None:
                turn.cancelled.set()
        elif request_id is None:
            pass  # a notification we do not know
        elif method == "initialize":
            info = {"name": AGENT_NAME, "version": "0.0.1"}
            self.answer(
                request_id,
                {"protocolVersion": self.protocol_version, "agentCapabilities": {}, "agentInfo": info},
            )
        elif method == "session/new":
            self.answer(request_id, {"sessionId": f"bad-{uuid.uuid4().hex}"})
        elif method == "session/prompt":
            turn = Turn(request_id, str(params.get("sessionId")))
            self._turns[turn.session_id] = turn
            text = " ".join(
                block.get("text", "")
                for block in params.get("prompt") or []
                if isinstance(block, dict) and block.get("type") == "text"
            ).strip()
            if text.startswith("/readflood "):
                self._deaf.set()  # before the run loop reads on: not even the first answer is read
            threading.Thread(target=self.prompt, args=(turn, text), daemon=True).start()
        else:
            error = {"code": METHOD_NOT_FOUND, "message": f"method not found: {method}"}
            self.send({"id": request_id, "error": error})

    # ---- turns ---------------------------------------------------------------------------

    def prompt(self, turn: Turn, text: str) -> None:
        directive, _sep, rest = text.partition(" ")
        arg = rest.strip()
        if directive == "/garbage":
            count = int(arg or 100_000)
            self.write_raw("".join(f"this is not json {n}\n" for n in range(count)))
            self.say(turn, "after garbage")
        elif directive == "/garbageforever":
            self.say(turn, "garbage follows")
            block = "".join(f"this is not json {n}\n" for n in range(GARBAGE_BATCH))
            while not turn.cancelled.is_set() and not self._stdout_closed:
                self.write_raw(block)
            self.end_turn(turn, "cancelled")
            return
        elif directive == "/closeout":
            with self._write_lock:
                os.close(1)
                self._stdout_closed = True
            threading.Event().wait(SILENCE)
            return
        elif directive == "/nonobject":
            self.write_raw((arg or "null") + "\n")
            self.silence(turn)
            return
        elif directive == "/listid":
            self.write_raw('{"jsonrpc":"2.0","id":[1],"result":{"stopReason":"end_turn"}}\n')
            self.silence(turn)
            return
        elif directive == "/badresult":
            self.end_turn(turn, "bogus")
            return
        elif directive == "/deep":
            depth = int(arg or 40)
            self.update(
                turn,
                {
                    "sessionUpdate": "tool_call",
                    "toolCallId": "deep-1",
                    "title": "A deeply nested input",
                    "kind": "other",
                    "status": "pending",
                    "rawInput": nested(depth),
                },
            )
            self.say(turn, "deep meta ", _meta=nested(depth))
            self.say(turn, "still here")
        elif directive == "/unknown":
            self.update(
                turn,
                {"sessionUpdate": "future_update_kind", "answer": 42, "detail": {"nested": ["x", "y"]}},
            )
            self.say(turn, "after unknown")
        elif directive == "/bigchunk":
            self.say(turn, bulk(float(arg or 20)))
        elif directive == "/bigtool":
            self.update(
                turn,
                {
                    "sessionUpdate": "tool_call",
                    "toolCallId": "big-1",
                    "title": "A huge input",
                    "kind": "other",
                    "status": "pending",
                    "rawInput": {"blob": bulk(float(arg or 8))},
                },
            )
        elif directive == "/planflood":
            entries = int(arg or 1)
            for n in itertools.count():  # until the gateway kills us (or stops reading); no cancel
                if self._stdout_closed:
                    break
                self.write_raw(
                    "".join(self.plan_line(turn, n * FLOOD_BATCH + i, entries) for i in range(FLOOD_BATCH))
                )
        elif directive == "/terminal":
            terminal = {"sessionId": turn.session_id, "terminalId": "term-1"}
            got = [
                self.call_client(
                    "terminal/create", {"sessionId": turn.session_id, "command": "echo", "args": ["hi"]}
                ),
                self.call_client("terminal/output", terminal),
                self.call_client("terminal/kill", terminal),
            ]
            self.say(turn, "; ".join(got))
        elif directive in ("/reads", "/readflood"):
            many, _sep, path = arg.partition(" ")
            params = {"sessionId": turn.session_id, "path": path}
            waiters = [self.request("fs/read_text_file", params) for _ in range(int(many))]
            if directive == "/readflood":
                self.silence(turn)
                return
            contents = [
                box[0].get("result", {}).get("content") if done.wait(ANSWER_TIMEOUT) else None
                for done, box in waiters
            ]
            got = [c for c in contents if isinstance(c, str)]
            self.say(turn, f"read {len(got)} of {many}: {sum(map(len, got))} bytes")
        elif directive == "/grandchild":
            child = subprocess.Popen(
                ["sleep", "300"],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.note_pid("grandchild", child.pid)
            self.say(turn, f"spawned {child.pid}")
        else:
            self.say(turn, text)
        self.end_turn(turn)

    def silence(self, turn: Turn) -> None:
        """Say nothing more; a session/cancel still ends the turn (`cancelled`)."""
        if turn.cancelled.wait(SILENCE):
            self.end_turn(turn, "cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--protocol-version", type=int, default=1)
    opts = parser.parse_args()
    Agent(opts.protocol_version).run()
    os._exit(0)  # daemon threads may be blocked writing: do not wait on them at exit


if __name__ == "__main__":
    main()
