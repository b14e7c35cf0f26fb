/**
 * Image pull, import and build as Operations: the three operation kinds, the checks their
 * requests get before an operation starts (so a bad request is an RPC error, not a failed
 * operation), and the readers that turn the engine's progress streams into Progress reports.
 */
import { createReadStream } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { posix } from "node:path";
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  BuildImageRequest,
  BuildImageResult,
  ImportFormat,
  ImportImageRequest,
  ImportImageResult,
  PullImageRequest,
  PullImageResult,
  type Image,
  type LayerPull,
} from "../../../gen/piccolo/containers/v1/containers.js";
import type { Progress } from "../../../gen/piccolo/operations/v1/operations.js";
import { invalidArgument, notFound, PiccoloError, unavailable } from "../errors.js";
import type { OperationKind } from "../operations/manager.js";
import { imageFromInspect } from "./convert.js";
import { DockerApiError, type DockerEngine, type ProgressMessage } from "./docker.js";
import { checkHostPath, checkImageReference, parseImageReference, type SpecPolicy } from "./spec.js";

/** Operation kind of PullImage. */
export const PULL_KIND = "containers.image_pull";
/** Operation kind of ImportImage. */
export const IMPORT_KIND = "containers.image_import";
/** Operation kind of BuildImage. */
export const BUILD_KIND = "containers.image_build";

/** What the image operations need. */
export interface ImageOperationDeps {
  readonly engine: DockerEngine;
  readonly policy: SpecPolicy;
}

const pack = (typeName: string, value: Uint8Array): Any => Any.fromPartial({ typeUrl: `type.googleapis.com/${typeName}`, value });

/** Bytes for people: "107 B", "1.2 MB" (decimal units, as the engine prints them). */
export function formatBytes(n: number): string {
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let v = n / 1000;
  let u = 0;
  while (v >= 1000 && u < units.length - 1) {
    v /= 1000;
    u++;
  }
  return `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

// ---------------------------------------------------------------------------------------------
// Pull

interface LayerState {
  id: string;
  total: number;
  /** Bytes before the part a resumed download reports on. */
  base: number;
  downloaded: number;
  extracted: number;
  alreadyPresent: boolean;
  downloadDone: boolean;
  done: boolean;
  status: string;
}

/** Follows the engine's pull messages layer by layer and sums them up. */
export interface PullTracker {
  /** Takes one message of the engine's pull stream. */
  update(m: ProgressMessage): void;
  /** The progress to report now. */
  progress(): Partial<Progress>;
  /** Every layer seen, in the order the engine named them. */
  layers(): LayerPull[];
  /** The engine's last "Status: …" line. */
  readonly status: string;
}

/** Creates a pull tracker. Download progress and extraction each count for half of the percent. */
export function createPullTracker(): PullTracker {
  const layers = new Map<string, LayerState>();
  let status = "";
  let lastId = "";
  const layer = (id: string): LayerState => {
    let l = layers.get(id);
    if (!l) layers.set(id, (l = { id, total: 0, base: 0, downloaded: 0, extracted: 0, alreadyPresent: false, downloadDone: false, done: false, status: "" }));
    return l;
  };
  const pending = (): LayerState[] => [...layers.values()].filter((l) => !l.alreadyPresent);
  return {
    get status() {
      return status;
    },
    update(m) {
      const s = m.status ?? "";
      if (s.startsWith("Status: ")) status = s.slice("Status: ".length);
      // Layer messages carry the layer's short id; the first "Pulling from" names the tag.
      if (!m.id || !/^[0-9a-f]{12}$/.test(m.id)) return;
      const l = layer(m.id);
      lastId = m.id;
      l.status = s;
      const cur = m.progressDetail?.current ?? 0;
      const tot = m.progressDetail?.total ?? 0;
      switch (s) {
        case "Already exists":
          l.alreadyPresent = true;
          l.downloadDone = true;
          l.done = true;
          break;
        case "Downloading":
          if (tot > 0) {
            if (l.total === 0 || tot >= l.total) {
              l.total = tot;
              l.base = 0;
            } else {
              // After "Retrying in …" the engine resumes with a range request and reports on
              // the rest of the layer only.
              l.base = l.total - tot;
            }
          }
          l.downloaded = Math.max(l.downloaded, l.base + cur);
          break;
        case "Verifying Checksum":
        case "Download complete":
          l.downloadDone = true;
          if (l.total > 0) l.downloaded = l.total;
          break;
        case "Extracting":
          // A small layer can skip "Downloading" updates: extraction reads the same compressed bytes.
          if (tot > 0 && l.total === 0) l.total = tot;
          l.downloadDone = true;
          l.downloaded = l.total;
          l.extracted = Math.max(l.extracted, cur);
          break;
        case "Pull complete":
          l.downloadDone = true;
          l.done = true;
          l.downloaded = l.total;
          l.extracted = l.total;
          break;
        default:
          break;
      }
    },
    progress() {
      const ls = pending();
      const total = ls.reduce((a, l) => a + l.total, 0);
      const downloaded = ls.reduce((a, l) => a + Math.min(l.downloaded, l.total || l.downloaded), 0);
      const extracted = ls.reduce((a, l) => a + Math.min(l.extracted, l.total || l.extracted), 0);
      const allDownloaded = ls.every((l) => l.downloadDone);
      const known = ls.filter((l) => l.total > 0).length;
      // Layers whose size is not known yet hold the percent back in proportion to their number.
      const share = ls.length === 0 ? 0 : known / ls.length;
      const percent = total > 0 ? Math.min(99, (100 * (downloaded + extracted) * share) / (2 * total)) : 0;
      const doneCount = [...layers.values()].filter((l) => l.done).length;
      const active = ls.filter((l) => !l.done && l.status !== "" && l.status !== "Pulling fs layer" && l.status !== "Waiting");
      const describe = (l: LayerState): string =>
        l.status === "Extracting"
          ? `${l.id} extracting ${formatBytes(l.extracted)}/${formatBytes(l.total)}`
          : `${l.id} ${l.downloadDone ? "downloaded" : "downloading"} ${formatBytes(l.downloaded)}/${l.total ? formatBytes(l.total) : "?"}`;
      const shown = active.length > 0 ? active.slice(0, 4) : layers.has(lastId) ? [layers.get(lastId)!] : [];
      const message =
        `${doneCount}/${layers.size} layers done` +
        (shown.length > 0 ? `; ${shown.map((l) => (l.done ? `${l.id} ${l.alreadyPresent ? "already present" : `pulled ${formatBytes(l.total)}`}` : describe(l))).join(", ")}` : "");
      const extracting = allDownloaded && ls.length > 0;
      const items = [...layers.values()].map((l) => ({
        id: l.id,
        status: l.alreadyPresent ? "already present" : l.done ? "done" : l.status === "Extracting" ? "extracting" : l.downloadDone ? "downloaded" : l.status ? "downloading" : "waiting",
        bytesDone: l.alreadyPresent ? 0 : Math.min(extracting ? l.extracted : l.downloaded, l.total || Number.MAX_SAFE_INTEGER),
        bytesTotal: l.alreadyPresent ? 0 : l.total,
      }));
      return extracting
        ? { phase: "extract", phaseIndex: 2, phaseCount: 2, percent, bytesDone: extracted, bytesTotal: total, message, items }
        : { phase: "download", phaseIndex: 1, phaseCount: 2, percent, bytesDone: downloaded, bytesTotal: total, message, items };
    },
    layers() {
      return [...layers.values()].map((l) => ({ id: l.id, sizeBytes: l.alreadyPresent ? 0 : l.total, alreadyPresent: l.alreadyPresent }));
    },
  };
}

/** Maps an error a pull reported (in-band or as an error status). */
function pullError(err: unknown, reference: string): unknown {
  if (!(err instanceof DockerApiError)) return err;
  const m = err.dockerMessage;
  if (/not found|manifest unknown|does not exist|repository .* not found/i.test(m)) {
    return new PiccoloError("not_found", `image ${JSON.stringify(reference)} was not found in its registry: ${m}`, { cause: err, reason: "NOT_FOUND" });
  }
  if (/connection refused|no such host|i\/o timeout|dial tcp|TLS handshake|server misbehaving|network is unreachable/i.test(m)) {
    return unavailable(`the registry of ${JSON.stringify(reference)}`, new Error(m));
  }
  if (/unauthorized|authentication required|denied/i.test(m)) {
    return new PiccoloError("permission_denied", `the registry refused to serve ${JSON.stringify(reference)}: ${m}`, { cause: err });
  }
  return new PiccoloError("failed_precondition", `the pull of ${JSON.stringify(reference)} failed: ${m}`, { cause: err });
}

async function inspectImage(engine: DockerEngine, ref: string, signal: AbortSignal): Promise<Image> {
  try {
    return imageFromInspect(await engine.inspectImage(ref, signal));
  } catch (e) {
    if (e instanceof DockerApiError && e.statusCode === 404) throw notFound("image", ref);
    throw e;
  }
}

/** Checks a PullImageRequest; returns it as the operation will run it. */
export function preparePull(req: PullImageRequest): PullImageRequest {
  const ref = checkImageReference(req.reference, "reference");
  const p = parseImageReference(ref)!;
  return { reference: p.tag === "" && p.digest === "" ? `${ref}:latest` : ref };
}

/** The `containers.image_pull` operation kind. */
export function pullKind(deps: ImageOperationDeps): OperationKind<PullImageRequest> {
  return {
    kind: PULL_KIND,
    requestType: "piccolo.containers.v1.PullImageRequest",
    encodeRequest: (r) => PullImageRequest.encode(r).finish(),
    exclusive: false,
    single: false,
    cancellable: true,
    async run(req, ctx) {
      const tracker = createPullTracker();
      ctx.progress({ phase: "download", phaseIndex: 1, phaseCount: 2, percent: 0, message: `pulling ${req.reference}` });
      try {
        for await (const m of await deps.engine.pullImage(req.reference, ctx.signal)) {
          tracker.update(m);
          if (m.id && /^[0-9a-f]{12}$/.test(m.id)) ctx.progress(tracker.progress());
        }
      } catch (e) {
        throw pullError(e, req.reference);
      }
      const image = await inspectImage(deps.engine, req.reference, ctx.signal);
      const layers = tracker.layers();
      const total = layers.reduce((a, l) => a + l.sizeBytes, 0);
      ctx.progress({
        phase: "done",
        phaseIndex: 2,
        phaseCount: 2,
        percent: 100,
        bytesDone: total,
        bytesTotal: total,
        message: `pulled ${req.reference}: ${layers.length} layers, ${formatBytes(total)} downloaded${tracker.status ? ` (${tracker.status})` : ""}`,
      });
      ctx.log.info({ image: req.reference, bytes: total, layers: layers.length }, "image pulled");
      return pack(
        "piccolo.containers.v1.PullImageResult",
        PullImageResult.encode({ image, bytesTotal: total, layers, status: tracker.status }).finish(),
      );
    },
    async recover() {
      return "the engine keeps the layers it had downloaded in its cache and tags nothing; pull again to finish";
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Import

/** Checks an ImportImageRequest (the tarball must be a file below a data root); returns it resolved. */
export async function prepareImport(req: ImportImageRequest, policy: SpecPolicy): Promise<ImportImageRequest> {
  if (!(req.format in ImportFormat) || req.format < 0) throw invalidArgument("format", `unknown format ${req.format}`);
  const format = req.format === ImportFormat.IMPORT_FORMAT_ROOTFS ? ImportFormat.IMPORT_FORMAT_ROOTFS : ImportFormat.IMPORT_FORMAT_ARCHIVE;
  if (format === ImportFormat.IMPORT_FORMAT_ROOTFS && req.reference === "") {
    throw invalidArgument("reference", "is required for IMPORT_FORMAT_ROOTFS: it names the new image");
  }
  if (req.reference !== "") {
    const p = parseImageReference(checkImageReference(req.reference, "reference"));
    if (p?.digest) throw invalidArgument("reference", "must be a name with an optional tag, not a digest");
  }
  const path = await checkHostPath(req.path, "path", policy, "image imports");
  const st = await stat(path);
  if (!st.isFile()) throw invalidArgument("path", `${path} is not a regular file`);
  return { path, format, reference: req.reference };
}

/** The `containers.image_import` operation kind. */
export function importKind(deps: ImageOperationDeps): OperationKind<ImportImageRequest> {
  return {
    kind: IMPORT_KIND,
    requestType: "piccolo.containers.v1.ImportImageRequest",
    encodeRequest: (r) => ImportImageRequest.encode(r).finish(),
    exclusive: false,
    single: false,
    cancellable: true,
    async run(req, ctx) {
      const size = (await stat(req.path)).size;
      let read = 0;
      const report = (): void =>
        ctx.progress({
          phase: "read",
          phaseIndex: 1,
          phaseCount: 2,
          percent: size > 0 ? (95 * read) / size : 0,
          bytesDone: read,
          bytesTotal: size,
          message: `sending ${formatBytes(read)} of ${formatBytes(size)} to the engine`,
        });
      report();
      // Large reads keep the copy cheap; the bytes are counted as they go by, without a stream
      // stage of their own. Adding the listener would start the flow before the request is
      // there to take it: pause until the engine call pipes the file (pipe() resumes it).
      const file = createReadStream(req.path, { highWaterMark: 4 * 1024 * 1024 });
      file.on("data", (chunk) => {
        read += chunk.length;
        report();
      });
      file.pause();
      const names: string[] = [];
      let importedId = "";
      try {
        const rootfs = req.format === ImportFormat.IMPORT_FORMAT_ROOTFS;
        const p = rootfs ? parseImageReference(req.reference)! : undefined;
        const messages = rootfs
          ? await deps.engine.importRootfs(file, p!.repository, p!.tag || "latest", ctx.signal)
          : await deps.engine.loadImage(file, ctx.signal);
        let reading = true;
        for await (const m of messages) {
          if (reading && read >= size) {
            reading = false;
            ctx.progress({ phase: "register", phaseIndex: 2, phaseCount: 2, percent: 95, message: "the engine is registering the image" });
          }
          const loaded = /^Loaded image(?: ID)?: (\S+)/.exec((m.stream ?? "").trim());
          if (loaded) names.push(loaded[1]!);
          if (rootfs && /^sha256:[0-9a-f]{64}$/.test((m.status ?? "").trim())) importedId = m.status!.trim();
        }
      } catch (e) {
        if (e instanceof DockerApiError) {
          throw new PiccoloError("failed_precondition", `path: the engine could not import ${req.path}: ${e.dockerMessage}`, { cause: e, field: "path" });
        }
        throw e;
      } finally {
        file.destroy();
      }
      if (req.format === ImportFormat.IMPORT_FORMAT_ROOTFS) names.push(importedId || req.reference);
      if (names.length === 0) {
        throw new PiccoloError("failed_precondition", `path: ${req.path} held no image the engine could load`, { field: "path" });
      }
      if (req.format === ImportFormat.IMPORT_FORMAT_ARCHIVE && req.reference !== "") {
        if (names.length !== 1) {
          throw new PiccoloError(
            "failed_precondition",
            `reference: the archive held ${names.length} images (${names.join(", ")}); they were loaded under those names and none was tagged ${req.reference}`,
            { field: "reference" },
          );
        }
        const p = parseImageReference(req.reference)!;
        await deps.engine.tagImage(names[0]!, p.repository, p.tag || "latest", ctx.signal);
        names[0] = req.reference;
      }
      const images: Image[] = [];
      for (const n of names) images.push(await inspectImage(deps.engine, n, ctx.signal));
      ctx.progress({ phase: "done", phaseIndex: 2, phaseCount: 2, percent: 100, bytesDone: size, bytesTotal: size, message: `imported ${names.join(", ")}` });
      ctx.log.info({ path: req.path, images: names, bytes: size }, "image imported");
      return pack("piccolo.containers.v1.ImportImageResult", ImportImageResult.encode({ images, bytesRead: size }).finish());
    },
    async recover() {
      return "the engine discards an archive whose upload was cut off; import it again";
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Build

/** Checks a BuildImageRequest (context below a data root, Dockerfile inside it, tags); returns it resolved. */
export async function prepareBuild(req: BuildImageRequest, policy: SpecPolicy): Promise<BuildImageRequest> {
  if (req.tags.length === 0) throw invalidArgument("tags", "at least one tag is required, e.g. \"app:1\"");
  req.tags.forEach((t, i) => {
    const p = parseImageReference(checkImageReference(t, `tags[${i}]`));
    if (p?.digest) throw invalidArgument(`tags[${i}]`, "must be a name with an optional tag, not a digest");
  });
  const dockerfile = req.dockerfile === "" ? "Dockerfile" : req.dockerfile;
  if (posix.isAbsolute(dockerfile) || posix.normalize(dockerfile).startsWith("..") || dockerfile.includes("\0")) {
    throw invalidArgument("dockerfile", "must be a relative path inside the build context");
  }
  for (const [k, v] of Object.entries(req.buildArgs)) {
    if (k === "" || /[=\0]/.test(k) || v.includes("\0")) throw invalidArgument(`build_args[${JSON.stringify(k)}]`, "is not a valid build argument");
  }
  const context = await checkHostPath(req.contextPath, "context_path", policy, "build contexts");
  const st = await stat(context);
  if (st.isDirectory()) {
    try {
      if (!(await stat(posix.join(context, dockerfile))).isFile()) throw new Error("not a file");
    } catch {
      throw new PiccoloError("failed_precondition", `dockerfile: ${dockerfile} is not a file in the build context ${context}`, { field: "dockerfile" });
    }
  } else if (!st.isFile()) {
    throw invalidArgument("context_path", `${context} is neither a folder nor a tarball`);
  }
  return { ...req, contextPath: context, dockerfile };
}

const STEP = /^Step (\d+)\/(\d+) : (.*)$/;

/** The `containers.image_build` operation kind. */
export function buildKind(deps: ImageOperationDeps): OperationKind<BuildImageRequest> {
  return {
    kind: BUILD_KIND,
    requestType: "piccolo.containers.v1.BuildImageRequest",
    encodeRequest: (r) => BuildImageRequest.encode(r).finish(),
    exclusive: false,
    single: false,
    cancellable: true,
    async run(req, ctx) {
      const st = await stat(req.contextPath);
      const context = st.isDirectory() ? { folder: req.contextPath, entries: await readdir(req.contextPath) } : { tarball: req.contextPath };
      ctx.progress({ phase: "context", percent: 0, message: `sending the build context ${req.contextPath}` });
      let step = 0;
      let steps = 0;
      let stepLine = "";
      let partial = "";
      const onLine = (line: string): void => {
        const m = STEP.exec(line);
        if (m) {
          step = Number(m[1]);
          steps = Number(m[2]);
          stepLine = line;
          // One phase per step, so every step is journaled however fast it runs.
          ctx.progress({ phase: `step_${step}`, phaseIndex: step, phaseCount: steps, percent: (100 * (step - 1)) / steps, message: line });
        } else if (step > 0 && line.trim() !== "") {
          ctx.progress({ phase: `step_${step}`, phaseIndex: step, phaseCount: steps, percent: (100 * (step - 1)) / steps, message: `${stepLine} | ${line.trim().slice(0, 200)}` });
        }
      };
      try {
        const messages = await deps.engine.buildImage(
          context,
          { dockerfile: req.dockerfile, tags: req.tags, buildArgs: req.buildArgs, labels: req.labels, noCache: req.noCache },
          ctx.signal,
        );
        for await (const m of messages) {
          if (m.stream === undefined) continue;
          partial += m.stream;
          let nl: number;
          while ((nl = partial.indexOf("\n")) >= 0) {
            onLine(partial.slice(0, nl).replace(/\r$/, ""));
            partial = partial.slice(nl + 1);
          }
          if (partial.length > 64 * 1024) {
            onLine(partial);
            partial = "";
          }
        }
        if (partial !== "") onLine(partial);
      } catch (e) {
        if (e instanceof DockerApiError) {
          const where = step > 0 ? ` at step ${step}/${steps} (${stepLine.replace(STEP, "$3")})` : "";
          throw new PiccoloError("failed_precondition", `the build failed${where}: ${e.dockerMessage}`, { cause: e });
        }
        throw e;
      }
      const image = await inspectImage(deps.engine, req.tags[0]!, ctx.signal);
      ctx.progress({ phase: "done", phaseIndex: steps, phaseCount: steps, percent: 100, message: `built ${req.tags.join(", ")} (${image.id.slice(7, 19)}) in ${steps} steps` });
      ctx.log.info({ tags: req.tags, steps, id: image.id }, "image built");
      return pack("piccolo.containers.v1.BuildImageResult", BuildImageResult.encode({ image, steps }).finish());
    },
    async recover() {
      return "the engine stops a build whose client went away and removes its intermediate containers; cached layers stay";
    },
  };
}
