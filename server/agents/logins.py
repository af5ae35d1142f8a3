"""Which ACP auth method each agent's processes authenticate with.

An agent that answers `session/new` with "auth required" (AGENT_AUTH_REQUIRED) needs an
`authenticate` call on every new process first. The method comes from the agent's config
(`auth_method`) or from an AuthenticateAgent call, which changes it at run time, so the
next process of that agent authenticates without a restart of the server.

What reaches each principal's agents is the method, never a file: every new process runs
`authenticate` with it in its own home (sandbox.py: `homes/<principal>/<agent>`), with the
credentials its config passes it (`pass_env`, `env`). The login's own trial process runs in
no principal's home (`homes/<agent>`, the operator's), so whatever it writes there is read
by no principal's agent, and no principal's files are read by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from sessiongate.server.errors import SessionBusy
from sessiongate.server.sandbox.launcher import homes_of
from sessiongate.server.settings import AgentConfig, ServerLimits

if TYPE_CHECKING:
    from sessiongate.server.agents.protocol import AgentProcess

log = logging.getLogger("sessiongate.logins")


class AgentLogins:
    def __init__(self, agents: Mapping[str, AgentConfig]) -> None:
        self._methods = {name: config.auth_method for name, config in agents.items() if config.auth_method}
        self._busy = asyncio.Lock()  # one login at a time: each starts an agent process

    def method(self, agent: str) -> str:
        """The method `agent`'s processes authenticate with; empty: none."""
        return self._methods.get(agent, "")

    def use(self, agent: str, method: str) -> None:
        self._methods[agent] = method

    async def log_in(
        self,
        config: AgentConfig,
        method: str,
        make_agent: Callable[[], AgentProcess],
        limits: ServerLimits,
        on_success: Callable[[], Awaitable[None]],
    ) -> None:
        """Start a fresh process of the agent, authenticate it with `method`, and on success
        have every later process do the same. The process is ended either way."""
        if self._busy.locked():
            raise SessionBusy(
                "another AuthenticateAgent call is running; retry shortly",
                metadata={"agent": config.name},
                retry_after=limits.busy_retry_after,
            )
        async with self._busy:
            with homes_of(""):  # the operator's home, never a principal's (docs/agents/logins.md)
                agent = make_agent()
            try:
                await agent.start(limits.agent_start_timeout, login=False)  # not the old way
                await agent.authenticate(method)
            finally:
                await agent.terminate()
            self.use(config.name, method)
            log.info("agent authenticates from now on agent=%s method=%s", config.name, method)
            await on_success()
