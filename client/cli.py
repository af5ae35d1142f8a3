"""`sessiongate`: the command-line client (also `python -m sessiongate.client`).

Exit codes follow the gRPC status of the failure, so scripts can branch on them:
0 ok, 1 internal or other error, 2 invalid arguments (also: a turn that would ask you for
permission, off a terminal; a `watch --from` older than what the turn keeps), 3 not found,
4 busy or pool exhausted (retry later), 5 stalled or timed out, 6 unavailable (server or
agent; also a call the server ended, e.g. shutting down), 7 a failed precondition (the agent
needs credentials, or refused or does not offer a mode, config option, auth method or an MCP
server's transport), 8 no valid token, 9 not allowed (an agent, an MCP server), 130
interrupted (the turn was cancelled, except after `prompt --detach` or during `watch`: then it
runs on), 141 output closed early (e.g. `| head`; the turn was cancelled unless detached).

The shared options (--target, --token, --tls-*, --json) go before or after the command.
`sessiongate completion bash|zsh|tcsh` prints a shell completion script (made by shtab).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO, TypeVar

import grpc
import shtab
from google.protobuf import json_format
from google.protobuf.message import Message
from sessiongate.client.errors import SessionGateError, transport_failure
from sessiongate.client.mcp import (
    McpConfigError,
    McpHttpServer,
    McpSseServer,
    McpStdioServer,
    check_unique,
    load_mcp_config,
    shown_name,
)
from sessiongate.client.render import LiveRenderer, printable, usage_text
from sessiongate.client.sync import SessionClient, TurnEvents
from sessiongate.client.terminal import TerminalAsker, decline
from sessiongate.client.tools import Tool, ToolsFileError, load_tools
from sessiongate.v1 import session_service_pb2 as pb

DEFAULT_TARGET = "localhost:50051"
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.OUT_OF_RANGE: 2,  # watch --from older than what the turn keeps
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 4,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    # Only the server (or a proxy, or the transport) ends a call CANCELLED: when the CLI stops a
    # turn it exits 130 or 141 without a status. A server shutting down does it, so: unavailable.
    grpc.StatusCode.CANCELLED: 6,
    grpc.StatusCode.FAILED_PRECONDITION: 7,
    grpc.StatusCode.UNAUTHENTICATED: 8,
    grpc.StatusCode.PERMISSION_DENIED: 9,
}
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other Unix tools
T = TypeVar("T")
POLICY_FLAGS = "--approve-all, --approve-reads or --deny-all"
SHELLS = ("bash", "zsh", "tcsh")  # the shells shtab writes completion scripts for


class UsageError(SessionGateError):
    """A command that cannot work as given, found out before (or instead of) a call."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.hint = hint


def main(argv: Sequence[str] | None = None) -> int:
    opts, extra = _parser().parse_known_args(argv)
    if extra:  # the command's own usage, not the top-level one
        opts.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _shared_defaults(opts)
    if opts.run is _completion:  # no server involved
        return _completion(opts)
    if opts.run is _acp:  # an ACP agent on stdin/stdout, on its own event loop
        return _acp(opts)
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


def _shared_options() -> argparse.ArgumentParser:
    """Options of every command, accepted before or after the command name. Their defaults are
    suppressed (filled in by `_shared_defaults`), so one position does not undo the other."""
    shared = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    shared.add_argument("--target", help=f"server address (env SESSIONGATE_TARGET, default {DEFAULT_TARGET})")
    shared.add_argument(
        "--token",
        help="bearer token for a server with authentication (env SESSIONGATE_TOKEN); as --token=T, "
        "a token that starts with '-' is not read as an option",
    )
    shared.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (TLS)")
    shared.add_argument("--tls-cert", help="PEM client certificate (mTLS), with --tls-key")
    shared.add_argument("--tls-key", help="PEM private key of --tls-cert")
    shared.add_argument("--json", action="store_true", help="print JSON instead of text")
    return shared


def _shared_defaults(opts: argparse.Namespace) -> None:
    defaults = {
        "target": os.environ.get("SESSIONGATE_TARGET", DEFAULT_TARGET),
        "token": os.environ.get("SESSIONGATE_TOKEN", ""),
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
        "json": False,
    }
    for name, value in defaults.items():
        if not hasattr(opts, name):
            setattr(opts, name, value)


def _parser() -> argparse.ArgumentParser:
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="sessiongate", description="Drive ACP coding agents through sessiongate.", parents=[shared]
    )
    parser.add_argument("--version", action="version", version=f"sessiongate {version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[shared])
        sub.set_defaults(run=run, command_parser=sub)
        return sub

    command("agents", _agents, "list the configured agents")
    front = command(
        "acp",
        _acp,
        "be an ACP agent on stdin/stdout whose sessions are the gateway's (an editor's agent command)",
    )
    front.add_argument("--agent", help="the gateway agent new sessions use (default: the gateway's default)")
    front.add_argument("--label", action="append", metavar="K=V", help="a label for every session it creates")
    front.add_argument(
        "--permission-policy",
        default="ask",
        choices=("ask", "approve-all", "approve-reads", "deny-all", ""),
        help="who decides the agent's permission requests: ask (the editor, the default), a gateway "
        "policy, or '' for the agent's own",
    )
    create = command("create", _create, "create a session; prints its id")
    _session_options(create)
    prompt = command("prompt", _prompt, "send a prompt and show the turn live")
    prompt.add_argument("text", nargs="*", help="prompt text (default: --file, else standard input)")
    prompt.add_argument("--session", help="session id (default: create a session first)")
    prompt.add_argument("--file", help="read the prompt from this file ('-' for standard input)")
    prompt.add_argument("--stall-timeout", type=float, help="seconds without an agent event before giving up")
    prompt.add_argument("--wait", type=float, help="seconds to wait for a busy session (default: fail fast)")
    policy = prompt.add_mutually_exclusive_group()
    for flag, what in (
        ("approve-all", "approve every permission request of this turn"),
        ("approve-reads", "approve reads, reject edits and other changes"),
        ("deny-all", "reject every permission request of this turn"),
        ("ask", "ask me on the terminal (needs one); default: the agent's policy"),
    ):
        policy.add_argument(f"--{flag}", dest="policy", action="store_const", const=flag, help=what)
    prompt.add_argument(
        "--permission-timeout", type=float, help="seconds a question waits for your answer (with ask)"
    )
    prompt.add_argument(
        "--detach",
        action="store_true",
        help="the turn runs on if this command stops (Ctrl-C, a lost connection): "
        "re-attach with `sessiongate watch`",
    )
    _session_options(prompt)
    watch = command("watch", _watch, "show a turn's events live, from a seq on (the turn is not taken)")
    watch.add_argument("session")
    watch.add_argument(
        "--from",
        dest="after_seq",
        type=_seq,
        default=0,
        metavar="SEQ",
        help="show the events after this seq (the last one you saw; default 0: from the start)",
    )
    watch.add_argument("--turn", default="", help="turn id (default: the running turn, else the last one)")
    history = command("history", _history, "list a session's turns, or show one turn with its events")
    history.add_argument("session")
    history.add_argument("turn", nargs="?", default="", help="a turn id: show its prompt and events")
    respond_tool = command(
        "respond-tool", _respond_tool, "answer a call of one of a session's client tools (a `? tool` line)"
    )
    respond_tool.add_argument("session")
    respond_tool.add_argument("request", help="the call's request id")
    answer = respond_tool.add_mutually_exclusive_group(required=True)
    answer.add_argument("--result", metavar="TEXT", help="the tool's result, as text for the model")
    answer.add_argument(
        "--result-json",
        metavar="JSON_OBJECT",
        help="the tool's result as a JSON object (structured content, and its JSON text)",
    )
    answer.add_argument("--error", metavar="TEXT", help="the tool failed: the text the agent gets")
    command("cancel", _cancel, "cancel the running turn of a session").add_argument("session")
    command("get", _get, "show one session").add_argument("session")
    listing = command("list", _list, "list sessions")
    listing.add_argument("--agent", default="", help="only this agent's sessions")
    listing.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="only with this label"
    )
    command("close", _close, "close a session and stop its agent").add_argument("session")
    mode = command("mode", _mode, "switch a session's mode (see `get` for its modes)")
    mode.add_argument("session")
    mode.add_argument("mode", help="a mode id")
    config = command("config", _config, "set a session config option, e.g. the model")
    config.add_argument("session")
    config.add_argument("key", help="the config option's id")
    config.add_argument("value", help="one of its values (true/false for a boolean option)")
    auth = command("auth", _auth, "authenticate an agent with one of its auth methods (admins)")
    auth.add_argument("agent", help="agent name ('' for the default agent)")
    auth.add_argument("method", help="auth method id (AGENT_AUTH_REQUIRED lists them)")
    health = command("health", _health, "check the server's health")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    completion = command("completion", _completion, "print a shell completion script (see its help)")
    completion.description = (
        "Print the completion script for SHELL. bash: `sessiongate completion bash > "
        "~/.local/share/bash-completion/completions/sessiongate`; zsh: `sessiongate completion zsh > "
        "~/.zfunc/_sessiongate` with ~/.zfunc in $fpath before compinit; tcsh: "
        "`sessiongate completion tcsh > ~/.sessiongate.tcsh` and `source` it from ~/.tcshrc."
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="|".join(SHELLS))
    for action in parser._actions + [a for p in commands.choices.values() for a in p._actions]:
        if action.dest in ("file", "tls_ca", "tls_cert", "tls_key", "mcp_config", "client_tools"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]  # shtab reads this attribute
        elif action.dest == "cwd":
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return parser


def version() -> str:
    """The installed sessiongate distribution's version; run from a checkout that was never
    installed, say so rather than guess."""
    try:
        return importlib.metadata.version("sessiongate")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: not installed; `pip install .` in the checkout)"


def _completion(opts: argparse.Namespace) -> int:
    """The shell's completion script for this CLI: static, generated from the parser."""
    print(shtab.complete(_parser(), shell=opts.shell))
    return 0


def _session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", default="", help="agent name (default: the server's default agent)")
    parser.add_argument(
        "--cwd", default="", help="working directory for the agent (a relative one: from here)"
    )
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label, repeatable")
    parser.add_argument(
        "--mcp",
        action="append",
        default=[],
        metavar="NAME",
        help="give the agent this MCP server of the server's config ([mcp_servers.NAME]), repeatable",
    )
    parser.add_argument(
        "--mcp-config",
        action="append",
        default=[],
        metavar="FILE",
        help='give the agent your own MCP servers: a JSON file of {"mcpServers": {NAME: {...}}} as '
        "editors use (command/args/env, or type http|sse with url/headers; ${VAR} from the "
        "environment), repeatable; your principal needs client_mcp_servers = true",
    )
    parser.add_argument(
        "--client-tools",
        action="append",
        default=[],
        metavar="FILE",
        help="declare tools the agent may call, answered with `sessiongate respond-tool`: a JSON file of "
        '[{"name": ..., "description": ..., "input_schema": {...}}], repeatable',
    )


def _seq(value: str) -> int:
    seq = int(value)
    if seq < 0:
        raise argparse.ArgumentTypeError("a seq is 0 or more")
    return seq


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


def _acp(opts: argparse.Namespace) -> int:
    try:
        from sessiongate.client import acp_front
    except ImportError as error:  # a client-only install without the ACP SDK
        print(
            f"sessiongate acp needs the ACP SDK ({error.name}): pip install 'sessiongate[acp]'",
            file=sys.stderr,
        )
        return 1
    for label in opts.label or ():
        if "=" not in label:
            opts.command_parser.error(f"--label wants K=V, not {label[:100]!r}")
    return acp_front.run(opts)


def _agents(client: SessionClient, opts: argparse.Namespace) -> None:
    response = client.list_agents()
    if opts.json:
        print(_json(response))
        return
    for agent in response.agents:
        default = "  (default)" if agent.is_default else ""
        auth = f"  (auth: {agent.auth_method})" if agent.auth_method else ""
        print(
            f"{agent.name:<16} {agent.permission_policy:<14} {agent.command} {' '.join(agent.args)}"
            f"{default}{auth}"
        )


def _create(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.create_session(
        opts.agent,
        _cwd(opts),
        labels=_labels(opts.label),
        mcp_servers=opts.mcp,
        client_mcp_servers=_client_mcp_servers(opts),
        client_tools=_client_tools(opts),
    )
    print(_json(session) if opts.json else session.session_id)


def _client_tools(opts: argparse.Namespace) -> list[Tool]:
    """The tools the --client-tools files declare, read before any call (a bad file is a usage
    error naming the file and tool)."""
    try:
        return [tool for path in opts.client_tools for tool in load_tools(path)]
    except ToolsFileError as error:
        raise UsageError(
            str(error),
            hint='--client-tools takes a JSON file like [{"name": "add", "description": "adds two numbers", '
            '"input_schema": {"type": "object"}}]',
        ) from None


def _client_mcp_servers(opts: argparse.Namespace) -> list[McpStdioServer | McpHttpServer | McpSseServer]:
    """The servers of the --mcp-config files, read before any call; a file that cannot be used is
    a usage error naming the file, server and key (never a value). Their names, in order, are
    kept for the hint of a server the server refuses (client_mcp_servers[i])."""
    try:
        servers = [server for path in opts.mcp_config for server in load_mcp_config(path)]
        check_unique(servers)
    except McpConfigError as error:
        raise UsageError(
            str(error),
            hint='--mcp-config takes a JSON file like {"mcpServers": {"NAME": {"command": "...", '
            '"args": [], "env": {}}}}, or {"type": "http", "url": "...", "headers": {}} for a remote one',
        ) from None
    if opts.mcp_config and not servers:
        raise UsageError(f"no MCP server in {', '.join(opts.mcp_config)} (all disabled?)")
    opts.client_mcp_names = [server.name for server in servers]
    return servers


def _cwd(opts: argparse.Namespace) -> str:
    """--cwd with a relative path taken from where the CLI runs, as a user means it (the
    server would take it from its own directory)."""
    return os.path.abspath(opts.cwd) if opts.cwd else ""


def _prompt(client: SessionClient, opts: argparse.Namespace) -> int | None:
    if opts.session and (opts.mcp or opts.mcp_config or opts.client_tools):  # before reading stdin
        flag = "--mcp" if opts.mcp else "--mcp-config" if opts.mcp_config else "--client-tools"
        what = "client tools" if flag == "--client-tools" else "MCP servers"
        raise UsageError(
            f"{flag} gives {what} to the session this command creates, and --session names one "
            f"that exists (its {what} were chosen when it was created)",
            hint=f"drop --session to create a session with them, or drop {flag}",
        )
    client_mcp_servers = _client_mcp_servers(opts)
    client_tools = _client_tools(opts)
    text = _prompt_text(opts)
    interactive = sys.stdin.isatty()  # the person who answers questions is at this terminal
    if not interactive and _would_ask(client, opts):
        raise UsageError(
            "this turn's permission requests would be asked of you (permission policy ask), "
            "but standard input is not a terminal to answer on",
            hint=f"pass {POLICY_FLAGS} to decide them without a terminal",
        )
    session_id = opts.session
    if not session_id:
        created = client.create_session(
            opts.agent,
            _cwd(opts),
            labels=_labels(opts.label),
            mcp_servers=opts.mcp,
            client_mcp_servers=client_mcp_servers,
            client_tools=client_tools,
        )
        session_id = created.session_id
        print(f"session {session_id}", file=sys.stderr)
    renderer = _renderer(opts, session_id)
    asker = TerminalAsker(
        sys.stdin,
        sys.stderr,
        before=renderer.end_line if renderer is not None else sys.stdout.flush,
        show_question=renderer is None,
    )
    events = client.prompt(
        session_id,
        text,
        stall_timeout=opts.stall_timeout,
        wait_timeout=opts.wait,
        permission_policy=opts.policy or "",  # "": the agent's own
        permission_timeout=opts.permission_timeout,
        on_permission=asker.permission if interactive else None,
        on_elicitation=asker.elicitation if interactive else decline,
        on_disconnect="continue" if opts.detach else None,
    )
    shown = Shown()
    with contextlib.closing(events):  # on an early exit: cancels the turn, unless detached
        if not opts.detach:
            _show(events, renderer, shown)
            return None
        try:
            _show(events, renderer, shown)
        except KeyboardInterrupt:
            turn_id = events.turn_id or _running_turn(client, session_id)
            if turn_id:
                print(
                    f"\ninterrupted: turn {printable(turn_id)} continues; re-attach with: "
                    f"{_watch_command(session_id, turn_id, shown.seq)}",
                    file=sys.stderr,
                )
            else:
                print(
                    f"\ninterrupted before the turn started; see `sessiongate history "
                    f"{printable(session_id)}`",
                    file=sys.stderr,
                )
            return EXIT_INTERRUPTED
        except SessionGateError as error:
            _note_reattach(error, events, shown, opts)
            raise
    return None


def _watch(client: SessionClient, opts: argparse.Namespace) -> int | None:
    renderer = _renderer(opts, opts.session)
    events = client.watch_turn(opts.session, opts.after_seq, opts.turn)
    shown = Shown(opts.after_seq)
    with contextlib.closing(events):  # watching never cancels the turn
        try:
            _show(events, renderer, shown)
        except KeyboardInterrupt:
            where = (
                f"; re-attach with: {_watch_command(opts.session, events.turn_id, shown.seq)}"
                if events.turn_id
                else ""
            )
            print(f"\ninterrupted: the turn goes on{where}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except SessionGateError as error:
            _note_reattach(error, events, shown, opts)
            raise
    return None


def _renderer(opts: argparse.Namespace, session_id: str) -> LiveRenderer | None:
    if opts.json:
        return None
    return LiveRenderer(sys.stdout, terminal=sys.stdout.isatty(), session_id=session_id)


class Shown:
    """The seq of the last event shown in full: where to re-attach from after a Ctrl-C."""

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq


def _show(events: Iterable[pb.PromptEvent], renderer: LiveRenderer | None, shown: Shown) -> None:
    """Each event, and `shown.seq` with it: a Ctrl-C while an event is being written waits until
    it is written and counted, so the re-attach hint never repeats or skips an event."""
    writing = False
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if not writing:
            raise KeyboardInterrupt
        interrupted = True

    with _sigint_handler(on_sigint):
        try:
            for event in events:
                writing = True
                if renderer is None:
                    print(_json(event), flush=True)
                else:
                    renderer.event(event)
                shown.seq = event.seq
                writing = False
                if interrupted:
                    raise KeyboardInterrupt
        except SessionGateError:
            if renderer is not None:
                renderer.end_line()  # the error goes on a line of its own, not after a partial reply
            raise


@contextlib.contextmanager
def _sigint_handler(handler: Any) -> Iterator[None]:
    """`handler` for SIGINT meanwhile (only the main thread may set one: elsewhere, as it was)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch_command(session_id: str, turn_id: str, after_seq: int) -> str:
    return f"sessiongate watch {printable(session_id)} --turn {printable(turn_id)} --from {after_seq}"


def _running_turn(client: SessionClient, session_id: str) -> str:
    """The session's running turn (a Ctrl-C came before the turn's id did), or ""."""
    with contextlib.suppress(SessionGateError):
        session = client.get_session(session_id, timeout=5)
        if session.state == pb.SESSION_STATE_BUSY:
            return str(session.turn_id)
    return ""


def _note_reattach(
    error: SessionGateError, events: TurnEvents, shown: Shown, opts: argparse.Namespace
) -> None:
    """After a connection lost for good, say how to pick the turn up again (it goes on)."""
    if transport_failure(error) and events.turn_id:
        opts.reattach = _watch_command(events.session_id, events.turn_id, shown.seq)


def _would_ask(client: SessionClient, opts: argparse.Namespace) -> bool:
    """Whether the turn runs under `ask`: the flag's policy, else the session's agent's."""
    if opts.policy:
        return bool(opts.policy == "ask")
    agent = client.get_session(opts.session).agent if opts.session else opts.agent
    agents = client.list_agents()
    agent = agent or agents.default_agent
    return any(a.name == agent and a.permission_policy == "ask" for a in agents.agents)


def _prompt_text(opts: argparse.Namespace) -> str:
    if opts.text:
        return " ".join(opts.text)
    if opts.file and opts.file != "-":
        with open(opts.file, encoding="utf-8") as handle:
            return handle.read()
    if not opts.file and sys.stdin.isatty():
        raise SystemExit("sessiongate: give the prompt as arguments, with --file, or on standard input")
    return sys.stdin.read()


TURN_STATES = {
    pb.TURN_STATE_RUNNING: "running",
    pb.TURN_STATE_COMPLETED: "completed",
    pb.TURN_STATE_FAILED: "failed",
    pb.TURN_STATE_INTERRUPTED: "interrupted",
}
PROMPT_SHOWN = 40  # characters of a turn's prompt in the history table


def _history(client: SessionClient, opts: argparse.Namespace) -> None:
    if opts.turn:
        _show_turn(client, opts)
        return
    turns = _first_page(client.list_turns(opts.session))
    if opts.json:
        for turn in turns:
            print(_json(turn))
        return
    print(f"{'TURN':<18} {'STATE':<11} {'STARTED':<19} {'DURATION':>9} {'LAST SEQ':>8}  {'END':<28} PROMPT")
    for t in turns:
        prompt = _prompt_line(t)
        if len(prompt) > PROMPT_SHOWN:
            prompt = prompt[: PROMPT_SHOWN - 1] + "…"
        print(
            printable(
                f"{t.turn_id:<18} {_turn_state(t):<11} {_started(t):<19} {_took(t):>9} {t.last_seq:>8}  "
                f"{_ending(t):<28} {prompt}"
            )
        )


def _show_turn(client: SessionClient, opts: argparse.Namespace) -> None:
    """The turn's summary and prompt, then its events as `prompt` shows them (GetTurn, every
    page), then how it ended."""
    turn = client.get_turn(opts.session, opts.turn)
    renderer = _renderer(opts, opts.session)
    summary = pb.Turn()
    summary.CopyFrom(turn)
    summary.ClearField("events")
    summary.ClearField("events_truncated")
    if renderer is None:
        print(_json(summary))
    else:
        about = [f"turn {turn.turn_id}", _turn_state(turn), f"started {_started(turn)}", _took(turn)]
        if turn.on_disconnect == pb.ON_DISCONNECT_CONTINUE:
            about.append("continues on disconnect")
        if turn.last_seq:
            about.append(f"events {turn.oldest_kept_seq or 1}-{turn.last_seq}")
        print(printable(" · ".join(part for part in about if part)))
        for line in _prompt_lines(turn):
            print(printable(f"> {line}"))
    shown = Shown()
    while True:
        _show(turn.events, renderer, shown)
        if not turn.events_truncated or not turn.events:
            break
        turn = client.get_turn(opts.session, opts.turn, shown.seq)
    if renderer is not None:
        renderer.end_line()
        ending = {
            pb.TURN_STATE_FAILED: f"-- failed: {_ending(summary)}: {summary.error.message}",
            pb.TURN_STATE_INTERRUPTED: "-- interrupted: the server stopped during this turn",
            pb.TURN_STATE_RUNNING: "-- still running; follow it with: "
            + _watch_command(opts.session, summary.turn_id, shown.seq),
        }.get(summary.state)
        if ending:
            print(printable(ending))


def _turn_state(turn: pb.Turn) -> str:
    """Its state; a turn the agent stopped on a cancel (CancelPrompt, its client leaving, the
    server shutting down) reads "cancelled", though the server counts it completed."""
    if turn.state == pb.TURN_STATE_COMPLETED and turn.result.stop_reason == pb.STOP_REASON_CANCELLED:
        return "cancelled"
    return TURN_STATES.get(turn.state, "?")


def _started(turn: pb.Turn) -> str:
    if not turn.HasField("start_time"):
        return "-"
    return str(turn.start_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))


def _took(turn: pb.Turn) -> str:
    """How long the turn ran ("12.3s"); a running one so far ("4.0s+"); "-" when unknown."""
    if not turn.HasField("start_time"):
        return "-"
    start = turn.start_time.ToNanoseconds() / 1e9
    if turn.HasField("end_time"):
        return _seconds(turn.end_time.ToNanoseconds() / 1e9 - start)
    if turn.state == pb.TURN_STATE_RUNNING:
        return _seconds(time.time() - start) + "+"
    return "-"


def _seconds(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _ending(turn: pb.Turn) -> str:
    """How the turn ended: its stop reason, or its error's code and reason."""
    if turn.state == pb.TURN_STATE_COMPLETED:
        return pb.StopReason.Name(turn.result.stop_reason).removeprefix("STOP_REASON_").lower()
    if turn.state == pb.TURN_STATE_FAILED:
        return f"{turn.error.code} {turn.error.reason}".strip()
    if turn.state == pb.TURN_STATE_INTERRUPTED:
        return "server stopped"
    return ""


def _prompt_lines(turn: pb.Turn) -> list[str]:
    """The turn's prompt: its text's lines, and a line per other content block."""
    lines: list[str] = []
    for block in turn.prompt:
        kind = block.WhichOneof("block")
        if kind == "text":
            lines.extend(block.text.text.splitlines() or [""])
        elif kind == "image":
            lines.append(f"[image {block.image.mime_type or block.image.uri}]")
        elif kind == "resource_link":
            lines.append(f"[link {block.resource_link.uri}]")
        elif kind == "resource":
            lines.append(f"[resource {block.resource.uri}]")
    return lines


def _prompt_line(turn: pb.Turn) -> str:
    return " ".join(" ".join(_prompt_lines(turn)).split())


def _respond_tool(client: SessionClient, opts: argparse.Namespace) -> None:
    result: str | dict[str, Any] | None = opts.result
    if opts.result_json is not None:
        try:
            result = json.loads(opts.result_json)
        except json.JSONDecodeError as error:
            raise UsageError(f"--result-json is not JSON ({error.msg} at {error.pos})") from None
        if not isinstance(result, dict):
            raise UsageError(
                "--result-json takes a JSON object", hint="pass other values as text with --result"
            )
    client.respond_tool_call(opts.session, opts.request, result, error=opts.error)
    print(json.dumps({"answered": True}) if opts.json else printable(f"answered {opts.request}"))


def _cancel(client: SessionClient, opts: argparse.Namespace) -> None:
    cancelled = client.cancel_prompt(opts.session)
    print(
        json.dumps({"cancelled": cancelled})
        if opts.json
        else ("cancelled" if cancelled else "no turn was running")
    )


STATE_FIELDS = ("modes", "config_options", "available_commands", "usage")


def _get(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.get_session(opts.session)
    if opts.json:
        print(_json(session))
        return
    for key, value in json_format.MessageToDict(session, preserving_proto_field_name=True).items():
        if key == "mcp_servers":
            print(printable(f"{key:<18} {mcp_servers_text(session.mcp_servers)}"))
        elif key == "client_tools":
            print(printable(f"{key:<18} {', '.join(t.name for t in session.client_tools)}"))
        elif key not in STATE_FIELDS:
            shown = pairs(value) if isinstance(value, dict) else value  # labels, agent_info
            print(printable(f"{key:<18} {shown}"))
    for line in _state_lines(session):
        print(printable(line))  # titles, names and descriptions come from the agent


def mcp_servers_text(servers: Iterable[pb.McpServerInfo]) -> str:
    """`NAME (TRANSPORT, SOURCE), …`: what a session's agent was given, by name only."""
    return ", ".join(f"{s.name} ({s.transport}, {s.source})" for s in servers)


def _state_lines(session: pb.Session) -> list[str]:
    """The session's modes (current marked *), config options, commands and usage."""
    lines = []
    if session.modes.available_modes or session.modes.current_mode_id:
        lines.append("modes")
        for m in session.modes.available_modes:
            mark = "*" if m.id == session.modes.current_mode_id else " "
            about = " - ".join(part for part in (m.name, m.description) if part)
            lines.append(f"  {mark} {m.id:<16} {about}".rstrip())
    if session.config_options:
        lines.append("config options")
        for o in session.config_options:
            allowed = ", ".join(v.value for v in o.values) if o.values else o.type
            name = f" ({o.name})" if o.name and o.name != o.id else ""
            lines.append(f"    {o.id:<16} {o.current_value}  [{allowed}]{name}")
    if session.available_commands:
        lines.append("commands")
        for c in session.available_commands:
            usage = f"/{c.name} <{c.input_hint}>" if c.input_hint else f"/{c.name}"
            lines.append(f"    {usage:<16} {c.description}".rstrip())
    if session.HasField("usage"):
        lines.append(f"{'usage':<18} {usage_text(session.usage)}")
    return lines


def _list(client: SessionClient, opts: argparse.Namespace) -> None:
    sessions = _first_page(client.list_sessions(agent=opts.agent, labels=_labels(opts.label)))
    if opts.json:
        for session in sessions:
            print(_json(session))
        return
    print(f"{'SESSION':<26} {'AGENT':<12} {'STATE':<11} {'LAST ACTIVE':<20} LABELS")
    for s in sessions:
        state = pb.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower()
        active = s.last_active_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        print(printable(f"{s.session_id:<26} {s.agent:<12} {state:<11} {active:<20} {pairs(s.labels)}"))


def pairs(mapping: Mapping[str, Any]) -> str:
    """`k=v,k2=v2`, sorted by key, each pair as `--label` takes it. A key or value that would not read back
    as one (empty, or with a separator, quote, space or control character in it) is quoted as a
    JSON string, escapes and all."""
    return ",".join(f"{_quoted(str(key))}={_quoted(str(value))}" for key, value in sorted(mapping.items()))


def _quoted(text: str) -> str:
    if _BARE.fullmatch(text):
        return text
    # JSON escapes C0 controls; DEL and C1 it leaves raw, so escape those too.
    return _RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


_BARE = re.compile(r"[^\x00-\x20\x7f-\x9f,=\"'\\]+")  # one word that needs no quotes
_RAW = re.compile("[\x7f-\x9f]")


def _first_page(items: Iterator[T]) -> Iterator[T]:
    """`items` with its first page fetched: a failing call fails before a table header."""
    first = next(items, None)
    return items if first is None else itertools.chain((first,), items)


def _close(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.close_session(opts.session)
    print(_json(session) if opts.json else f"closed {session.session_id}")


def _mode(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.set_mode(opts.session, opts.mode)
    print(_json(session) if opts.json else printable(f"mode {session.modes.current_mode_id}"))


def _config(client: SessionClient, opts: argparse.Namespace) -> None:
    session = client.set_config_option(opts.session, opts.key, opts.value)
    if opts.json:
        print(_json(session))
        return
    current = next((o.current_value for o in session.config_options if o.id == opts.key), opts.value)
    print(printable(f"{opts.key} = {current}"))


def _auth(client: SessionClient, opts: argparse.Namespace) -> None:
    response = client.authenticate_agent(opts.agent, opts.method)
    print(
        _json(response)
        if opts.json
        else f"agent {response.agent} authenticated with {response.method_id}; its new processes will be too"
    )


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
    message = error.message
    if error.violations and all(f"{f}: {d}" in message for f, d in error.violations.items()):
        message = message.partition(":")[0]  # its summary repeats the violations listed below
    print(f"error: {error.code.name}{reason}: {message}", file=out)
    for field, description in error.violations.items():
        print(f"  {field}: {description}", file=out)
    hint = error.hint if isinstance(error, UsageError) else _hint(error, opts)
    if hint:
        print(f"hint: {hint}", file=out)
    reattach = getattr(opts, "reattach", "")
    if reattach:
        print(f"hint: the turn may still be running; re-attach with: {reattach}", file=out)


def _hint(error: SessionGateError, opts: argparse.Namespace) -> str:
    retry = f"retry in {error.retry_delay:g}s" if error.retry_delay is not None else "retry later"
    session = getattr(opts, "session", None) or "SESSION"
    question = "tool call" if getattr(opts, "run", None) is _respond_tool else "question"
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
        f"{error.metadata.get('auth_methods', '?')}); set them in the agent's `env` in the server config, "
        "then an admin runs `sessiongate auth AGENT METHOD`",
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
        "REQUEST_NOT_FOUND": f"no such {question} on this session (it belongs to another session?)",
        "REQUEST_ANSWERED": f"that {question} was already answered, expired or cancelled",
        "AGENT_REFUSED": "the agent said no; see the message above",
        "MCP_SERVER_NOT_ALLOWED": "your principal may not use that MCP server: ask the operator to add it "
        "to your mcp_servers in the tokens file"
        if "server" in error.metadata  # a name refused; without one: servers of your own
        else "your principal may not supply its own MCP servers (--mcp-config): ask the operator to set "
        "client_mcp_servers = true for it in the tokens file, or use --mcp with a server they named",
        "MCP_TRANSPORT_UNSUPPORTED": "that agent cannot use http/sse MCP servers: use a stdio one",
        "TURN_NOT_FOUND": f"see the session's turns with `sessiongate history {session}`",
        "SEQ_NOT_KEPT": _seq_hint(error, opts),
        "TURN_INTERRUPTED": "the server stopped during this turn; what it kept is in "
        f"`sessiongate history {session} {getattr(opts, 'turn', '') or 'TURN'}`",
        "NOT_SUPPORTED": "the message above lists the auth methods the agent offers"
        if getattr(opts, "run", None) is _auth
        else f"see the modes and config options the session offers with `sessiongate get {session}`",
    }
    if error.reason in hints:
        return printable(hints[error.reason])
    supplied = _supplied_hint(error, opts)
    if supplied:
        return supplied
    if "mcp_servers" in error.violations:
        return (
            "--mcp takes the name of an [mcp_servers.NAME] table of the server's config "
            "(its names are listed above)"
        )
    cwd = _cwd(opts) if getattr(opts, "cwd", "") else ""
    said = error.violations.get("cwd", "does not exist")
    if "does not exist" not in said and cwd and not os.path.exists(cwd):
        # The server does not say whether a path outside its roots exists; this machine can.
        return printable(f"{cwd} does not exist on this machine")
    if error.code == grpc.StatusCode.UNAVAILABLE and _handshake_cut(error, opts):
        return (
            "the server closed the connection during the TLS handshake: it asks for a client "
            "certificate (mTLS)? pass --tls-cert and --tls-key"
        )
    if error.code == grpc.StatusCode.CANCELLED:  # not by us (see EXIT_CODES): not a user's cancel
        return (
            "the server ended the call before it was done (shutting down or restarting?): "
            f"retry shortly; see what a turn did with `sessiongate history {session}`"
        )
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return f"is the server running at {opts.target}? (--target or SESSIONGATE_TARGET)"
    return ""


def _supplied_hint(error: SessionGateError, opts: argparse.Namespace) -> str:
    """Which --mcp-config server each `client_mcp_servers[i]` violation is about."""
    names = getattr(opts, "client_mcp_names", [])
    indexes = sorted(
        {int(m.group(1)) for f in error.violations if (m := re.match(r"client_mcp_servers\[(\d+)\]", f))}
    )
    named = [f"client_mcp_servers[{i}] is {shown_name(names[i])}" for i in indexes if i < len(names)]
    if not named:
        return ""
    return printable(f"{', '.join(named)} (the servers of your --mcp-config files, in order)")


def _handshake_cut(error: SessionGateError, opts: argparse.Namespace) -> bool:
    """A TLS connection without a client certificate that the server closed: what an mTLS server
    does (grpc reports only "Socket closed"; a server that is not there refuses instead)."""
    return bool(not error.reason and opts.tls_ca and not opts.tls_cert and "Socket closed" in error.message)


def _seq_hint(error: SessionGateError, opts: argparse.Namespace) -> str:
    try:
        oldest, last = int(error.metadata["oldest_kept_seq"]), int(error.metadata["last_seq"])
    except (KeyError, ValueError):
        return ""
    if getattr(opts, "after_seq", 0) > last:
        return f"the turn's last event so far is {last}: --from takes at most {last}"
    session = getattr(opts, "session", None) or "SESSION"
    turn = getattr(opts, "turn", "") or "TURN"
    return (
        f"the turn keeps events {oldest}-{last} (older ones were dropped): pass --from {max(oldest - 1, 0)} "
        f"to start at the oldest kept, or see them with `sessiongate history {session} {turn}`"
    )


if __name__ == "__main__":
    sys.exit(main())
