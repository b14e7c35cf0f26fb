/**
 * The REST client SDK works in a browser: its bundle (dist/browser/piccolo-rest.js) runs in a bare
 * JavaScript context that has only what browsers have (fetch, streams, TextDecoder, URL, …, and
 * no require, process or Buffer) and talks to the real gateway.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import vm from "node:vm";
import { ROOT, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

let d: TestDaemon;
beforeAll(async () => {
  d = await startTestDaemon();
});
afterAll(async () => {
  await d.cleanup();
});

function browserContext(): vm.Context {
  const g = globalThis as Record<string, unknown>;
  const names = [
    "fetch", "Headers", "Request", "Response", "AbortController", "AbortSignal", "TextDecoder", "TextEncoder",
    "URL", "URLSearchParams", "ReadableStream", "console", "setTimeout", "clearTimeout", "queueMicrotask",
  ];
  const ctx = vm.createContext(Object.fromEntries(names.map((n) => [n, g[n]])));
  // A browser trusts the daemon's self-signed certificate once its user has accepted it (its
  // fingerprint checked against \`piccoloctl auth fingerprint\`); this fetch trusts exactly it.
  ctx["fetch"] = d.pinnedFetch;
  vm.runInContext(readFileSync(join(ROOT, "dist/browser/piccolo-rest.js"), "utf8"), ctx);
  return ctx;
}

test("the browser bundle calls unary and streaming RPCs through the gateway without Node APIs", async () => {
  const ctx = browserContext();
  expect(vm.runInContext("typeof require + typeof process + typeof Buffer", ctx)).toBe("undefinedundefinedundefined");
  ctx["baseUrl"] = d.endpoints.rest;
  ctx["token"] = await d.token("operator");
  const version = (await vm.runInContext("PiccoloRest.createRestClients({ baseUrl, token }).system.getVersion()", ctx)) as {
    nodeVersion: string;
  };
  expect(version.nodeVersion).toBe(process.version);
  const phases = (await vm.runInContext(
    `(async () => {
      const c = PiccoloRest.createRestClients({ baseUrl, token, sse: true });
      const out = [];
      for await (const ev of c.system.runDiagnostics({ writeProbeMib: 4 })) out.push(ev.outcome ? "outcome:" + ev.outcome.state : ev.progress ? ev.progress.phase : "attached");
      return out;
    })()`,
    ctx,
  )) as string[];
  expect(phases[0]).toBe("attached");
  expect(phases).toContain("write_throughput");
  expect(phases.at(-1)).toBe("outcome:3"); // OPERATION_STATE_SUCCEEDED
  const err = (await vm.runInContext(
    "PiccoloRest.createRestClients({ baseUrl, token }).operations.getOperation({ id: 'op-missing' }).catch((e) => ({ name: e.name, code: e.code, status: e.httpStatus }))",
    ctx,
  )) as { name: string; code: number; status: number };
  expect(err).toEqual({ name: "RestError", code: 5, status: 404 });
  // Without the token the gateway refuses it.
  const denied = (await vm.runInContext(
    "PiccoloRest.createRestClients({ baseUrl }).system.getVersion().catch((e) => ({ name: e.name, code: e.code, status: e.httpStatus }))",
    ctx,
  )) as { name: string; code: number; status: number };
  expect(denied).toEqual({ name: "RestError", code: 16, status: 401 });
});
