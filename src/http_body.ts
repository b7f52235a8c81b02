/**
 * A request body read with bounds, for the VM's control API
 * (`src/api/server.ts`) and the function service (`src/serverless/service.ts`):
 * at most `limit` bytes (a larger `content-length` is refused before reading),
 * within `timeoutMs`. Each server answers a {@link BodyError} with its own
 * status codes.
 *
 * @module
 */

/** Why a body could not be had: too large, too slow, or unreadable. */
export type BodyProblem = "too_large" | "timeout" | "unreadable";

/** A body that could not be read, and why. */
export class BodyError extends Error {
  /**
   * @param problem Which of the three it was.
   * @param message What happened, for the answer.
   */
  constructor(readonly problem: BodyProblem, message: string) {
    super(message);
    this.name = "BodyError";
  }
}

/**
 * Reads `request`'s body: at most `limit` bytes, within `timeoutMs`.
 *
 * @param request The request.
 * @param limit The most bytes accepted.
 * @param timeoutMs How long the body may take to arrive.
 * @returns The body's bytes (empty without a body).
 * @throws {BodyError} `too_large`, `timeout` or `unreadable` (the client went
 * away or sent a broken body); the body is cancelled first.
 * @example
 * ```ts
 * import { readBoundedBody } from "./http_body.ts";
 * const request = new Request("http://x/", { method: "POST", body: "abc" });
 * const body = await readBoundedBody(request, 1024, 1000);
 * console.log(body.length); // 3
 * ```
 */
export async function readBoundedBody(
  request: Request,
  limit: number,
  timeoutMs: number,
): Promise<Uint8Array> {
  const tooLarge = () =>
    new BodyError("too_large", `the request body is larger than ${limit} bytes`);
  const declared = request.headers.get("content-length");
  if (declared !== null && Number(declared) > limit) throw tooLarge();
  if (!request.body) return new Uint8Array();
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = request.body.getReader();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new BodyError("timeout", `the request body took over ${timeoutMs} ms`)),
      timeoutMs,
    );
  });
  try {
    while (true) {
      const { done, value } = await Promise.race([reader.read(), timeout]);
      if (done) break;
      total += value.length;
      if (total > limit) throw tooLarge();
      chunks.push(value);
    }
  } catch (e) {
    reader.cancel().catch(() => {});
    if (e instanceof BodyError) throw e;
    throw new BodyError("unreadable", `the request body could not be read: ${e}`);
  } finally {
    clearTimeout(timer);
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return bytes;
}
