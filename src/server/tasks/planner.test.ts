import http from "node:http";
import type { AddressInfo } from "node:net";
import { PiccoloError } from "../errors.js";
import { agentCommand, builtinPlan, checkPlan, modelPlan, splitCommand } from "./planner.js";

describe("builtinPlan", () => {
  test("one task per line or bullet; headings, fences and blank lines skipped", () => {
    const p = builtinPlan("# Plan\n\n- first thing\n* second\n1. third\n2) fourth\n- [ ] fifth\n```\nplain line\n", "Do: {task}");
    expect(p.tasks).toEqual(["first thing", "second", "third", "fourth", "fifth", "plain line"]);
    expect(p.promptTemplate).toBe("Do: {task}");
    expect(builtinPlan("a", "").promptTemplate).toBe("{task}");
  });

  test("a request without tasks or a template without {task} is INVALID_ARGUMENT naming the field", () => {
    expect(() => builtinPlan("# only\n\n", "")).toThrow(expect.objectContaining({ kind: "invalid_argument", field: "request" }));
    expect(() => builtinPlan("a", "no placeholder")).toThrow(expect.objectContaining({ field: "prompt_template" }));
    expect(() => checkPlan({ tasks: ["x".repeat(3000)], promptTemplate: "{task}" }, "request")).toThrow(/at most 2000/);
  });
});

describe("splitCommand", () => {
  test("splits like a shell without expanding anything", () => {
    expect(splitCommand(`agent exec "{prompt}"`)).toEqual(["agent", "exec", "{prompt}"]);
    expect(splitCommand(`a 'b c' "d \\"e\\" $HOME" f\\ g ""`)).toEqual(["a", "b c", 'd "e" $HOME', "f g", ""]);
    expect(() => splitCommand(`agent "open`)).toThrow(/unterminated/);
    expect(agentCommand(["agent", "exec", "--", "{prompt}!"], "do $(rm -rf /)")).toEqual(["agent", "exec", "--", "do $(rm -rf /)!"]);
  });
});

describe("modelPlan", () => {
  let server: http.Server;
  let url = "";
  let answer: { status: number; body: string } = { status: 200, body: "" };
  const chat = (content: string) => ({ status: 200, body: JSON.stringify({ choices: [{ message: { role: "assistant", content } }] }) });
  beforeAll(async () => {
    server = http.createServer((req, res) => {
      req.resume();
      req.on("end", () => {
        res.writeHead(answer.status, { "content-type": "application/json" });
        res.end(answer.body);
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));
  const plan = () => modelPlan({ url, model: "m", apiKey: Buffer.from("k"), request: "r", signal: new AbortController().signal });

  test("takes a JSON task list, also inside a Markdown fence", async () => {
    answer = chat('```json\n{"tasks": [" one ", "two"], "prompt": "P: {task}"}\n```');
    expect(await plan()).toEqual({ tasks: ["one", "two"], promptTemplate: "P: {task}" });
  });

  test.each([
    ["prose", chat("Sure, here you go: do one, then two."), /not a JSON object/],
    ["no tasks", chat('{"tasks": [], "prompt": "{task}"}'), /holds no task/],
    ["tasks not strings", chat('{"tasks": [1, 2], "prompt": "{task}"}'), /not a list of strings/],
    ["multi-line task", chat('{"tasks": ["a\\nb"], "prompt": "{task}"}'), /one line/],
    ["no placeholder", chat('{"tasks": ["a"], "prompt": "do it"}'), /placeholder/],
    ["no choices", { status: 200, body: "{}" }, /content is missing/],
  ])("refuses an answer with %s", async (_name, a, why) => {
    answer = a;
    const e = (await plan().catch((x: unknown) => x)) as PiccoloError;
    expect(e.kind).toBe("failed_precondition");
    expect(e.message).toMatch(/not a task list/);
    expect(e.message).toMatch(why);
  });

  test("an HTTP error names the endpoint's answer; a closed port is UNAVAILABLE", async () => {
    answer = { status: 401, body: '{"error":{"message":"Incorrect API key provided: sk-echoed-key"}}' };
    const e = (await modelPlan({ url, model: "m", apiKey: Buffer.from("sk-echoed-key\n"), request: "r", signal: new AbortController().signal }).catch((x: unknown) => x)) as Error;
    expect(e.message).toMatch(/HTTP 401.*Incorrect API key provided: \[redacted\]/);
    expect(e.message).not.toContain("sk-echoed-key");
    await expect(modelPlan({ url: "http://127.0.0.1:1/v1", model: "m", apiKey: undefined, request: "r", signal: new AbortController().signal })).rejects.toMatchObject({ kind: "unavailable" });
  });
});
