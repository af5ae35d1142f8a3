"""How a Prompt travels through the server: the modules it enters and the moves between them.

Starts a server in this process on the built-in agent (its own state in a temp dir), creates a
session, and traces one Prompt call from the first event to the result with `sys.setprofile`:
every Python call whose function lives in the server package counts. A move is a call from
one server module into another; "back up" is a move into a module of a higher layer
(tests/test_layers.py holds the order).

    .venv/bin/python scripts/prompt_path.py [--prefix sessiongate.server] [--edges]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Tracer:
    """Counts calls between modules whose names start with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.modules: collections.Counter[str] = collections.Counter()
        self.moves: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(self.prefix):
            return
        self.modules[module] += 1
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith(self.prefix):
            caller = caller.f_back  # through the event loop, grpc and the SDK to our own caller
        if caller is not None and (source := caller.f_globals["__name__"]) != module:
            self.moves[(source, module)] += 1


async def measure(prefix: str, config: str | None) -> Tracer:
    settings_module = __import__(f"{prefix}.settings", fromlist=["load_settings"])
    app = __import__(f"{prefix}.app", fromlist=["start_server"])
    with tempfile.TemporaryDirectory() as tmp:
        work, state = Path(tmp, "work"), Path(tmp, "state")  # the state never inside a workdir
        work.mkdir()  # noqa: ASYNC240 (before the server starts: nothing else runs yet)
        argv = ["--listen", "127.0.0.1:0", "--state-db", str(state / "s.db"), "--workdir", str(work)]
        argv += ["--config", config] if config else []
        settings = settings_module.load_settings(argv, environ={"XDG_STATE_HOME": str(state)})
        running = await app.start_server(settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.SessionServiceStub(channel)
                session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
                sid = session.session_id
                async for _ in stub.Prompt(pb.PromptRequest(session_id=sid, text="warm up"), timeout=30):
                    pass
                tracer = Tracer(prefix)
                sys.setprofile(tracer)
                try:
                    async for _ in stub.Prompt(pb.PromptRequest(session_id=sid, text="hello"), timeout=30):
                        pass
                finally:
                    sys.setprofile(None)
        finally:
            await running.stop_now()
    return tracer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="sessiongate.server", help="the server package's name")
    parser.add_argument("--config", help="a config file (e.g. another checkout's echo agent)")
    parser.add_argument("--edges", action="store_true", help="list every module-to-module move")
    opts = parser.parse_args()
    tracer = asyncio.run(measure(opts.prefix, opts.config))
    modules = sorted(m.removeprefix(opts.prefix + ".") for m in tracer.modules)
    print(f"modules entered: {len(modules)}")
    print("  " + " ".join(modules))
    print(f"distinct moves between modules: {len(tracer.moves)} ({sum(tracer.moves.values())} calls)")
    if opts.edges:
        for (source, target), count in sorted(tracer.moves.items()):
            short = opts.prefix + "."
            print(f"  {source.removeprefix(short)} -> {target.removeprefix(short)}  ({count})")


if __name__ == "__main__":
    main()
