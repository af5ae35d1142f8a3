"""`sessiongate`: the command-line client (also `python -m client`).

Exit codes follow the gRPC status of the failure, so scripts can branch on them:
0 ok, 1 internal or other error, 2 invalid arguments, 3 not found, 4 busy or pool
exhausted (retry later), 5 stalled or timed out, 6 unavailable (server or agent),
7 the agent needs credentials, 130 interrupted (the turn was cancelled), 141 output
closed early (e.g. `| head`; the turn was cancelled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from sessiongate.v1 import session_service_pb2 as pb

from client.errors import SessionGateError
from client.render import LiveRenderer
from client.sync import SessionClient

DEFAULT_TARGET = "localhost:50051"
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 4,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.FAILED_PRECONDITION: 7,
    grpc.StatusCode.UNAUTHENTICATED: 8,
    grpc.StatusCode.PERMISSION_DENIED: 9,
}
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other Unix tools


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    tls = {"tls_ca": opts.tls_ca, "client_cert": opts.tls_cert, "client_key": opts.tls_key}
    with SessionClient(opts.target, token=opts.token or None, **tls) as client:
        try:
            return int(opts.run(client, opts) or 0)
        except SessionGateError as error:
            _report(error, opts)
            return EXIT_CODES.get(error.code, 1)
        except KeyboardInterrupt:
            print("\ninterrupted: the turn was cancelled", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `| head`: the reader is gone, so is the turn (cancelled)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return EXIT_BROKEN_PIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessiongate", description="Drive ACP coding agents through sessiongate."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("SESSIONGATE_TARGET", DEFAULT_TARGET),
        help=f"server address (env SESSIONGATE_TARGET, default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SESSIONGATE_TOKEN", ""),
        help="bearer token for a server with authentication (env SESSIONGATE_TOKEN)",
    )
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (TLS)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS), with --tls-key")
    parser.add_argument(
        "--tls-key",
        help="PEM private key of --tls-cert",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        return sub

    command("agents", _agents, "list the configured agents")
    create = command("create", _create, "create a session; prints its id")
    _session_options(create)
    prompt = command("prompt", _prompt, "send a prompt and show the turn live")
    prompt.add_argument("text", nargs="*", help="prompt text (default: --file, else standard input)")
    prompt.add_argument("--session", help="session id (default: create a session first)")
    prompt.add_argument("--file", help="read the prompt from this file ('-' for standard input)")
    prompt.add_argument("--stall-timeout", type=float, help="seconds without an agent event before giving up")
    prompt.add_argument("--wait", type=float, help="seconds to wait for a busy session (default: fail fast)")
    _session_options(prompt)
    command("cancel", _cancel, "cancel the running turn of a session").add_argument("session")
    command("get", _get, "show one session").add_argument("session")
    listing = command("list", _list, "list sessions")
    listing.add_argument("--agent", default="", help="only this agent's sessions")
    listing.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="only with this label"
    )
    command("close", _close, "close a session and stop its agent").add_argument("session")
    health = command("health", _health, "check the server's health")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    return parser


def _session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", default="", help="agent name (default: the server's default agent)")
    parser.add_argument("--cwd", default="", help="working directory for the agent")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label, repeatable")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"sessiongate: --label needs KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


# ---- commands ------------------------------------------------------------------------------


def _agents(client: SessionClient, opts: argparse.Namespace) -> None:
    response = client.list_agents()
    if opts.json:
        print(_json(response))
        return
    for agent in response.agents:
        default = "  (default)" if agent.is_default else ""
        print(
            f"{agent.name:<16} {agent.permission_policy:<14} {agent.command} {' '.join(agent.args)}{default}"
        )


def _create(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.create_session(opts.agent, opts.cwd, labels=_labels(opts.label))
    print(_json(session) if opts.json else session.session_id)


def _prompt(client: SessionClient, opts: argparse.Namespace) -> None:
    text = _prompt_text(opts)
    session_id = opts.session
    if not session_id:
        session_id = client.create_session(opts.agent, opts.cwd, labels=_labels(opts.label)).session_id
        print(f"session {session_id}", file=sys.stderr)
    events = client.prompt(session_id, text, stall_timeout=opts.stall_timeout, wait_timeout=opts.wait)
    if opts.json:
        for event in events:
            print(_json(event), flush=True)
        return
    renderer = LiveRenderer(sys.stdout, terminal=sys.stdout.isatty())
    for event in events:
        renderer.event(event)


def _prompt_text(opts: argparse.Namespace) -> str:
    if opts.text:
        return " ".join(opts.text)
    if opts.file and opts.file != "-":
        with open(opts.file, encoding="utf-8") as handle:
            return handle.read()
    if not opts.file and sys.stdin.isatty():
        raise SystemExit("sessiongate: give the prompt as arguments, with --file, or on standard input")
    return sys.stdin.read()


def _cancel(client: SessionClient, opts: argparse.Namespace) -> None:
    cancelled = client.cancel_prompt(opts.session)
    print(
        json.dumps({"cancelled": cancelled})
        if opts.json
        else ("cancelled" if cancelled else "no turn was running")
    )


def _get(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.get_session(opts.session)
    if opts.json:
        print(_json(session))
        return
    for key, value in json_format.MessageToDict(session, preserving_proto_field_name=True).items():
        print(f"{key:<18} {value}")


def _list(client: SessionClient, opts: argparse.Namespace) -> None:
    sessions = client.list_sessions(agent=opts.agent, labels=_labels(opts.label))
    if opts.json:
        for session in sessions:
            print(_json(session))
        return
    print(f"{'SESSION':<26} {'AGENT':<12} {'STATE':<11} {'LAST ACTIVE':<20} LABELS")
    for s in sessions:
        state = pb.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower()
        active = s.last_active_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.session_id:<26} {s.agent:<12} {state:<11} {active:<20} {labels}")


def _close(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.close_session(opts.session)
    print(_json(session) if opts.json else f"closed {session.session_id}")


def _health(client: SessionClient, opts: argparse.Namespace) -> int:
    status = client.health(opts.service)
    print(json.dumps({"status": status}) if opts.json else status)
    return 0 if status == "SERVING" else EXIT_CODES[grpc.StatusCode.UNAVAILABLE]


# ---- errors --------------------------------------------------------------------------------


def _report(error: SessionGateError, opts: argparse.Namespace, out: TextIO = sys.stderr) -> None:
    if getattr(opts, "json", False):
        print(
            json.dumps(
                {
                    "error": {
                        "code": error.code.name,
                        "reason": error.reason,
                        "message": error.message,
                        "metadata": error.metadata,
                        "retry_delay": error.retry_delay,
                        "violations": error.violations,
                    }
                }
            )
        )
    reason = f" {error.reason}" if error.reason else ""
    print(f"error: {error.code.name}{reason}: {error.message}", file=out)
    for field, description in error.violations.items():
        print(f"  {field}: {description}", file=out)
    hint = _hint(error, opts)
    if hint:
        print(f"hint: {hint}", file=out)


def _hint(error: SessionGateError, opts: argparse.Namespace) -> str:
    retry = f"retry in {error.retry_delay:g}s" if error.retry_delay is not None else "retry later"
    session = getattr(opts, "session", None) or "SESSION"
    hints = {
        "SESSION_BUSY": f"a turn is running on this session: {retry}, pass --wait SECONDS, "
        f"or stop it with `sessiongate cancel {session}`",
        "POOL_EXHAUSTED": f"every agent slot is busy: {retry}, or close sessions you no longer need",
        "STREAM_STALLED": "the agent went silent; the turn was cancelled and the session is usable again "
        "(raise --stall-timeout for slow agents)",
        "TURN_TIMEOUT": "the turn hit the server's maximum turn duration; the session is usable again",
        "SESSION_NOT_FOUND": "see the sessions that exist with `sessiongate list`",
        "AGENT_UNAVAILABLE": "the agent could not start: check its command in the server config, "
        "and the server log",
        "AGENT_AUTH_REQUIRED": "the agent needs credentials (auth methods: "
        f"{error.metadata.get('auth_methods', '?')}); set them in the agent's `env` in the server config",
        "AGENT_EXITED": f"the agent exited (code {error.metadata.get('exit_code', '?')}); "
        "the next prompt restarts it",
        "AGENT_ERROR": "the agent rejected the turn; see the message above",
        "AGENT_PROTOCOL_ERROR": "the agent broke the ACP protocol (a bug in the agent); "
        "the session is usable again",
        "STORE_UNAVAILABLE": "the server could not write its session database: see its log; retry later",
        "UNAUTHENTICATED": "the server wants a valid token: pass --token or set SESSIONGATE_TOKEN",
        "QUOTA_EXCEEDED": f"a quota is used up: close sessions you no longer need, or {retry}",
        "AGENT_NOT_ALLOWED": "your principal may not use this agent; see `sessiongate agents` for others",
        "CWD_NOT_ALLOWED": "the session's directory is outside the server's allowed roots now (or gone); "
        "the session is kept: restore the directory, or close it",
        "SHUTTING_DOWN": "the server is draining: retry shortly, or against another instance",
    }
    if error.reason in hints:
        return hints[error.reason]
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return f"is the server running at {opts.target}? (--target or SESSIONGATE_TARGET)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
