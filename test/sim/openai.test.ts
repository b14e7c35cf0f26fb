/**
 * The chat-completions simulator answers as the real API does: the response shape clients read,
 * 401 without the right bearer key, 404 for an unknown model, 400 for a body that is not a
 * request; and it records what it was sent.
 */
import { startOpenAiSim, type OpenAiSim } from "./openai.js";

let sim: OpenAiSim;

beforeAll(async () => {
  sim = await startOpenAiSim({ apiKey: "sk-test-123", answer: (r) => (r.body.messages.at(-1)!.content === "broken" ? { status: 500, body: '{"error":{"message":"boom"}}' } : `echo: ${r.body.messages.at(-1)!.content}`) });
});
afterAll(async () => sim?.stop());

const post = (body: unknown, key = "sk-test-123"): Promise<Response> =>
  fetch(`${sim.url}/chat/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${key}` }, body: typeof body === "string" ? body : JSON.stringify(body) });

test("answers a chat completion in the API's shape and records the request", async () => {
  const res = await post({ model: "sim-planner-1", messages: [{ role: "user", content: "hi" }] });
  expect(res.status).toBe(200);
  const body = (await res.json()) as { object: string; model: string; choices: { message: { role: string; content: string }; finish_reason: string }[]; usage: { total_tokens: number } };
  expect(body.object).toBe("chat.completion");
  expect(body.model).toBe("sim-planner-1");
  expect(body.choices[0]!.message).toEqual({ role: "assistant", content: "echo: hi" });
  expect(body.choices[0]!.finish_reason).toBe("stop");
  expect(body.usage.total_tokens).toBeGreaterThan(0);
  expect(sim.requests.at(-1)!.authorization).toBe("Bearer sk-test-123");
  expect(sim.requests.at(-1)!.body.messages).toEqual([{ role: "user", content: "hi" }]);
});

test("refuses a wrong key, an unknown model and a malformed body as the API does", async () => {
  const before = sim.requests.length;
  const wrongKey = await post({ model: "sim-planner-1", messages: [{ role: "user", content: "x" }] }, "sk-wrong");
  expect(wrongKey.status).toBe(401);
  expect(((await wrongKey.json()) as { error: { code: string } }).error.code).toBe("invalid_api_key");
  const model = await post({ model: "gpt-nope", messages: [{ role: "user", content: "x" }] });
  expect(model.status).toBe(404);
  expect(((await model.json()) as { error: { code: string } }).error.code).toBe("model_not_found");
  expect((await post("{not json")).status).toBe(400);
  expect((await post({ model: "sim-planner-1", messages: [] })).status).toBe(400);
  expect(sim.requests.length).toBe(before);
  expect((await post({ model: "sim-planner-1", messages: [{ role: "user", content: "broken" }] })).status).toBe(500);
});

test("lists its models", async () => {
  const res = await fetch(`${sim.url}/models`, { headers: { authorization: "Bearer sk-test-123" } });
  expect(((await res.json()) as { data: { id: string }[] }).data.map((m) => m.id)).toEqual(["sim-planner-1"]);
});
