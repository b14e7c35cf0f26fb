/**
 * A loopback server that speaks the OpenAI chat-completions HTTP protocol (POST
 * /v1/chat/completions, GET /v1/models) with canned answers, for testing the model planner.
 * It checks what a real endpoint checks (a JSON body with a model and messages, the bearer key
 * when one is set) and records every request so a test can see what the planner sent.
 *
 * From a shell: `node dist/test/sim/openai.js --answer-file FILE [--api-key-file FILE] [--port N]`
 * serves the file's text as every answer's message content.
 */
import { randomBytes } from "node:crypto";
import { readFileSync, realpathSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";

/** One recorded chat-completions request. */
export interface RecordedRequest {
  readonly authorization: string | undefined;
  readonly body: { model: string; messages: { role: string; content: string }[]; [k: string]: unknown };
}

/** What to answer: the assistant message's content, or a whole HTTP answer. */
export type CannedAnswer = string | { readonly status: number; readonly body: string };

/** Options of startOpenAiSim. */
export interface OpenAiSimOptions {
  /** The answer for a request (called per request, so answers can depend on the user message). */
  readonly answer: (req: RecordedRequest) => CannedAnswer;
  /** When set, requests must carry `Authorization: Bearer <apiKey>` (else 401 as the real API does). */
  readonly apiKey?: string;
  /** Models GET /v1/models lists and requests may name; default ["sim-planner-1"]. */
  readonly models?: readonly string[];
  readonly port?: number;
}

/** A running simulator. */
export interface OpenAiSim {
  /** Base URL including "/v1", as clients take it. */
  readonly url: string;
  /** Chat-completions requests received, in order. */
  readonly requests: RecordedRequest[];
  stop(): Promise<void>;
}

const error = (res: http.ServerResponse, status: number, message: string, type: string, code: string | null = null): void => {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify({ error: { message, type, param: null, code } }));
};

/** Starts the simulator on 127.0.0.1. */
export async function startOpenAiSim(options: OpenAiSimOptions): Promise<OpenAiSim> {
  const models = options.models ?? ["sim-planner-1"];
  const requests: RecordedRequest[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const auth = req.headers["authorization"];
      if (options.apiKey !== undefined && auth !== `Bearer ${options.apiKey}`) {
        return error(res, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key");
      }
      if (req.method === "GET" && req.url === "/v1/models") {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ object: "list", data: models.map((id) => ({ id, object: "model", created: 0, owned_by: "piccolo-sim" })) }));
        return;
      }
      if (req.url !== "/v1/chat/completions") return error(res, 404, `Unknown request URL: ${req.method} ${req.url}`, "invalid_request_error");
      if (req.method !== "POST") return error(res, 405, "Method not allowed", "invalid_request_error");
      let body: RecordedRequest["body"];
      try {
        body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as RecordedRequest["body"];
      } catch {
        return error(res, 400, "We could not parse the JSON body of your request.", "invalid_request_error");
      }
      if (typeof body !== "object" || body === null || typeof body.model !== "string") return error(res, 400, "you must provide a model parameter", "invalid_request_error");
      if (!models.includes(body.model)) return error(res, 404, `The model \`${body.model}\` does not exist`, "invalid_request_error", "model_not_found");
      if (!Array.isArray(body.messages) || body.messages.length === 0 || !body.messages.every((m) => typeof m?.role === "string" && typeof m?.content === "string")) {
        return error(res, 400, "'messages' must be a non-empty array of {role, content}", "invalid_request_error");
      }
      const rec: RecordedRequest = { authorization: auth, body };
      requests.push(rec);
      const a = options.answer(rec);
      if (typeof a !== "string") {
        res.writeHead(a.status, { "content-type": "application/json" });
        res.end(a.body);
        return;
      }
      const prompt = body.messages.reduce((n, m) => n + m.content.length, 0);
      res.writeHead(200, { "content-type": "application/json" });
      res.end(
        JSON.stringify({
          id: `chatcmpl-${randomBytes(12).toString("hex")}`,
          object: "chat.completion",
          created: Math.floor(Date.now() / 1000),
          model: body.model,
          choices: [{ index: 0, message: { role: "assistant", content: a }, finish_reason: "stop", logprobs: null }],
          usage: { prompt_tokens: Math.ceil(prompt / 4), completion_tokens: Math.ceil(a.length / 4), total_tokens: Math.ceil(prompt / 4) + Math.ceil(a.length / 4) },
        }),
      );
    });
  });
  await new Promise<void>((resolve) => server.listen(options.port ?? 0, "127.0.0.1", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    stop: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

const isMain = process.argv[1] !== undefined && fileURLToPath(import.meta.url) === realpathSync(process.argv[1]);
if (isMain) {
  const args = process.argv.slice(2);
  const arg = (name: string): string | undefined => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  if (args.includes("--help") || !arg("--answer-file")) {
    process.stdout.write("usage: openai.js --answer-file FILE [--api-key-file FILE] [--port N]\n  Serves POST /v1/chat/completions on 127.0.0.1 answering FILE's text; prints {url} as JSON.\n");
    process.exit(args.includes("--help") ? 0 : 2);
  }
  const answer = readFileSync(arg("--answer-file")!, "utf8");
  const keyFile = arg("--api-key-file");
  const sim = await startOpenAiSim({ answer: () => answer, apiKey: keyFile ? readFileSync(keyFile, "utf8").trim() : undefined, port: Number(arg("--port") ?? 0) });
  process.stdout.write(JSON.stringify({ url: sim.url }) + "\n");
  const stop = (): void => void sim.stop().then(() => process.exit(0));
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}
