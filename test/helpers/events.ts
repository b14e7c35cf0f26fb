/** Reading operation event streams in tests. */
import type { OperationEvent } from "../../gen/piccolo/operations/v1/operations.js";

/** Every event of a stream, in order. */
export async function collect(it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const ev of it) out.push(ev);
  return out;
}

/** The outcome in the stream's last event. */
export const outcome = (evs: readonly OperationEvent[]): NonNullable<OperationEvent["outcome"]> => evs[evs.length - 1]!.outcome!;
