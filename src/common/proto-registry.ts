/**
 * The API's descriptors at run time, from the descriptor set embedded in gen/, and the proto3 JSON
 * mapping built on them. The gateway, the REST client and the CLI's JSON output all go through
 * here, so there is one JSON mapping: the standard one (lowerCamelCase names, enums as names,
 * 64-bit integers as strings, well-known types in their special forms, unknown fields refused).
 */
import {
  createFileRegistry,
  fromBinary,
  fromJson,
  toBinary,
  toJson,
  type DescMessage,
  type FileRegistry,
  type JsonValue,
} from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { fileDescriptorSetBase64 } from "../../gen/piccolo/descriptor.js";

/** Every message, enum, service and extension of the API and its imports. */
export const apiRegistry: FileRegistry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, base64Decode(fileDescriptorSetBase64)),
);

/** Raised when JSON does not map onto the message; `field` is the proto field path at fault. */
export class JsonMappingError extends Error {
  override readonly name = "JsonMappingError";
  constructor(
    message: string,
    /** Dotted proto field path of the culprit, or "" when the message as a whole is wrong. */
    readonly field: string,
  ) {
    super(field ? `${field}: ${message}` : message);
  }
}

/** Finds the field of `json` that does not map onto `desc`, descending into nested messages. */
function findCulprit(desc: DescMessage, json: JsonValue, prefix: string): string {
  if (typeof json !== "object" || json === null || Array.isArray(json)) return prefix;
  for (const [key, value] of Object.entries(json)) {
    try {
      fromJson(desc, { [key]: value }, { registry: apiRegistry });
    } catch {
      const f = desc.fields.find((x) => x.name === key || x.jsonName === key);
      const here = prefix ? `${prefix}.${f?.name ?? key}` : (f?.name ?? key);
      if (f?.fieldKind === "message" && !f.message.typeName.startsWith("google.protobuf.")) {
        return findCulprit(f.message, value, here);
      }
      return here;
    }
  }
  return prefix;
}

/** Finds a message descriptor by full name; throws when the API has no such message. */
export function messageDesc(typeName: string): DescMessage {
  const desc = apiRegistry.getMessage(typeName);
  if (!desc) throw new Error(`unknown message type ${typeName}`);
  return desc;
}

/** Parses proto3 JSON into protobuf binary, strictly: wrong types, unknown fields and unknown enum names are errors. */
export function jsonToBinary(typeName: string, json: JsonValue): Uint8Array {
  const desc = messageDesc(typeName);
  let msg;
  try {
    msg = fromJson(desc, json, { registry: apiRegistry });
  } catch (e) {
    throw new JsonMappingError(cleanMessage((e as Error).message), findCulprit(desc, json, ""));
  }
  return toBinary(desc, msg);
}

/** Renders protobuf binary as proto3 JSON. */
export function binaryToJson(typeName: string, bytes: Uint8Array): JsonValue {
  const desc = messageDesc(typeName);
  return toJson(desc, fromBinary(desc, bytes), { registry: apiRegistry });
}

// protobuf-es prefixes messages with "cannot decode message X from JSON:" — keep it, it names the
// message and the field; only drop the "[protobuf]"-style noise if any.
function cleanMessage(m: string): string {
  return m.replace(/^\[[^\]]+\]\s*/, "");
}
