/**
 * The loopback Omaha 3.0 responder and payload server piccolod starts for one update, as
 * Flatcar's `flatcar-update` does (FLATCAR.md): on 127.0.0.1 and an ephemeral port it answers
 * update_engine's update check with one package (the verified payload: name, SHA-1 in base64,
 * size) and the postinstall action (SHA-256 in base64), serves that file under a random path
 * (with HTTP Range, as update_engine resumes), and passes the events update_engine pings back
 * (download started/finished, complete, or the error code) to the caller.
 */
import { randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { basename } from "node:path";

/** What the responder offers. */
export interface OmahaOffer {
  readonly version: string;
  readonly payloadPath: string;
  readonly size: number;
  /** Base64 SHA-1 and SHA-256 of the payload file. */
  readonly sha1Base64: string;
  readonly sha256Base64: string;
}

/** An event update_engine reported. */
export interface OmahaEvent {
  readonly type: number;
  readonly result: number;
  /** update_engine's action exit code, when it reports an error. */
  readonly errorCode: number | undefined;
}

/** A running responder. */
export interface OmahaResponder {
  /** The URL for SERVER= ("http://127.0.0.1:PORT/v1/update/"). */
  readonly url: string;
  /** Update checks answered. */
  readonly checks: number;
  /** Payload bytes served. */
  readonly bytesServed: number;
  close(): Promise<void>;
}

/** update_engine's action exit codes by number, for messages. */
export const ACTION_CODES: Readonly<Record<number, string>> = {
  1: "kActionCodeError",
  2: "kActionCodeOmahaRequestError",
  3: "kActionCodeOmahaResponseHandlerError",
  4: "kActionCodeFilesystemCopierError",
  5: "kActionCodePostinstallRunnerError",
  6: "kActionCodeSetBootableFlagError",
  7: "kActionCodeInstallDeviceOpenError",
  8: "kActionCodeKernelDeviceOpenError",
  9: "kActionCodeDownloadTransferError",
  10: "kActionCodePayloadHashMismatchError",
  11: "kActionCodePayloadSizeMismatchError",
  12: "kActionCodeDownloadPayloadVerificationError",
  13: "kActionCodeDownloadNewPartitionInfoError",
  14: "kActionCodeDownloadWriteError",
  15: "kActionCodeNewRootfsVerificationError",
};

const attr = (xml: string, tag: string, name: string): string | undefined =>
  new RegExp(`<${tag}\\s[^>]*\\b${name}="([^"]*)"`).exec(xml)?.[1];

const esc = (s: string): string => s.replace(/[<>&"]/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;" })[c]!);

/** Starts the responder for one offer. */
export async function startOmahaResponder(offer: OmahaOffer, onEvent: (e: OmahaEvent) => void): Promise<OmahaResponder> {
  const secret = randomBytes(12).toString("hex");
  const name = basename(offer.payloadPath);
  let checks = 0;
  let bytesServed = 0;
  let base = "";
  const server: Server = createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    if (req.method === "GET" && url.pathname === `/payload/${secret}/${name}`) {
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
      const start = range ? Number(range[1]) : 0;
      const end = range && range[2] ? Math.min(Number(range[2]), offer.size - 1) : offer.size - 1;
      if (start > end && offer.size > 0) {
        res.writeHead(416, { "content-range": `bytes */${offer.size}` });
        res.end();
        return;
      }
      res.writeHead(range ? 206 : 200, {
        "content-type": "application/octet-stream",
        "content-length": String(end - start + 1),
        "accept-ranges": "bytes",
        ...(range ? { "content-range": `bytes ${start}-${end}/${offer.size}` } : {}),
      });
      const rs = createReadStream(offer.payloadPath, { start, end, highWaterMark: 1 << 20 });
      rs.on("data", (c) => (bytesServed += c.length));
      rs.on("error", () => res.destroy());
      rs.pipe(res);
      return;
    }
    if (req.method !== "POST") {
      res.writeHead(404).end();
      return;
    }
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (d: string) => {
      body += d;
      if (body.length > 256 * 1024) req.destroy();
    });
    req.on("end", () => {
      const appid = attr(body, "app", "appid") ?? "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}";
      let inner: string;
      if (/<updatecheck[\s>/]/.test(body)) {
        checks++;
        inner =
          `<updatecheck status="ok">` +
          `<urls><url codebase="${esc(base)}"/></urls>` +
          `<manifest version="${esc(offer.version)}">` +
          `<packages><package name="${esc(name)}" hash="${offer.sha1Base64}" size="${offer.size}" required="true"/></packages>` +
          `<actions><action event="postinstall" sha256="${offer.sha256Base64}" DisablePayloadBackoff="true"/></actions>` +
          `</manifest></updatecheck>`;
      } else inner = "";
      for (const m of body.matchAll(/<event\s[^>]*>/g)) {
        const type = Number(attr(m[0], "event", "eventtype") ?? 0);
        const result = Number(attr(m[0], "event", "eventresult") ?? 0);
        const ec = attr(m[0], "event", "errorcode");
        onEvent({ type, result, errorCode: ec === undefined ? undefined : Number(ec) });
        inner += `<event status="ok"/>`;
      }
      if (/<ping[\s>/]/.test(body)) inner = `<ping status="ok"/>` + inner;
      res.writeHead(200, { "content-type": "text/xml" });
      res.end(
        `<?xml version="1.0" encoding="UTF-8"?>\n<response protocol="3.0" server="piccolod">` +
          `<daystart elapsed_seconds="${Math.floor((Date.now() % 86_400_000) / 1000)}"/>` +
          `<app appid="${esc(appid)}" status="ok">${inner}</app></response>\n`,
      );
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  base = `http://127.0.0.1:${port}/payload/${secret}/`;
  return {
    url: `http://127.0.0.1:${port}/v1/update/`,
    get checks() {
      return checks;
    },
    get bytesServed() {
      return bytesServed;
    },
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}
