/**
 * Planners turn a free-form request into a uniform task list (one task a line) and a prompt
 * template with a "{task}" placeholder. The built-in one splits lines and Markdown bullets; the
 * model planner asks an OpenAI-compatible chat-completions endpoint and checks what comes back.
 */
import { PiccoloError, invalidArgument } from "../errors.js";

/** What a planner produces. */
export interface Plan {
  readonly tasks: string[];
  readonly promptTemplate: string;
}

/** Most tasks a run takes. */
export const MAX_TASKS = 100;
/** Longest task text. */
export const MAX_TASK_CHARS = 2000;
/** The placeholder a prompt template must contain. */
export const TASK_PLACEHOLDER = "{task}";

const BULLET = /^\s*(?:[-*+]|\d+[.)])\s+(?:\[[ xX]\]\s+)?/;

/** Checks a task list and prompt template; throws naming `field` for what is wrong. */
export function checkPlan(plan: Plan, field: string): Plan {
  if (plan.tasks.length === 0) throw invalidArgument(field, "holds no task");
  if (plan.tasks.length > MAX_TASKS) throw invalidArgument(field, `holds ${plan.tasks.length} tasks; at most ${MAX_TASKS}`);
  plan.tasks.forEach((t, i) => {
    if (typeof t !== "string" || t.trim() === "") throw invalidArgument(`${field}[${i}]`, "is empty");
    if (/[\n\r\0]/.test(t)) throw invalidArgument(`${field}[${i}]`, "must be one line");
    if (t.length > MAX_TASK_CHARS) throw invalidArgument(`${field}[${i}]`, `is ${t.length} characters; at most ${MAX_TASK_CHARS}`);
  });
  if (!plan.promptTemplate.includes(TASK_PLACEHOLDER)) {
    throw invalidArgument(`${field === "request" ? "prompt_template" : `${field}.prompt`}`, `must contain the placeholder ${TASK_PLACEHOLDER}`);
  }
  if (plan.promptTemplate.includes("\0")) throw invalidArgument("prompt_template", "must not contain NUL characters");
  return plan;
}

/** The built-in planner: one task per non-empty line, Markdown bullets and numbers stripped; headings and fences skipped. */
export function builtinPlan(request: string, promptTemplate: string): Plan {
  const tasks: string[] = [];
  for (const raw of request.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith("```")) continue;
    tasks.push(line.replace(BULLET, "").trim());
  }
  return checkPlan({ tasks: tasks.filter((t) => t !== ""), promptTemplate: promptTemplate || TASK_PLACEHOLDER }, "request");
}

/** What the model planner needs. */
export interface ModelPlannerRequest {
  /** Base URL of the API, e.g. "http://127.0.0.1:8000/v1". */
  readonly url: string;
  readonly model: string;
  /** The API key (unsealed just before); undefined for none. Never logged. */
  readonly apiKey: Buffer | undefined;
  readonly request: string;
  readonly signal: AbortSignal;
}

/** The system prompt that asks for the plan as JSON. */
export const PLANNER_SYSTEM_PROMPT = [
  "You turn a software change request into a list of small, independent coding tasks for an agent.",
  'Answer with one JSON object and nothing else: {"tasks": ["<one task per entry, one line each>", ...],',
  '"prompt": "<instructions for the agent that contain the placeholder {task} exactly once>"}.',
].join(" ");

/** Calls the chat-completions endpoint and checks the answer; throws FAILED_PRECONDITION naming what was wrong. */
export async function modelPlan(r: ModelPlannerRequest): Promise<Plan> {
  const endpoint = `${r.url.replace(/\/+$/, "")}/chat/completions`;
  const headers: Record<string, string> = { "content-type": "application/json", accept: "application/json" };
  const key = r.apiKey?.toString("utf8").trim() ?? "";
  if (key) headers["authorization"] = `Bearer ${key}`;
  // Whatever the endpoint says goes into errors (and so the journal): never let it echo the key.
  const redact = (text: string): string => (key.length >= 4 ? text.split(key).join("[redacted]") : text);
  let res: Response;
  try {
    res = await fetch(endpoint, {
      method: "POST",
      headers,
      body: JSON.stringify({
        model: r.model,
        temperature: 0,
        response_format: { type: "json_object" },
        messages: [
          { role: "system", content: PLANNER_SYSTEM_PROMPT },
          { role: "user", content: r.request },
        ],
      }),
      signal: AbortSignal.any([r.signal, AbortSignal.timeout(120_000)]),
    });
  } catch (e) {
    if (r.signal.aborted) throw e;
    throw new PiccoloError("unavailable", `the planner at ${endpoint} is unavailable: ${(e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).message}`, {
      reason: "HOST_PART_UNAVAILABLE",
    });
  }
  const text = await res.text();
  if (!res.ok) {
    throw new PiccoloError("failed_precondition", `profile.planner_url: the planner answered HTTP ${res.status}: ${redact(text).slice(0, 300)}`, { field: "profile.planner_url" });
  }
  const bad = (why: string): PiccoloError =>
    new PiccoloError("failed_precondition", `the planner's answer is not a task list: ${redact(why)}`, { field: "profile.planner_model", reason: "PLANNER_ANSWER_INVALID" });
  let content: unknown;
  try {
    const body = JSON.parse(text) as { choices?: { message?: { content?: unknown } }[] };
    content = body.choices?.[0]?.message?.content;
  } catch {
    throw bad("the response is not JSON");
  }
  if (typeof content !== "string") throw bad("choices[0].message.content is missing");
  // Models sometimes wrap JSON in a Markdown fence.
  const json = content.trim().replace(/^```(?:json)?\s*/i, "").replace(/\s*```$/, "");
  let parsed: { tasks?: unknown; prompt?: unknown };
  try {
    parsed = JSON.parse(json) as typeof parsed;
  } catch {
    throw bad(`the message is not a JSON object (starts ${JSON.stringify(content.slice(0, 60))})`);
  }
  if (typeof parsed !== "object" || parsed === null || !Array.isArray(parsed.tasks) || !parsed.tasks.every((t) => typeof t === "string")) {
    throw bad('"tasks" is not a list of strings');
  }
  if (typeof parsed.prompt !== "string") throw bad('"prompt" is not a string');
  try {
    return checkPlan({ tasks: (parsed.tasks as string[]).map((t) => t.trim()), promptTemplate: parsed.prompt }, "planner answer tasks");
  } catch (e) {
    throw bad((e as Error).message);
  }
}

/** Splits a command template like a shell (single and double quotes, backslash escapes; no expansion). */
export function splitCommand(template: string): string[] {
  const out: string[] = [];
  let cur = "";
  let have = false;
  let quote: '"' | "'" | undefined;
  for (let i = 0; i < template.length; i++) {
    const c = template[i]!;
    if (quote === "'") {
      if (c === "'") quote = undefined;
      else cur += c;
    } else if (quote === '"') {
      if (c === '"') quote = undefined;
      else if (c === "\\" && i + 1 < template.length && ['"', "\\", "$", "`"].includes(template[i + 1]!)) cur += template[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      have = true;
    } else if (c === "\\" && i + 1 < template.length) {
      cur += template[++i];
      have = true;
    } else if (/\s/.test(c)) {
      if (have || cur !== "") out.push(cur);
      cur = "";
      have = false;
    } else {
      cur += c;
    }
  }
  if (quote) throw invalidArgument("profile.command_template", `unterminated ${quote} quote`);
  if (have || cur !== "") out.push(cur);
  return out;
}

/** The agent's argv for one prompt: "{prompt}" in each argument replaced. */
export function agentCommand(template: readonly string[], prompt: string): string[] {
  return template.map((a) => a.split("{prompt}").join(prompt));
}
