import { PiccoloError } from "../errors.js";
import { DockerApiError, engineError, jsonLines } from "./docker.js";

const SOCK = "/run/test/docker.sock";

test("an error status becomes a DockerApiError with the engine's own message", () => {
  const withJson = Object.assign(new Error("(HTTP code 404) no such container - No such container: web "), {
    statusCode: 404,
    json: { message: "No such container: web" },
  });
  expect(engineError(withJson, SOCK)).toMatchObject({ name: "DockerApiError", statusCode: 404, dockerMessage: "No such container: web" });
  const stream = Object.assign(new Error("(HTTP code 500) server error - Get \"http://r/v2/\": dial tcp: connection refused "), { statusCode: 500 });
  expect((engineError(stream, SOCK) as DockerApiError).dockerMessage).toBe('Get "http://r/v2/": dial tcp: connection refused');
});

test("an engine that is not there, or goes away, is UNAVAILABLE naming the socket", () => {
  for (const [code, why] of [
    ["ENOENT", "no socket there"],
    ["ECONNREFUSED", "connect ECONNREFUSED"],
    ["ECONNRESET", "aborted"],
    ["EACCES", "permission denied"],
  ] as const) {
    const e = engineError(Object.assign(new Error(code === "ECONNRESET" ? "aborted" : `connect ${code} ${SOCK}`), { code }), SOCK);
    expect(e).toBeInstanceOf(PiccoloError);
    expect(e).toMatchObject({ kind: "unavailable", reason: "HOST_PART_UNAVAILABLE" });
    expect(e.message).toContain(`Docker engine at ${SOCK} is unavailable: `);
    expect(e.message).toContain(why);
  }
  expect(engineError(new Error("socket hang up"), SOCK)).toMatchObject({ kind: "unavailable" });
});

test("an aborted call is CANCELLED, whatever the transport said", () => {
  const ac = new AbortController();
  ac.abort();
  expect(engineError(Object.assign(new Error("aborted"), { code: "ECONNRESET" }), SOCK, ac.signal)).toMatchObject({ kind: "cancelled" });
});

test("JSON lines are split however the bytes arrive, with a last line without newline", async () => {
  async function* src(): AsyncGenerator<Buffer> {
    yield Buffer.from('{"a":1}\n{"b"');
    yield Buffer.from(':2}\r\n\n{"c":3}');
  }
  const out: unknown[] = [];
  for await (const x of jsonLines(src())) out.push(x);
  expect(out).toEqual([{ a: 1 }, { b: 2 }, { c: 3 }]);
});
