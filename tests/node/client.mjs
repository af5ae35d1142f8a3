// A third-party sessiongate client in Node.js (@grpc/grpc-js + @grpc/proto-loader), written
// as a Node user would: create a session, stream a prompt to its result, and decode a
// SESSION_BUSY error's grpc-status-details-bin into reason and retry delay.
// Usage: node client.mjs HOST:PORT PROTO_ROOT [--tls-ca CA.pem] [--token TOKEN]
//   --tls-ca (or SESSIONGATE_TLS_CA): connect over TLS, trusting this CA; default plaintext.
//   --token (or SESSIONGATE_TOKEN): send `authorization: Bearer TOKEN` on every call.
// Prints one JSON summary on stdout; a call that fails prints {"error": {code, reason, ...}}
// and exits 1.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: { "tls-ca": { type: "string" }, token: { type: "string" } },
});
const [target, protoRoot] = positionals;
const tlsCa = options["tls-ca"] ?? process.env.SESSIONGATE_TLS_CA;
const token = options.token ?? process.env.SESSIONGATE_TOKEN;
const definition = protoLoader.loadSync("sessiongate/v1/session_service.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { SessionService } = grpc.loadPackageDefinition(definition).sessiongate.v1;
const credentials = tlsCa ? grpc.credentials.createSsl(readFileSync(tlsCa)) : grpc.credentials.createInsecure();
const client = new SessionService(target, credentials);
const deadline = () => new Date(Date.now() + 30_000);
const metadata = () => {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  return md;
};

// google.rpc.Status and the details sessiongate sends, for decoding grpc-status-details-bin.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
          },
        },
      },
    },
  },
});

function decodeDetails(error) {
  const out = { code: error.code, message: error.details };
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return out;
  const status = rpc.lookupType("google.rpc.Status").decode(raw);
  out.message = status.message;
  for (const any of status.details) {
    const name = any.type_url.split("/").pop();
    const message = rpc.lookupType(name).decode(any.value);
    if (name === "google.rpc.ErrorInfo") Object.assign(out, { reason: message.reason, domain: message.domain });
    if (name === "google.rpc.RetryInfo") {
      const d = message.retry_delay;
      out.retry_delay_s = Number(d.seconds) + d.nanos / 1e9;
    }
  }
  return out;
}

const unary = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata(), { deadline: deadline() }, (err, response) =>
      err ? reject(err) : resolve(response),
    ),
  );

function streamPrompt(request) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.Prompt(request, metadata(), { deadline: deadline() });
    call.on("data", (event) => events.push(event));
    call.on("error", reject);
    call.on("end", () => resolve(events));
  });
}

async function conversation() {
  const session = await unary("CreateSession", { labels: { client: "node" } });
  const events = await streamPrompt({ session_id: session.session_id, text: "hello from node" });
  const reply = events
    .filter((e) => e.event === "message_chunk")
    .map((e) => e.message_chunk.content.text.text)
    .join("");
  const last = events[events.length - 1];

  // Make the session busy, then prompt it again: RESOURCE_EXHAUSTED with rich details.
  const long = streamPrompt({ session_id: session.session_id, text: "/sleep 2 long turn" });
  for (let i = 0; i < 100; i++) {
    const s = await unary("GetSession", { session_id: session.session_id });
    if (s.state === "SESSION_STATE_BUSY") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  let busy = null;
  try {
    await streamPrompt({ session_id: session.session_id, text: "again" });
  } catch (error) {
    busy = decodeDetails(error);
  }
  await long;
  return {
    session_id: session.session_id,
    kinds: events.map((e) => e.event),
    seqs: events.map((e) => Number(e.seq)),
    reply,
    stop_reason: last.result.stop_reason,
    busy,
  };
}

try {
  console.log(JSON.stringify(await conversation()));
} catch (error) {
  if (error.code === undefined) throw error; // not a gRPC status: a bug in this script
  console.log(JSON.stringify({ error: decodeDetails(error) }));
  process.exitCode = 1;
} finally {
  client.close();
}
