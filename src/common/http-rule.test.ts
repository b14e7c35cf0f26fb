import { compilePathTemplate, readHttpBindings } from "./http-rule.js";
import { apiRegistry } from "./proto-registry.js";

describe("compilePathTemplate", () => {
  test("matches literals and single-segment variables, decoding them", () => {
    const t = compilePathTemplate("/api/v1/operations/{id}");
    expect(t.match("/api/v1/operations/op-1")?.get("id")).toBe("op-1");
    expect(t.match("/api/v1/operations/a%20b")?.get("id")).toBe("a b");
    expect(t.match("/api/v1/operations/a/b")).toBeUndefined();
    expect(t.match("/api/v1/operations/")).toBeUndefined();
    expect(t.match("/api/v1/operation/x")).toBeUndefined();
  });

  test("a verb binds to the last segment, not to the variable", () => {
    const t = compilePathTemplate("/api/v1/operations/{id}:watch");
    expect(t.verb).toBe("watch");
    expect(t.match("/api/v1/operations/op-1:watch")?.get("id")).toBe("op-1");
    expect(t.match("/api/v1/operations/op-1")).toBeUndefined();
    expect(t.expand(() => "op 1")).toBe("/api/v1/operations/op%201:watch");
  });

  test("multi-segment variables and nested field paths", () => {
    const t = compilePathTemplate("/v1/{name=shelves/*/books/**}");
    expect(t.variables).toEqual([{ fieldPath: "name", multiSegment: true }]);
    expect(t.match("/v1/shelves/s1/books/a/b")?.get("name")).toBe("shelves/s1/books/a/b");
    const n = compilePathTemplate("/v1/{book.name}");
    expect(n.match("/v1/x")?.get("book.name")).toBe("x");
  });

  test("expand percent-encodes values and refuses a missing one", () => {
    const t = compilePathTemplate("/a/{x}/b");
    expect(t.expand((f) => (f === "x" ? "p/q?" : undefined))).toBe("/a/p%2Fq%3F/b");
    expect(() => t.expand(() => undefined)).toThrow("path parameter x is required");
  });

  test("malformed templates are refused", () => {
    expect(() => compilePathTemplate("api/v1")).toThrow("must start");
    expect(() => compilePathTemplate("/a/{x")).toThrow("unbalanced");
    expect(() => compilePathTemplate("/a//b")).toThrow("empty segment");
    expect(() => compilePathTemplate("/a/{1x}")).toThrow("bad field path");
  });
});

test("readHttpBindings reads the annotations of the real API", () => {
  const svc = apiRegistry.getService("piccolo.operations.v1.OperationsService")!;
  const cancel = svc.methods.find((m) => m.name === "CancelOperation")!;
  expect(readHttpBindings(cancel, apiRegistry)).toEqual([
    { method: "POST", pattern: "/api/v1/operations/{id}:cancel", body: "*", responseBody: "" },
  ]);
  const every = [...apiRegistry.files]
    .flatMap((f) => f.services)
    .filter((s) => s.typeName.startsWith("piccolo."))
    .flatMap((s) => s.methods);
  expect(every.length).toBeGreaterThan(5);
  for (const m of every) expect(readHttpBindings(m, apiRegistry).length).toBeGreaterThan(0);
});
