/**
 * google.api.http rules: reading them from descriptors, and compiling their path templates.
 * Shared by the REST gateway (matching requests), the REST client (building URLs) and the code
 * generator (which embeds the rules in the generated REST clients).
 */
import { getOption, type DescMethod, type Registry } from "@bufbuild/protobuf";

/** One HTTP binding of an RPC, as written in its google.api.http annotation. */
export interface HttpBinding {
  /** HTTP method in upper case. */
  readonly method: string;
  /** Path template, e.g. "/api/v1/operations/{id}:watch". */
  readonly pattern: string;
  /** "" (no body), "*" (the whole request) or the name of the request field the body fills. */
  readonly body: string;
  /** "" (the whole response) or the response field the body is. */
  readonly responseBody: string;
}

interface RawHttpRule {
  pattern: { case: string | undefined; value?: unknown };
  body: string;
  responseBody: string;
  additionalBindings: RawHttpRule[];
}

/** Reads every binding of a method's google.api.http option (the rule and its additional bindings). */
export function readHttpBindings(method: DescMethod, registry: Registry): HttpBinding[] {
  const ext = registry.getExtension("google.api.http");
  if (!ext || !method.proto.options) return [];
  // The option's value is a reflective google.api.HttpRule built from the same registry.
  const rule = getOption(method as never, ext as never) as unknown as RawHttpRule | undefined;
  if (!rule || rule.pattern.case === undefined) return [];
  const out: HttpBinding[] = [];
  const visit = (r: RawHttpRule): void => {
    const { case: kind, value } = r.pattern;
    if (kind === undefined) return;
    if (kind === "custom") {
      const custom = value as { kind: string; path: string };
      out.push({ method: custom.kind.toUpperCase(), pattern: custom.path, body: r.body, responseBody: r.responseBody });
    } else {
      out.push({ method: kind.toUpperCase(), pattern: value as string, body: r.body, responseBody: r.responseBody });
    }
    for (const b of r.additionalBindings) visit(b);
  };
  visit(rule);
  return out;
}

/** A variable of a path template: the request field path it binds, and whether it spans segments. */
export interface TemplateVariable {
  /** Dotted proto field path, e.g. "id" or "parent.name". */
  readonly fieldPath: string;
  /** True when the variable's pattern can match several segments (contains "**" or "/"). */
  readonly multiSegment: boolean;
}

/** A compiled path template. */
export interface PathTemplate {
  readonly pattern: string;
  readonly variables: readonly TemplateVariable[];
  /** Number of literal segments, used to try more specific templates first. */
  readonly literalCount: number;
  /** The trailing ":verb", or "". */
  readonly verb: string;
  /** Matches a request path (not decoded); returns the decoded variable values or undefined. */
  match(path: string): Map<string, string> | undefined;
  /** Builds a path from variable values, percent-encoding each. Throws when a value is missing. */
  expand(values: (fieldPath: string) => string | undefined): string;
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Compiles a google.api.http path template; throws on a malformed one. */
export function compilePathTemplate(pattern: string): PathTemplate {
  if (!pattern.startsWith("/")) throw new Error(`path template ${JSON.stringify(pattern)} must start with "/"`);
  let rest = pattern.slice(1);
  let verb = "";
  // A verb follows the last segment; a ":" inside {…} belongs to the variable.
  const lastBrace = rest.lastIndexOf("}");
  const colon = rest.indexOf(":", lastBrace + 1);
  if (colon >= 0) {
    verb = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
  }
  const variables: TemplateVariable[] = [];
  const parts: string[] = [];
  // Expansion pieces: literal text or a variable reference.
  const pieces: ({ lit: string } | { v: string; multi: boolean })[] = [];
  let literalCount = 0;
  const segRe = (seg: string): string => {
    if (seg === "*") return "[^/]+";
    if (seg === "**") return ".*";
    literalCount++;
    return escapeRe(seg);
  };
  let i = 0;
  const segments: string[] = [];
  let cur = "";
  let depth = 0;
  for (; i < rest.length; i++) {
    const c = rest[i]!;
    if (c === "{") depth++;
    if (c === "}") depth--;
    if (c === "/" && depth === 0) {
      segments.push(cur);
      cur = "";
    } else cur += c;
  }
  segments.push(cur);
  if (depth !== 0) throw new Error(`path template ${JSON.stringify(pattern)} has unbalanced braces`);
  segments.forEach((seg, idx) => {
    if (idx > 0) pieces.push({ lit: "/" });
    if (seg.startsWith("{")) {
      if (!seg.endsWith("}")) throw new Error(`path template ${JSON.stringify(pattern)}: bad segment ${seg}`);
      const inner = seg.slice(1, -1);
      const eq = inner.indexOf("=");
      const fieldPath = eq >= 0 ? inner.slice(0, eq) : inner;
      const sub = eq >= 0 ? inner.slice(eq + 1) : "*";
      if (!/^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$/.test(fieldPath)) {
        throw new Error(`path template ${JSON.stringify(pattern)}: bad field path ${fieldPath}`);
      }
      const multi = sub.includes("/") || sub.includes("**");
      variables.push({ fieldPath, multiSegment: multi });
      parts.push("(" + sub.split("/").map(segRe).join("/") + ")");
      pieces.push({ v: fieldPath, multi });
    } else {
      if (seg === "") throw new Error(`path template ${JSON.stringify(pattern)} has an empty segment`);
      parts.push(segRe(seg));
      pieces.push({ lit: seg });
    }
  });
  const re = new RegExp("^/" + parts.join("/") + (verb ? ":" + escapeRe(verb) : "") + "$");
  return {
    pattern,
    variables,
    literalCount,
    verb,
    match(path) {
      const m = re.exec(path);
      if (!m) return undefined;
      const out = new Map<string, string>();
      for (let k = 0; k < variables.length; k++) {
        const raw = m[k + 1] ?? "";
        const v = variables[k]!;
        try {
          out.set(
            v.fieldPath,
            v.multiSegment ? raw.split("/").map(decodeURIComponent).join("/") : decodeURIComponent(raw),
          );
        } catch {
          return undefined;
        }
      }
      return out;
    },
    expand(values) {
      let out = "/";
      for (const p of pieces) {
        if ("lit" in p) {
          out += p.lit;
          continue;
        }
        const val = values(p.v);
        if (val === undefined || val === "") throw new Error(`path parameter ${p.v} is required`);
        out += p.multi ? val.split("/").map(encodeURIComponent).join("/") : encodeURIComponent(val);
      }
      return out + (verb ? ":" + verb : "");
    },
  };
}
