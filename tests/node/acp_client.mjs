// A third-party ACP client written with the ACP TypeScript SDK (@agentclientprotocol/sdk), run
// by the tests against any ACP agent command (the built-in agent, `sessiongate acp ...`).
// Usage: node acp_client.mjs SCRIPT.json -- AGENT_CMD [ARGS...]
// SCRIPT.json: {"permission": KIND, "steps": [STEP, ...]}; each STEP is one of
//   {"op": "initialize", "clientCapabilities": {...}}
//   {"op": "new", "cwd": DIR, "as": NAME}              NAME then stands for the new session id
//   {"op": "prompt", "session": NAME|ID, "text": T, "permission": KIND, "cancelAfterMs": MS}
//   {"op": "load"|"resume", "session": NAME|ID, "cwd": DIR}
//   {"op": "list", "cwd": DIR}     {"op": "close", "session": NAME|ID}
// "session" defaults to the last session created; KIND is the permission option kind chosen
// (allow_once, allow_always, reject_once, reject_always) or "cancelled"; cancelAfterMs sends
// session/cancel that long after the prompt was sent. Prints one JSON line per step:
//   {op, ok, sessionId?, stopReason?, result?, updates: [{kind, text?, toolCallId?, status?}],
//    permissions: [{toolCallId, title, options: [kind], chosen}], error?: {code, message, data}}
// A failing step is reported and the script goes on. Exits 0 once every step ran.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { Readable, Writable } from "node:stream";
import * as acp from "@agentclientprotocol/sdk";

const separator = process.argv.indexOf("--");
if (separator < 3 || separator === process.argv.length - 1) {
  process.stderr.write("usage: node acp_client.mjs SCRIPT.json -- AGENT_CMD [ARGS...]\n");
  process.exit(2);
}
const script = JSON.parse(readFileSync(process.argv[2], "utf8"));
const [command, ...args] = process.argv.slice(separator + 1);
const agentProcess = spawn(command, args, { stdio: ["pipe", "pipe", "inherit"] });
agentProcess.on("error", (error) => {
  process.stderr.write(`cannot start the agent: ${error.message}\n`);
  process.exit(3);
});

/** What a step saw: the updates and permission requests that arrived while it ran. */
let current = { updates: [], permissions: [] };

/** The fields a test checks of one session/update (the whole update stays out: bounded output). */
function summarize(update) {
  const summary = { kind: update.sessionUpdate };
  if (update.content && !Array.isArray(update.content) && update.content.type === "text") {
    summary.text = update.content.text;
  }
  for (const key of ["toolCallId", "status", "title", "currentModeId"]) {
    if (update[key] !== undefined) summary[key] = update[key];
  }
  return summary;
}

function describeError(error) {
  if (error instanceof acp.RequestError || (error && typeof error.code === "number")) {
    return { code: error.code, message: error.message, data: error.data ?? null };
  }
  return { code: null, message: String(error?.message ?? error), data: null };
}

const app = acp
  .client({ name: "sessiongate-tests" })
  .onNotification(acp.methods.client.session.update, ({ params }) => {
    current.updates.push(summarize(params.update));
  })
  .onRequest(acp.methods.client.session.requestPermission, ({ params }) => {
    const wanted = current.permissionKind ?? script.permission ?? "reject_once";
    const option = params.options.find((candidate) => candidate.kind === wanted);
    current.permissions.push({
      toolCallId: params.toolCall.toolCallId,
      title: params.toolCall.title ?? null,
      options: params.options.map((candidate) => candidate.kind),
      chosen: option ? option.kind : "cancelled",
    });
    return option
      ? { outcome: { outcome: "selected", optionId: option.optionId } }
      : { outcome: { outcome: "cancelled" } };
  });

const stream = acp.ndJsonStream(Writable.toWeb(agentProcess.stdin), Readable.toWeb(agentProcess.stdout));
const sessions = new Map();
let lastSession = null;

async function runStep(ctx, step) {
  const sessionId = () => sessions.get(step.session) ?? step.session ?? lastSession;
  switch (step.op) {
    case "initialize": {
      const result = await ctx.request(acp.methods.agent.initialize, {
        protocolVersion: acp.PROTOCOL_VERSION,
        clientCapabilities: step.clientCapabilities ?? {},
        clientInfo: { name: "sessiongate-tests-ts", version: "0" },
      });
      return { result };
    }
    case "new": {
      const result = await ctx.request(acp.methods.agent.session.new, { cwd: step.cwd, mcpServers: [] });
      lastSession = result.sessionId;
      if (step.as) sessions.set(step.as, result.sessionId);
      return { sessionId: result.sessionId };
    }
    case "prompt": {
      const id = sessionId();
      current.permissionKind = step.permission;
      const pending = ctx.request(acp.methods.agent.session.prompt, {
        sessionId: id,
        prompt: [{ type: "text", text: step.text }],
      });
      let timer;
      if (step.cancelAfterMs !== undefined) {
        timer = setTimeout(() => {
          ctx.notify(acp.methods.agent.session.cancel, { sessionId: id }).catch(() => {});
        }, step.cancelAfterMs);
      }
      try {
        const result = await pending;
        return { sessionId: id, stopReason: result.stopReason, result };
      } finally {
        clearTimeout(timer);
      }
    }
    case "load":
    case "resume": {
      const id = sessionId();
      const method = step.op === "load" ? acp.methods.agent.session.load : acp.methods.agent.session.resume;
      const result = await ctx.request(method, { sessionId: id, cwd: step.cwd, mcpServers: [] });
      lastSession = id;
      return { sessionId: id, result: result ?? null };
    }
    case "list": {
      const result = await ctx.request(acp.methods.agent.session.list, step.cwd ? { cwd: step.cwd } : {});
      return { result };
    }
    case "close": {
      const id = sessionId();
      const result = await ctx.request(acp.methods.agent.session.close, { sessionId: id });
      return { sessionId: id, result: result ?? null };
    }
    default:
      throw new Error(`unknown step op ${JSON.stringify(step.op)}`);
  }
}

try {
  await app.connectWith(stream, async (ctx) => {
    for (const step of script.steps) {
      current = { updates: [], permissions: [] };
      let line;
      try {
        line = { op: step.op, ok: true, ...(await runStep(ctx, step)) };
      } catch (error) {
        line = { op: step.op, ok: false, error: describeError(error) };
      }
      line.updates = current.updates;
      line.permissions = current.permissions;
      process.stdout.write(`${JSON.stringify(line)}\n`);
    }
  });
} finally {
  // The agent's stdin closing is its cue to exit; the test kills the process group anyway.
  agentProcess.stdin.end();
  const exited = new Promise((resolve) => agentProcess.once("exit", resolve));
  const timeout = new Promise((resolve) => setTimeout(resolve, 3000));
  if (agentProcess.exitCode === null) await Promise.race([exited, timeout]);
  if (agentProcess.exitCode === null) agentProcess.kill("SIGKILL");
}
process.exit(0);
