"""What an agent says about a session besides its turns' content: modes, config options,
slash commands, title and usage.

The agent reports these in its answers to session/new, session/load, session/resume and
session/set_config_option, and in `session/update` notifications that may come at any time,
also when no turn runs (commands right after session/new, a title after a turn). A session
keeps the latest of each here, persists it with its record (so a suspended session, and one
after a restart, still shows it), and GetSession shows it.

Everything here comes from an untrusted agent, so it is bounded when it is read: at most
MAX_ITEMS modes, options and commands and MAX_VALUES values per option, names and
descriptions clipped, every section within SECTION_BYTES, numbers within int64. An id too
long to keep whole is dropped with its item (a clipped id could not be used to set it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from sessiongate.server.errors import InvalidArgument, NotSupported, clip

MAX_ITEMS = 256  # modes, config options, commands: each
MAX_VALUES = 256  # of one select option
MAX_ID = 1024  # bytes of an id (mode, option, value, command name); a longer one is dropped
MAX_NAME = 1024  # bytes of a name, a title, a category, a group, a currency, an input hint
MAX_DESCRIPTION = 4096  # bytes of a description
SECTION_BYTES = 64 * 1024  # all strings of the modes, of the options, of the commands
INT64_MAX = 2**63 - 1
CLIP_MARK = 48  # bytes kept free for clip's "… (N more bytes)"

# The `session/update` kinds that change this state (besides a turn's TurnUsage).
STATE_UPDATES = frozenset(
    {
        "current_mode_update",
        "config_option_update",
        "available_commands_update",
        "session_info_update",
        "usage_update",
    }
)


@dataclass(frozen=True, slots=True)
class Mode:
    id: str
    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class OptionValue:
    """One allowed value of a select option."""

    value: str
    name: str
    description: str = ""
    group: str = ""  # the name of the group the agent put it in, if any


@dataclass(frozen=True, slots=True)
class ConfigOption:
    id: str
    name: str
    type: str  # "select" or "boolean"
    current_value: str  # "true"/"false" for a boolean
    description: str = ""
    category: str = ""  # mode, model, model_config, thought_level, or empty
    values: tuple[OptionValue, ...] = ()  # of a select option


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    description: str = ""
    input_hint: str = ""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """A turn's token counts (ACP PromptResponse.usage)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    thought_tokens: int = 0
    cached_read_tokens: int = 0
    cached_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SessionUsage:
    context_used: int = 0
    context_size: int = 0
    cost_amount: float = 0.0
    cost_currency: str = ""
    last_turn: TokenUsage | None = None


@dataclass(frozen=True, slots=True)
class TurnUsage:
    """What a finished turn's answer reported as its usage; the agent connection hands it to
    the session's watcher like an update."""

    usage: Any  # acp.schema.Usage


@dataclass
class AgentState:
    """The latest of what the agent reported; `known` once an opening answer was seen."""

    current_mode_id: str = ""
    modes: tuple[Mode, ...] = ()
    config_options: tuple[ConfigOption, ...] = ()
    commands: tuple[Command, ...] = ()
    title: str = ""
    usage: SessionUsage = field(default_factory=SessionUsage)
    known: bool = False  # False: a record from before this state was kept (resume to learn it)

    # ---- from the agent ------------------------------------------------------------------

    def apply_update(self, update: Any) -> bool:
        """One `session/update` of a STATE_UPDATES kind, or a TurnUsage; True if anything changed."""
        before = self._snapshot()
        if isinstance(update, TurnUsage):
            self.usage = replace(self.usage, last_turn=token_usage(update.usage))
            return self._snapshot() != before
        kind = getattr(update, "session_update", None)
        if kind == "current_mode_update":
            mode_id = _id(update.current_mode_id)
            if mode_id is not None:
                self.current_mode_id = mode_id
        elif kind == "config_option_update":
            self.config_options = config_options(update.config_options)
        elif kind == "available_commands_update":
            self.commands = commands(update.available_commands)
        elif kind == "session_info_update":
            if "title" in update.model_fields_set:  # absent: unchanged; null: cleared
                self.title = session_title(update)
        elif kind == "usage_update":
            self.usage = context_usage(update, self.usage)
        else:
            return False
        return self._snapshot() != before

    def _snapshot(self) -> tuple[Any, ...]:
        return (self.current_mode_id, self.modes, self.config_options, self.commands, self.title, self.usage)

    def apply_response(self, response: Any) -> None:
        """The modes and config options of a session/new, /load, /resume answer (where none
        means the agent has none), or the config options of a set_config_option answer."""
        if hasattr(response, "modes"):
            self.current_mode_id, self.modes = session_modes(response.modes)
            self.known = True
        if hasattr(response, "config_options"):
            self.config_options = config_options(response.config_options or ())

    def set_mode(self, mode_id: str) -> None:
        """The agent accepted session/set_mode."""
        self.current_mode_id = mode_id

    def forget_session(self) -> None:
        """A new ACP session replaced the old one: what the old one reported no longer holds."""
        self.commands, self.title, self.usage = (), "", SessionUsage()

    # ---- checks of a client's request against what the agent offers -------------------

    def check_mode(self, mode_id: str) -> None:
        """NotSupported when the agent offers no modes; InvalidArgument for an unknown one."""
        if not self.modes:
            raise NotSupported("the agent offers no session modes", metadata={"mode_id": clip(mode_id, 100)})
        if all(mode.id != mode_id for mode in self.modes):
            offered = ", ".join(mode.id for mode in self.modes)
            raise InvalidArgument.field(
                "mode_id", f"unknown mode {clip(mode_id, 100)!r} (offered: {offered})"
            )

    def check_option(self, config_id: str, value: str) -> str | bool:
        """The value to send for a config option (a bool for a boolean one). NotSupported when
        the agent offers no config options; InvalidArgument for an unknown option or value."""
        if not self.config_options:
            raise NotSupported(
                "the agent offers no config options", metadata={"config_id": clip(config_id, 100)}
            )
        option = next((o for o in self.config_options if o.id == config_id), None)
        if option is None:
            offered = ", ".join(o.id for o in self.config_options)
            raise InvalidArgument.field(
                "config_id", f"unknown config option {clip(config_id, 100)!r} (offered: {offered})"
            )
        if option.type == "boolean":
            if value not in ("true", "false"):
                raise InvalidArgument.field("value", f"{option.id!r} is a boolean: 'true' or 'false'")
            return value == "true"
        if all(v.value != value for v in option.values):
            offered = ", ".join(v.value for v in option.values)
            raise InvalidArgument.field(
                "value", f"{clip(value, 100)!r} is not a value of {option.id!r} ({offered})"
            )
        return value

    # ---- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> AgentState:
        """A stored state, bounded again; anything unreadable (an older record) gives an empty one."""
        if not data:
            return cls()
        try:
            usage = data.get("usage") or {}
            last = usage.get("last_turn")
            return cls(
                current_mode_id=_id(data.get("current_mode_id", "")) or "",
                modes=_bounded(
                    (
                        Mode(_text(m["id"], MAX_ID), _name(m["name"]), _description(m["description"]))
                        for m in data.get("modes", ())
                    ),
                ),
                config_options=_bounded(_stored_option(o) for o in data.get("config_options", ())),
                commands=_bounded(
                    Command(_text(c["name"], MAX_ID), _description(c["description"]), _name(c["input_hint"]))
                    for c in data.get("commands", ())
                ),
                title=_name(data.get("title", "")),
                usage=SessionUsage(
                    context_used=_count(usage.get("context_used")),
                    context_size=_count(usage.get("context_size")),
                    cost_amount=_amount(usage.get("cost_amount")),
                    cost_currency=_name(usage.get("cost_currency", "")),
                    last_turn=TokenUsage(**{k: _count(v) for k, v in last.items()}) if last else None,
                ),
                known=bool(data.get("known", False)),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return cls()


# ---- ACP -> bounded dataclasses (also used by translate.py for the turn's events) -----------


def session_modes(modes: Any) -> tuple[str, tuple[Mode, ...]]:
    """An ACP SessionModeState (or None) as (current mode id, modes)."""
    if modes is None:
        return "", ()
    kept = _bounded(
        Mode(mode_id, _name(m.name), _description(m.description or ""))
        for m in modes.available_modes
        if (mode_id := _id(m.id)) is not None
    )
    return _id(modes.current_mode_id) or "", kept


def config_options(options: Iterable[Any]) -> tuple[ConfigOption, ...]:
    """ACP SessionConfigOptionSelect/Boolean items, bounded."""
    return _bounded(option for item in options if (option := _config_option(item)) is not None)


def _config_option(item: Any) -> ConfigOption | None:
    option_id = _id(item.id)
    kind = getattr(item, "type", None)
    if option_id is None or kind not in ("select", "boolean"):
        return None
    category = item.category if isinstance(item.category, str) else ""  # a custom one is a dict
    if kind == "boolean":
        current = "true" if item.current_value else "false"
        values: tuple[OptionValue, ...] = ()
    else:
        current = _id(item.current_value) or ""
        values = _option_values(item.options)
    return ConfigOption(
        id=option_id,
        name=_name(item.name),
        type=kind,
        current_value=current,
        description=_description(item.description or ""),
        category=_name(category),
        values=values,
    )


def _option_values(options: Iterable[Any]) -> tuple[OptionValue, ...]:
    """A select option's values: plain, or in groups (flattened, each naming its group)."""
    out: list[OptionValue] = []
    for entry in options:
        members = getattr(entry, "options", None)
        if members is None:  # a SessionConfigSelectOption
            grouped: Iterable[tuple[Any, str]] = ((entry, ""),)
        else:  # a SessionConfigSelectGroup
            group = _name(entry.name or entry.group)
            grouped = ((member, group) for member in members)
        for value, group in grouped:
            if len(out) >= MAX_VALUES:
                return tuple(out)
            value_id = _id(value.value)
            if value_id is not None:
                out.append(
                    OptionValue(value_id, _name(value.name), _description(value.description or ""), group)
                )
    return tuple(out)


def commands(items: Iterable[Any]) -> tuple[Command, ...]:
    """ACP AvailableCommand items, bounded."""
    return _bounded(
        Command(name, _description(c.description or ""), _name(_hint(c)))
        for c in items
        if (name := _id(c.name)) is not None
    )


def _hint(command: Any) -> str:
    given = command.input
    hint = getattr(getattr(given, "root", given), "hint", "") if given is not None else ""
    return hint if isinstance(hint, str) else ""


def session_title(update: Any) -> str:
    """The title of a session_info_update (null clears it)."""
    return _name(update.title or "")


def context_usage(update: Any, previous: SessionUsage | None = None) -> SessionUsage:
    """A usage_update over what was known: the cost stays when this update has none."""
    base = previous or SessionUsage()
    cost = update.cost
    return replace(
        base,
        context_used=_count(update.used),
        context_size=_count(update.size),
        cost_amount=_amount(cost.amount) if cost is not None else base.cost_amount,
        cost_currency=_name(cost.currency) if cost is not None else base.cost_currency,
    )


def token_usage(usage: Any) -> TokenUsage:
    """ACP Usage (a PromptResponse's) as bounded counts."""
    return TokenUsage(
        input_tokens=_count(usage.input_tokens),
        output_tokens=_count(usage.output_tokens),
        total_tokens=_count(usage.total_tokens),
        thought_tokens=_count(usage.thought_tokens),
        cached_read_tokens=_count(usage.cached_read_tokens),
        cached_write_tokens=_count(usage.cached_write_tokens),
    )


def current_mode_id(update: Any) -> str:
    """The mode id of a current_mode_update, or "" when it is too long to be one."""
    return _id(update.current_mode_id) or ""


# ---- bounds -----------------------------------------------------------------------------------


def _text(value: Any, limit: int) -> str:
    """At most `limit` bytes, the clip's marker included (so a stored text reads back the same)."""
    text = value if isinstance(value, str) else str(value or "")
    return text if len(text.encode()) <= limit else clip(text, limit - CLIP_MARK)


def _name(value: Any) -> str:
    return _text(value, MAX_NAME)


def _description(value: Any) -> str:
    return _text(value, MAX_DESCRIPTION)


def _id(value: Any) -> str | None:
    """An id kept whole, or None when it is not a string or too long to keep."""
    if not isinstance(value, str) or len(value.encode()) > MAX_ID:
        return None
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, min(value, INT64_MAX))


def _amount(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    number = float(value)
    return number if math.isfinite(number) else 0.0


def _size(value: Any) -> int:
    """Bytes of the strings of an item (its values' too)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, tuple):
        return sum(_size(v) for v in value)
    if is_dataclass(value):
        return sum(_size(getattr(value, f.name)) for f in fields(value))
    return 0


def _bounded(items: Iterable[Any]) -> tuple[Any, ...]:
    """The first items, at most MAX_ITEMS and SECTION_BYTES of strings in all."""
    out: list[Any] = []
    used = 0
    for item in items:
        used += _size(item)
        if len(out) >= MAX_ITEMS or used > SECTION_BYTES:
            break
        out.append(item)
    return tuple(out)


def _stored_option(data: Mapping[str, Any]) -> ConfigOption:
    kind = data["type"]
    if kind not in ("select", "boolean"):
        raise ValueError(f"unknown option type {kind!r}")
    values = tuple(
        OptionValue(
            _text(v["value"], MAX_ID), _name(v["name"]), _description(v["description"]), _name(v["group"])
        )
        for v in data.get("values", ())[:MAX_VALUES]
    )
    return ConfigOption(
        id=_text(data["id"], MAX_ID),
        name=_name(data["name"]),
        type=kind,
        current_value=_text(data["current_value"], MAX_ID),
        description=_description(data["description"]),
        category=_name(data["category"]),
        values=values,
    )
