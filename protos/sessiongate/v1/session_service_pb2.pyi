import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnDisconnect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DISCONNECT_UNSPECIFIED: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CANCEL: _ClassVar[OnDisconnect]
    ON_DISCONNECT_CONTINUE: _ClassVar[OnDisconnect]

class TurnState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_STATE_UNSPECIFIED: _ClassVar[TurnState]
    TURN_STATE_RUNNING: _ClassVar[TurnState]
    TURN_STATE_COMPLETED: _ClassVar[TurnState]
    TURN_STATE_FAILED: _ClassVar[TurnState]
    TURN_STATE_INTERRUPTED: _ClassVar[TurnState]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_IDLE: _ClassVar[SessionState]
    SESSION_STATE_BUSY: _ClassVar[SessionState]
    SESSION_STATE_RECOVERING: _ClassVar[SessionState]
    SESSION_STATE_SUSPENDED: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_END_TURN: _ClassVar[StopReason]
    STOP_REASON_MAX_TOKENS: _ClassVar[StopReason]
    STOP_REASON_MAX_TURN_REQUESTS: _ClassVar[StopReason]
    STOP_REASON_REFUSAL: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]

class ToolCallStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_CALL_STATUS_UNSPECIFIED: _ClassVar[ToolCallStatus]
    TOOL_CALL_STATUS_PENDING: _ClassVar[ToolCallStatus]
    TOOL_CALL_STATUS_IN_PROGRESS: _ClassVar[ToolCallStatus]
    TOOL_CALL_STATUS_COMPLETED: _ClassVar[ToolCallStatus]
    TOOL_CALL_STATUS_FAILED: _ClassVar[ToolCallStatus]

class PermissionOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERMISSION_OUTCOME_UNSPECIFIED: _ClassVar[PermissionOutcome]
    PERMISSION_OUTCOME_ALLOWED: _ClassVar[PermissionOutcome]
    PERMISSION_OUTCOME_REJECTED: _ClassVar[PermissionOutcome]
    PERMISSION_OUTCOME_CANCELLED: _ClassVar[PermissionOutcome]

class ElicitationAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ELICITATION_ACTION_UNSPECIFIED: _ClassVar[ElicitationAction]
    ELICITATION_ACTION_ACCEPT: _ClassVar[ElicitationAction]
    ELICITATION_ACTION_DECLINE: _ClassVar[ElicitationAction]
    ELICITATION_ACTION_CANCEL: _ClassVar[ElicitationAction]
ON_DISCONNECT_UNSPECIFIED: OnDisconnect
ON_DISCONNECT_CANCEL: OnDisconnect
ON_DISCONNECT_CONTINUE: OnDisconnect
TURN_STATE_UNSPECIFIED: TurnState
TURN_STATE_RUNNING: TurnState
TURN_STATE_COMPLETED: TurnState
TURN_STATE_FAILED: TurnState
TURN_STATE_INTERRUPTED: TurnState
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_IDLE: SessionState
SESSION_STATE_BUSY: SessionState
SESSION_STATE_RECOVERING: SessionState
SESSION_STATE_SUSPENDED: SessionState
SESSION_STATE_CLOSED: SessionState
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_END_TURN: StopReason
STOP_REASON_MAX_TOKENS: StopReason
STOP_REASON_MAX_TURN_REQUESTS: StopReason
STOP_REASON_REFUSAL: StopReason
STOP_REASON_CANCELLED: StopReason
TOOL_CALL_STATUS_UNSPECIFIED: ToolCallStatus
TOOL_CALL_STATUS_PENDING: ToolCallStatus
TOOL_CALL_STATUS_IN_PROGRESS: ToolCallStatus
TOOL_CALL_STATUS_COMPLETED: ToolCallStatus
TOOL_CALL_STATUS_FAILED: ToolCallStatus
PERMISSION_OUTCOME_UNSPECIFIED: PermissionOutcome
PERMISSION_OUTCOME_ALLOWED: PermissionOutcome
PERMISSION_OUTCOME_REJECTED: PermissionOutcome
PERMISSION_OUTCOME_CANCELLED: PermissionOutcome
ELICITATION_ACTION_UNSPECIFIED: ElicitationAction
ELICITATION_ACTION_ACCEPT: ElicitationAction
ELICITATION_ACTION_DECLINE: ElicitationAction
ELICITATION_ACTION_CANCEL: ElicitationAction

class AgentInfo(_message.Message):
    __slots__ = ("name", "version", "title")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    title: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "agent", "cwd", "state", "create_time", "last_active_time", "labels", "agent_session_id", "agent_info", "turn_start_time", "last_event_time", "request_id", "turn_elapsed", "since_last_event", "owner", "modes", "config_options", "available_commands", "title", "usage", "turn_id", "replica", "mcp_servers", "client_tools")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_INFO_FIELD_NUMBER: _ClassVar[int]
    TURN_START_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ELAPSED_FIELD_NUMBER: _ClassVar[int]
    SINCE_LAST_EVENT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOOLS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    agent: str
    cwd: str
    state: SessionState
    create_time: _timestamp_pb2.Timestamp
    last_active_time: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    agent_session_id: str
    agent_info: AgentInfo
    turn_start_time: _timestamp_pb2.Timestamp
    last_event_time: _timestamp_pb2.Timestamp
    request_id: str
    turn_elapsed: _duration_pb2.Duration
    since_last_event: _duration_pb2.Duration
    owner: str
    modes: SessionModes
    config_options: _containers.RepeatedCompositeFieldContainer[ConfigOption]
    available_commands: _containers.RepeatedCompositeFieldContainer[AvailableCommand]
    title: str
    usage: SessionUsage
    turn_id: str
    replica: str
    mcp_servers: _containers.RepeatedCompositeFieldContainer[McpServerInfo]
    client_tools: _containers.RepeatedCompositeFieldContainer[ClientTool]
    def __init__(self, session_id: _Optional[str] = ..., agent: _Optional[str] = ..., cwd: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_active_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_session_id: _Optional[str] = ..., agent_info: _Optional[_Union[AgentInfo, _Mapping]] = ..., turn_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., turn_elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., since_last_event: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ..., modes: _Optional[_Union[SessionModes, _Mapping]] = ..., config_options: _Optional[_Iterable[_Union[ConfigOption, _Mapping]]] = ..., available_commands: _Optional[_Iterable[_Union[AvailableCommand, _Mapping]]] = ..., title: _Optional[str] = ..., usage: _Optional[_Union[SessionUsage, _Mapping]] = ..., turn_id: _Optional[str] = ..., replica: _Optional[str] = ..., mcp_servers: _Optional[_Iterable[_Union[McpServerInfo, _Mapping]]] = ..., client_tools: _Optional[_Iterable[_Union[ClientTool, _Mapping]]] = ...) -> None: ...

class McpServerInfo(_message.Message):
    __slots__ = ("name", "transport", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    transport: str
    source: str
    def __init__(self, name: _Optional[str] = ..., transport: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class SessionMode(_message.Message):
    __slots__ = ("id", "name", "description")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class SessionModes(_message.Message):
    __slots__ = ("current_mode_id", "available_modes")
    CURRENT_MODE_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MODES_FIELD_NUMBER: _ClassVar[int]
    current_mode_id: str
    available_modes: _containers.RepeatedCompositeFieldContainer[SessionMode]
    def __init__(self, current_mode_id: _Optional[str] = ..., available_modes: _Optional[_Iterable[_Union[SessionMode, _Mapping]]] = ...) -> None: ...

class ConfigOptionValue(_message.Message):
    __slots__ = ("value", "name", "description", "group")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    value: str
    name: str
    description: str
    group: str
    def __init__(self, value: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class ConfigOption(_message.Message):
    __slots__ = ("id", "name", "description", "category", "type", "current_value", "values")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    category: str
    type: str
    current_value: str
    values: _containers.RepeatedCompositeFieldContainer[ConfigOptionValue]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., category: _Optional[str] = ..., type: _Optional[str] = ..., current_value: _Optional[str] = ..., values: _Optional[_Iterable[_Union[ConfigOptionValue, _Mapping]]] = ...) -> None: ...

class AvailableCommand(_message.Message):
    __slots__ = ("name", "description", "input_hint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_HINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_hint: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_hint: _Optional[str] = ...) -> None: ...

class SessionUsage(_message.Message):
    __slots__ = ("context_used", "context_size", "cost_amount", "cost_currency", "last_turn")
    CONTEXT_USED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    COST_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    COST_CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_FIELD_NUMBER: _ClassVar[int]
    context_used: int
    context_size: int
    cost_amount: float
    cost_currency: str
    last_turn: Usage
    def __init__(self, context_used: _Optional[int] = ..., context_size: _Optional[int] = ..., cost_amount: _Optional[float] = ..., cost_currency: _Optional[str] = ..., last_turn: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("agent", "cwd", "request_id", "labels", "mcp_servers", "client_mcp_servers", "client_tools")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MCP_SERVERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOOLS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    cwd: str
    request_id: str
    labels: _containers.ScalarMap[str, str]
    mcp_servers: _containers.RepeatedScalarFieldContainer[str]
    client_mcp_servers: _containers.RepeatedCompositeFieldContainer[McpServer]
    client_tools: _containers.RepeatedCompositeFieldContainer[ClientTool]
    def __init__(self, agent: _Optional[str] = ..., cwd: _Optional[str] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., mcp_servers: _Optional[_Iterable[str]] = ..., client_mcp_servers: _Optional[_Iterable[_Union[McpServer, _Mapping]]] = ..., client_tools: _Optional[_Iterable[_Union[ClientTool, _Mapping]]] = ...) -> None: ...

class ClientTool(_message.Message):
    __slots__ = ("name", "description", "input_schema")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_schema: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class McpServer(_message.Message):
    __slots__ = ("name", "stdio", "http", "sse")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    SSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    stdio: McpStdio
    http: McpRemote
    sse: McpRemote
    def __init__(self, name: _Optional[str] = ..., stdio: _Optional[_Union[McpStdio, _Mapping]] = ..., http: _Optional[_Union[McpRemote, _Mapping]] = ..., sse: _Optional[_Union[McpRemote, _Mapping]] = ...) -> None: ...

class McpStdio(_message.Message):
    __slots__ = ("command", "args", "env")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    def __init__(self, command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class McpRemote(_message.Message):
    __slots__ = ("url", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    URL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    url: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, url: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TextContent(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ImageContent(_message.Message):
    __slots__ = ("data", "mime_type", "uri")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    uri: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class ResourceLink(_message.Message):
    __slots__ = ("uri", "name", "mime_type", "title", "description", "size")
    URI_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    name: str
    mime_type: str
    title: str
    description: str
    size: int
    def __init__(self, uri: _Optional[str] = ..., name: _Optional[str] = ..., mime_type: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class EmbeddedResource(_message.Message):
    __slots__ = ("uri", "mime_type", "text", "blob")
    URI_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    uri: str
    mime_type: str
    text: str
    blob: bytes
    def __init__(self, uri: _Optional[str] = ..., mime_type: _Optional[str] = ..., text: _Optional[str] = ..., blob: _Optional[bytes] = ...) -> None: ...

class ContentBlock(_message.Message):
    __slots__ = ("text", "image", "resource_link", "resource")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_LINK_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    text: TextContent
    image: ImageContent
    resource_link: ResourceLink
    resource: EmbeddedResource
    def __init__(self, text: _Optional[_Union[TextContent, _Mapping]] = ..., image: _Optional[_Union[ImageContent, _Mapping]] = ..., resource_link: _Optional[_Union[ResourceLink, _Mapping]] = ..., resource: _Optional[_Union[EmbeddedResource, _Mapping]] = ...) -> None: ...

class PromptRequest(_message.Message):
    __slots__ = ("session_id", "text", "content", "stall_timeout", "wait_timeout", "permission_policy", "permission_timeout", "on_disconnect")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STALL_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    content: _containers.RepeatedCompositeFieldContainer[ContentBlock]
    stall_timeout: _duration_pb2.Duration
    wait_timeout: _duration_pb2.Duration
    permission_policy: str
    permission_timeout: _duration_pb2.Duration
    on_disconnect: OnDisconnect
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentBlock, _Mapping]]] = ..., stall_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., wait_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., permission_policy: _Optional[str] = ..., permission_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., on_disconnect: _Optional[_Union[OnDisconnect, str]] = ...) -> None: ...

class ContentChunk(_message.Message):
    __slots__ = ("content", "message_id")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    content: ContentBlock
    message_id: str
    def __init__(self, content: _Optional[_Union[ContentBlock, _Mapping]] = ..., message_id: _Optional[str] = ...) -> None: ...

class ToolCallLocation(_message.Message):
    __slots__ = ("path", "line")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    path: str
    line: int
    def __init__(self, path: _Optional[str] = ..., line: _Optional[int] = ...) -> None: ...

class Diff(_message.Message):
    __slots__ = ("path", "old_text", "new_text")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OLD_TEXT_FIELD_NUMBER: _ClassVar[int]
    NEW_TEXT_FIELD_NUMBER: _ClassVar[int]
    path: str
    old_text: str
    new_text: str
    def __init__(self, path: _Optional[str] = ..., old_text: _Optional[str] = ..., new_text: _Optional[str] = ...) -> None: ...

class ToolCallContent(_message.Message):
    __slots__ = ("block", "diff", "terminal_id")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    block: ContentBlock
    diff: Diff
    terminal_id: str
    def __init__(self, block: _Optional[_Union[ContentBlock, _Mapping]] = ..., diff: _Optional[_Union[Diff, _Mapping]] = ..., terminal_id: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("tool_call_id", "title", "kind", "status", "content", "locations", "raw_input", "raw_output")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_INPUT_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    title: str
    kind: str
    status: ToolCallStatus
    content: _containers.RepeatedCompositeFieldContainer[ToolCallContent]
    locations: _containers.RepeatedCompositeFieldContainer[ToolCallLocation]
    raw_input: _struct_pb2.Value
    raw_output: _struct_pb2.Value
    def __init__(self, tool_call_id: _Optional[str] = ..., title: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[_Union[ToolCallStatus, str]] = ..., content: _Optional[_Iterable[_Union[ToolCallContent, _Mapping]]] = ..., locations: _Optional[_Iterable[_Union[ToolCallLocation, _Mapping]]] = ..., raw_input: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., raw_output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class ToolCallUpdate(_message.Message):
    __slots__ = ("tool_call_id", "title", "kind", "status", "content", "locations", "raw_input", "raw_output")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_INPUT_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    title: str
    kind: str
    status: ToolCallStatus
    content: _containers.RepeatedCompositeFieldContainer[ToolCallContent]
    locations: _containers.RepeatedCompositeFieldContainer[ToolCallLocation]
    raw_input: _struct_pb2.Value
    raw_output: _struct_pb2.Value
    def __init__(self, tool_call_id: _Optional[str] = ..., title: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[_Union[ToolCallStatus, str]] = ..., content: _Optional[_Iterable[_Union[ToolCallContent, _Mapping]]] = ..., locations: _Optional[_Iterable[_Union[ToolCallLocation, _Mapping]]] = ..., raw_input: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., raw_output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class PlanEntry(_message.Message):
    __slots__ = ("content", "priority", "status")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    content: str
    priority: str
    status: str
    def __init__(self, content: _Optional[str] = ..., priority: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[PlanEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[PlanEntry, _Mapping]]] = ...) -> None: ...

class PermissionOption(_message.Message):
    __slots__ = ("option_id", "name", "kind")
    OPTION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    option_id: str
    name: str
    kind: str
    def __init__(self, option_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class PermissionEvent(_message.Message):
    __slots__ = ("tool_call_id", "title", "options", "outcome", "selected_option_id", "policy", "request_id")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SELECTED_OPTION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    title: str
    options: _containers.RepeatedCompositeFieldContainer[PermissionOption]
    outcome: PermissionOutcome
    selected_option_id: str
    policy: str
    request_id: str
    def __init__(self, tool_call_id: _Optional[str] = ..., title: _Optional[str] = ..., options: _Optional[_Iterable[_Union[PermissionOption, _Mapping]]] = ..., outcome: _Optional[_Union[PermissionOutcome, str]] = ..., selected_option_id: _Optional[str] = ..., policy: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PermissionRequest(_message.Message):
    __slots__ = ("request_id", "tool_call", "options", "expire_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tool_call: ToolCallUpdate
    options: _containers.RepeatedCompositeFieldContainer[PermissionOption]
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., tool_call: _Optional[_Union[ToolCallUpdate, _Mapping]] = ..., options: _Optional[_Iterable[_Union[PermissionOption, _Mapping]]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ElicitationRequest(_message.Message):
    __slots__ = ("request_id", "message", "mode", "requested_schema", "url", "tool_call_id", "expire_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    message: str
    mode: str
    requested_schema: _struct_pb2.Struct
    url: str
    tool_call_id: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., message: _Optional[str] = ..., mode: _Optional[str] = ..., requested_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., url: _Optional[str] = ..., tool_call_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ElicitationEvent(_message.Message):
    __slots__ = ("request_id", "action", "policy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    action: ElicitationAction
    policy: str
    def __init__(self, request_id: _Optional[str] = ..., action: _Optional[_Union[ElicitationAction, str]] = ..., policy: _Optional[str] = ...) -> None: ...

class ModeUpdate(_message.Message):
    __slots__ = ("current_mode_id",)
    CURRENT_MODE_ID_FIELD_NUMBER: _ClassVar[int]
    current_mode_id: str
    def __init__(self, current_mode_id: _Optional[str] = ...) -> None: ...

class ConfigUpdate(_message.Message):
    __slots__ = ("config_options",)
    CONFIG_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    config_options: _containers.RepeatedCompositeFieldContainer[ConfigOption]
    def __init__(self, config_options: _Optional[_Iterable[_Union[ConfigOption, _Mapping]]] = ...) -> None: ...

class CommandsUpdate(_message.Message):
    __slots__ = ("available_commands",)
    AVAILABLE_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    available_commands: _containers.RepeatedCompositeFieldContainer[AvailableCommand]
    def __init__(self, available_commands: _Optional[_Iterable[_Union[AvailableCommand, _Mapping]]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("title", "updated_at")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    title: str
    updated_at: str
    def __init__(self, title: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class FileWrite(_message.Message):
    __slots__ = ("path", "bytes", "created")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    created: bool
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class TerminalOutput(_message.Message):
    __slots__ = ("terminal_id", "output", "truncated", "exited", "exit_code", "signal")
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    terminal_id: str
    output: str
    truncated: bool
    exited: bool
    exit_code: int
    signal: str
    def __init__(self, terminal_id: _Optional[str] = ..., output: _Optional[str] = ..., truncated: _Optional[bool] = ..., exited: _Optional[bool] = ..., exit_code: _Optional[int] = ..., signal: _Optional[str] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("kind", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class OtherUpdate(_message.Message):
    __slots__ = ("kind", "payload")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload: _struct_pb2.Struct
    def __init__(self, kind: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "total_tokens", "thought_tokens", "cached_read_tokens", "cached_write_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THOUGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    thought_tokens: int
    cached_read_tokens: int
    cached_write_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., thought_tokens: _Optional[int] = ..., cached_read_tokens: _Optional[int] = ..., cached_write_tokens: _Optional[int] = ...) -> None: ...

class TurnResult(_message.Message):
    __slots__ = ("stop_reason", "usage")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    usage: Usage
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class PromptEvent(_message.Message):
    __slots__ = ("seq", "message_chunk", "thought_chunk", "tool_call", "tool_call_update", "plan", "permission", "notice", "other", "result", "permission_request", "elicitation_request", "elicitation", "mode_update", "config_update", "commands_update", "session_info", "usage_update", "file_write", "terminal_output", "tool_request", "tool_outcome")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    THOUGHT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_UPDATE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ELICITATION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ELICITATION_FIELD_NUMBER: _ClassVar[int]
    MODE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_UPDATE_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_INFO_FIELD_NUMBER: _ClassVar[int]
    USAGE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    FILE_WRITE_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOOL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TOOL_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    message_chunk: ContentChunk
    thought_chunk: ContentChunk
    tool_call: ToolCall
    tool_call_update: ToolCallUpdate
    plan: Plan
    permission: PermissionEvent
    notice: Notice
    other: OtherUpdate
    result: TurnResult
    permission_request: PermissionRequest
    elicitation_request: ElicitationRequest
    elicitation: ElicitationEvent
    mode_update: ModeUpdate
    config_update: ConfigUpdate
    commands_update: CommandsUpdate
    session_info: SessionInfo
    usage_update: SessionUsage
    file_write: FileWrite
    terminal_output: TerminalOutput
    tool_request: ToolRequest
    tool_outcome: ToolOutcome
    def __init__(self, seq: _Optional[int] = ..., message_chunk: _Optional[_Union[ContentChunk, _Mapping]] = ..., thought_chunk: _Optional[_Union[ContentChunk, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_call_update: _Optional[_Union[ToolCallUpdate, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., permission: _Optional[_Union[PermissionEvent, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., other: _Optional[_Union[OtherUpdate, _Mapping]] = ..., result: _Optional[_Union[TurnResult, _Mapping]] = ..., permission_request: _Optional[_Union[PermissionRequest, _Mapping]] = ..., elicitation_request: _Optional[_Union[ElicitationRequest, _Mapping]] = ..., elicitation: _Optional[_Union[ElicitationEvent, _Mapping]] = ..., mode_update: _Optional[_Union[ModeUpdate, _Mapping]] = ..., config_update: _Optional[_Union[ConfigUpdate, _Mapping]] = ..., commands_update: _Optional[_Union[CommandsUpdate, _Mapping]] = ..., session_info: _Optional[_Union[SessionInfo, _Mapping]] = ..., usage_update: _Optional[_Union[SessionUsage, _Mapping]] = ..., file_write: _Optional[_Union[FileWrite, _Mapping]] = ..., terminal_output: _Optional[_Union[TerminalOutput, _Mapping]] = ..., tool_request: _Optional[_Union[ToolRequest, _Mapping]] = ..., tool_outcome: _Optional[_Union[ToolOutcome, _Mapping]] = ...) -> None: ...

class ToolRequest(_message.Message):
    __slots__ = ("request_id", "tool", "input", "expire_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tool: str
    input: _struct_pb2.Struct
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., tool: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ToolOutcome(_message.Message):
    __slots__ = ("request_id", "tool", "is_error", "decided_by")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tool: str
    is_error: bool
    decided_by: str
    def __init__(self, request_id: _Optional[str] = ..., tool: _Optional[str] = ..., is_error: _Optional[bool] = ..., decided_by: _Optional[str] = ...) -> None: ...

class CancelPromptRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CancelPromptResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "agent", "labels", "owner")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    agent: str
    labels: _containers.ScalarMap[str, str]
    owner: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., agent: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., owner: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Agent(_message.Message):
    __slots__ = ("name", "command", "args", "permission_policy", "is_default", "client_fs", "client_terminal", "auth_method")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TERMINAL_FIELD_NUMBER: _ClassVar[int]
    AUTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    name: str
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    permission_policy: str
    is_default: bool
    client_fs: bool
    client_terminal: bool
    auth_method: str
    def __init__(self, name: _Optional[str] = ..., command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., permission_policy: _Optional[str] = ..., is_default: _Optional[bool] = ..., client_fs: _Optional[bool] = ..., client_terminal: _Optional[bool] = ..., auth_method: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "default_agent")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_AGENT_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    default_agent: str
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., default_agent: _Optional[str] = ...) -> None: ...

class RespondPermissionRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "option_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPTION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    option_id: str
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., option_id: _Optional[str] = ...) -> None: ...

class RespondPermissionResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: PermissionOutcome
    def __init__(self, outcome: _Optional[_Union[PermissionOutcome, str]] = ...) -> None: ...

class RespondElicitationRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "action", "content")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    action: ElicitationAction
    content: _struct_pb2.Struct
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., action: _Optional[_Union[ElicitationAction, str]] = ..., content: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RespondElicitationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RespondToolCallRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "result", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    result: ToolResult
    error: str
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., result: _Optional[_Union[ToolResult, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("text", "structured")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    text: str
    structured: _struct_pb2.Struct
    def __init__(self, text: _Optional[str] = ..., structured: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RespondToolCallResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetSessionModeRequest(_message.Message):
    __slots__ = ("session_id", "mode_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    mode_id: str
    def __init__(self, session_id: _Optional[str] = ..., mode_id: _Optional[str] = ...) -> None: ...

class SetSessionConfigOptionRequest(_message.Message):
    __slots__ = ("session_id", "config_id", "value")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config_id: str
    value: str
    def __init__(self, session_id: _Optional[str] = ..., config_id: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class AuthenticateAgentRequest(_message.Message):
    __slots__ = ("agent", "method_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METHOD_ID_FIELD_NUMBER: _ClassVar[int]
    agent: str
    method_id: str
    def __init__(self, agent: _Optional[str] = ..., method_id: _Optional[str] = ...) -> None: ...

class AuthenticateAgentResponse(_message.Message):
    __slots__ = ("agent", "method_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METHOD_ID_FIELD_NUMBER: _ClassVar[int]
    agent: str
    method_id: str
    def __init__(self, agent: _Optional[str] = ..., method_id: _Optional[str] = ...) -> None: ...

class WatchTurnRequest(_message.Message):
    __slots__ = ("session_id", "after_seq", "turn_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_seq: int
    turn_id: str
    def __init__(self, session_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., turn_id: _Optional[str] = ...) -> None: ...

class ListTurnsRequest(_message.Message):
    __slots__ = ("session_id", "page_size", "page_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    page_size: int
    page_token: str
    def __init__(self, session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTurnsResponse(_message.Message):
    __slots__ = ("turns", "next_page_token")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    next_page_token: str
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetTurnRequest(_message.Message):
    __slots__ = ("session_id", "turn_id", "after_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    after_seq: int
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class TurnError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("turn_id", "session_id", "state", "prompt", "start_time", "end_time", "on_disconnect", "result", "error", "oldest_kept_seq", "last_seq", "events", "events_truncated")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OLDEST_KEPT_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    session_id: str
    state: TurnState
    prompt: _containers.RepeatedCompositeFieldContainer[ContentBlock]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    on_disconnect: OnDisconnect
    result: TurnResult
    error: TurnError
    oldest_kept_seq: int
    last_seq: int
    events: _containers.RepeatedCompositeFieldContainer[PromptEvent]
    events_truncated: bool
    def __init__(self, turn_id: _Optional[str] = ..., session_id: _Optional[str] = ..., state: _Optional[_Union[TurnState, str]] = ..., prompt: _Optional[_Iterable[_Union[ContentBlock, _Mapping]]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., on_disconnect: _Optional[_Union[OnDisconnect, str]] = ..., result: _Optional[_Union[TurnResult, _Mapping]] = ..., error: _Optional[_Union[TurnError, _Mapping]] = ..., oldest_kept_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[PromptEvent, _Mapping]]] = ..., events_truncated: _Optional[bool] = ...) -> None: ...
