/**
 * The append-only audit log: one JSON line per mutating call (who, what, target, result).
 * Opened in append mode with mode 0600; each record is one write, so records never interleave.
 */
import { open, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { mkdir } from "node:fs/promises";

/** One audit record. */
export interface AuditRecord {
  /** ISO time of the call's end. */
  readonly time: string;
  /** Who called. */
  readonly actor: string;
  /** Full method, e.g. "piccolo.operations.v1.OperationsService/CancelOperation". */
  readonly method: string;
  /** The listener. */
  readonly transport: string;
  /** What the call acted on, e.g. "id=op-…"; "" when the method has no target. */
  readonly target: string;
  /** "OK" or the gRPC code name. */
  readonly result: string;
  /** Who, as authenticated: the token's subject ("root" on the unix socket). */
  readonly subject?: string;
  /** The caller's token id, when it sent one. */
  readonly tokenId?: string;
  /** The machine-readable reason of a failure (google.rpc.ErrorInfo reason), e.g. "TOKEN_EXPIRED". */
  readonly reason?: string;
  /** Error message when the call failed. */
  readonly error?: string;
  /** The operation the call started, when it started one. */
  readonly operationId?: string;
}

/** Writes audit records. */
export interface AuditLog {
  write(record: AuditRecord): Promise<void>;
  close(): Promise<void>;
}

/** Opens (creating if needed) the audit log at `path`. */
export async function openAuditLog(path: string): Promise<AuditLog> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const fh: FileHandle = await open(path, "a", 0o600);
  let chain: Promise<void> = Promise.resolve();
  return {
    write(record) {
      const line = JSON.stringify(record) + "\n";
      chain = chain.then(async () => {
        await fh.write(line);
      });
      return chain;
    },
    async close() {
      await chain;
      await fh.close();
    },
  };
}
