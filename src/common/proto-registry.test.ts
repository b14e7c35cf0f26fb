import { binaryToJson, JsonMappingError, jsonToBinary } from "./proto-registry.js";
import { ListOperationsRequest, OperationState } from "../../gen/piccolo/operations/v1/operations.js";

const T = "piccolo.operations.v1.ListOperationsRequest";

test("proto3 JSON round-trips through binary with ts-proto types", () => {
  const bytes = jsonToBinary(T, { kind: "system.diagnostics", state: "OPERATION_STATE_RUNNING", pageSize: "5" });
  const msg = ListOperationsRequest.decode(bytes);
  expect(msg).toMatchObject({ kind: "system.diagnostics", state: OperationState.OPERATION_STATE_RUNNING, pageSize: 5 });
  expect(binaryToJson(T, bytes)).toEqual({ kind: "system.diagnostics", state: "OPERATION_STATE_RUNNING", pageSize: 5 });
});

test.each([
  [{ pageSize: "abc" }, "page_size"],
  [{ state: "FOO" }, "state"],
  [{ nope: 1 }, "nope"],
  [{ page_size: true }, "page_size"],
])("a bad value %j is refused naming %s", (json, field) => {
  let err: unknown;
  try {
    jsonToBinary(T, json);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(JsonMappingError);
  expect((err as JsonMappingError).field).toBe(field);
  expect((err as Error).message.startsWith(`${field}: `)).toBe(true);
});

test("a culprit inside a nested message is named by its full path", () => {
  let err: JsonMappingError | undefined;
  try {
    jsonToBinary("piccolo.operations.v1.Operation", { progress: { percent: "lots" } });
  } catch (e) {
    err = e as JsonMappingError;
  }
  expect(err?.field).toBe("progress.percent");
});
