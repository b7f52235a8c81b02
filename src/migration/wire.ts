/**
 * The live-migration stream's framing: every message between the source and
 * the target is one frame, a 12-byte header (kind, length, CRC-32 of the
 * payload) and its payload. A stream that is cut, oversized, of an unknown
 * kind or fails its checksum is refused with a {@link DenovisorError}
 * (`MIGRATION`) naming the frame, so a corrupt migration never reaches the
 * VM.
 *
 * ```text
 * offset 0  u8      kind (FRAME_KINDS)
 *        1  u8[3]   zero
 *        4  u32 LE  payload length (at most MAX_FRAME_BYTES)
 *        8  u32 LE  CRC-32 (ISO-HDLC, as zlib) of the payload
 *       12  ...     payload
 * ```
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** The kinds of frame, by their byte on the wire. */
export const FRAME_KINDS = {
  /** Source → target, first: JSON {@link Hello}. */
  hello: 1,
  /** Target → source: JSON `{}`, the VM is built and waits for memory. */
  ready: 2,
  /** Either way: JSON `{ message }`, the other side gives up. */
  abort: 3,
  /** Source → target: guest pages, as the core packs them. */
  pages: 4,
  /** Source → target, last: the paused VM's state (snapshot sections). */
  state: 5,
  /** Target → source: JSON `{}`, the VM runs on the target. */
  running: 6,
  /** Source → target after a pre-copy round, to a target whose `ready` listed
   * the `sync` feature: answer once the pages before it are in RAM. */
  sync: 7,
  /** Target → source: JSON `{}`, the pages before the `sync` are in RAM. */
  synced: 8,
} as const;

/** The name of a frame kind. */
export type FrameKind = keyof typeof FRAME_KINDS;

const KIND_NAMES: ReadonlyMap<number, FrameKind> = new Map(
  Object.entries(FRAME_KINDS).map(([name, byte]) => [byte, name as FrameKind]),
);

/** Header bytes before every payload. */
export const FRAME_HEADER_BYTES = 12;

/** The largest payload accepted (a batch of pages or the state). */
export const MAX_FRAME_BYTES = 64 * 1024 * 1024;

/** One frame as read. */
export interface Frame {
  /** What it is. */
  kind: FrameKind;
  /** Its payload (checked against the header's CRC-32). */
  payload: Uint8Array;
}

const CRC_TABLE = (() => {
  const table = new Uint32Array(8 * 256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    for (let s = 1; s < 8; s++) {
      const prev = table[(s - 1) * 256 + i];
      table[s * 256 + i] = (prev >>> 8) ^ table[prev & 0xff];
    }
  }
  return table;
})();

/**
 * CRC-32 (ISO-HDLC: zlib's, gzip's) of `bytes`, slicing by 8.
 *
 * @param bytes The data.
 * @returns The checksum as an unsigned 32-bit integer.
 * @example
 * ```ts
 * import { crc32 } from "denovisor/src/migration/wire.ts";
 * console.log(crc32(new TextEncoder().encode("123456789")).toString(16)); // "cbf43926"
 * ```
 */
export function crc32(bytes: Uint8Array): number {
  const t = CRC_TABLE;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let c = 0xffffffff;
  let i = 0;
  for (; i + 8 <= bytes.length; i += 8) {
    const a = (view.getUint32(i, true) ^ c) >>> 0;
    const b = view.getUint32(i + 4, true);
    c = t[7 * 256 + (a & 0xff)] ^ t[6 * 256 + ((a >>> 8) & 0xff)] ^
      t[5 * 256 + ((a >>> 16) & 0xff)] ^ t[4 * 256 + (a >>> 24)] ^
      t[3 * 256 + (b & 0xff)] ^ t[2 * 256 + ((b >>> 8) & 0xff)] ^
      t[256 + ((b >>> 16) & 0xff)] ^ t[b >>> 24];
  }
  for (; i < bytes.length; i++) c = t[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function refuse(message: string): DenovisorError {
  return new DenovisorError("MIGRATION", message);
}

/**
 * Encodes one frame.
 *
 * @param kind What it is.
 * @param payload Its bytes (at most {@link MAX_FRAME_BYTES}).
 * @param checksum The payload's CRC-32 when the producer computed it already
 *   (the core does for pages); computed here otherwise.
 * @returns Header and payload, ready to write.
 * @example
 * ```ts
 * import { encodeFrame } from "denovisor/src/migration/wire.ts";
 * const frame = encodeFrame("ready", new TextEncoder().encode("{}"));
 * console.log(frame.length); // 14
 * ```
 */
export function encodeFrame(kind: FrameKind, payload: Uint8Array, checksum?: number): Uint8Array {
  if (payload.length > MAX_FRAME_BYTES) {
    throw new DenovisorError(
      "INVALID_ARGUMENT",
      `a ${kind} frame of ${payload.length} bytes is over the ${MAX_FRAME_BYTES}-byte limit`,
    );
  }
  const frame = new Uint8Array(FRAME_HEADER_BYTES + payload.length);
  const view = new DataView(frame.buffer);
  frame[0] = FRAME_KINDS[kind];
  view.setUint32(4, payload.length, true);
  view.setUint32(8, checksum ?? crc32(payload), true);
  frame.set(payload, FRAME_HEADER_BYTES);
  return frame;
}

/** What a frame reader reads from (a `Deno.Conn` is one). */
export interface ByteSource {
  /** Reads into `p`; resolves the count, or null at the end of the stream. */
  read(p: Uint8Array): Promise<number | null>;
}

/** What frames are written to (a `Deno.Conn` is one). */
export interface ByteSink {
  /** Writes some of `p`; resolves how much. */
  write(p: Uint8Array): Promise<number>;
}

/**
 * Writes all of `bytes` to `sink`.
 *
 * @param sink Where to.
 * @param bytes What.
 * @example
 * ```ts ignore
 * import { encodeFrame, writeAll } from "denovisor/src/migration/wire.ts";
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: 4444 });
 * await writeAll(conn, encodeFrame("ready", new Uint8Array()));
 * ```
 */
export async function writeAll(sink: ByteSink, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await sink.write(bytes.subarray(at));
}

/**
 * Reads frames one at a time from a stream, checking each.
 *
 * @example
 * ```ts ignore
 * import { FrameReader } from "denovisor/src/migration/wire.ts";
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 4444 });
 * const reader = new FrameReader(await listener.accept());
 * const hello = await reader.expect("hello");
 * ```
 */
export class FrameReader {
  readonly #source: ByteSource;
  #count = 0;

  /**
   * @param source The stream (a `Deno.Conn`).
   */
  constructor(source: ByteSource) {
    this.#source = source;
  }

  /** Frames read so far. */
  get count(): number {
    return this.#count;
  }

  async #readExact(into: Uint8Array, what: string): Promise<void> {
    let at = 0;
    while (at < into.length) {
      const n = await this.#source.read(into.subarray(at));
      if (n === null) {
        throw refuse(
          `the stream ended ${at === 0 && what === "header" ? "before" : "inside"} frame ${
            this.#count + 1
          } (${what}: ${at} of ${into.length} bytes)`,
        );
      }
      at += n;
    }
  }

  /**
   * Reads the next frame.
   *
   * @returns The frame, its checksum verified.
   * @throws {DenovisorError} `MIGRATION` for a cut, oversized, unknown or
   *   corrupt frame.
   */
  async next(): Promise<Frame> {
    const header = new Uint8Array(FRAME_HEADER_BYTES);
    await this.#readExact(header, "header");
    const view = new DataView(header.buffer);
    const number = this.#count + 1;
    const kind = KIND_NAMES.get(header[0]);
    if (kind === undefined || header[1] !== 0 || header[2] !== 0 || header[3] !== 0) {
      throw refuse(`frame ${number}: not a migration frame (kind byte ${header[0]})`);
    }
    const length = view.getUint32(4, true);
    if (length > MAX_FRAME_BYTES) {
      throw refuse(
        `frame ${number} (${kind}): ${length} bytes is over the ${MAX_FRAME_BYTES}-byte limit`,
      );
    }
    const payload = new Uint8Array(length);
    await this.#readExact(payload, kind);
    const want = view.getUint32(8, true);
    const got = crc32(payload);
    if (got !== want) {
      throw refuse(
        `frame ${number} (${kind}): checksum mismatch (header ${want.toString(16)}, payload ${
          got.toString(16)
        }): the stream is corrupt`,
      );
    }
    this.#count = number;
    return { kind, payload };
  }

  /**
   * Reads the next frame and requires its kind; an `abort` frame from the
   * other side becomes an error carrying its message.
   *
   * @param kinds The kinds allowed here.
   * @returns The frame.
   * @throws {DenovisorError} `MIGRATION` for another kind or an abort.
   */
  async expect(...kinds: FrameKind[]): Promise<Frame> {
    const frame = await this.next();
    if (frame.kind === "abort" && !kinds.includes("abort")) {
      throw refuse(`the other side aborted: ${abortMessage(frame.payload)}`);
    }
    if (!kinds.includes(frame.kind)) {
      throw refuse(`frame ${this.#count}: expected ${kinds.join(" or ")}, got ${frame.kind}`);
    }
    return frame;
  }
}

function abortMessage(payload: Uint8Array): string {
  try {
    const parsed = JSON.parse(new TextDecoder().decode(payload));
    if (typeof parsed?.message === "string") return parsed.message.slice(0, 1000);
  } catch {
    // fall through
  }
  return "(no reason given)";
}

/**
 * Encodes a JSON frame.
 *
 * @param kind What it is.
 * @param value Its JSON body.
 * @returns The frame.
 * @example
 * ```ts
 * import { jsonFrame } from "denovisor/src/migration/wire.ts";
 * const frame = jsonFrame("abort", { message: "no room" });
 * console.log(frame[0]); // 3
 * ```
 */
export function jsonFrame(kind: FrameKind, value: unknown): Uint8Array {
  return encodeFrame(kind, new TextEncoder().encode(JSON.stringify(value)));
}

/**
 * Parses a JSON frame's payload as an object.
 *
 * @param frame The frame.
 * @returns Its body.
 * @throws {DenovisorError} `MIGRATION` when it is not a JSON object.
 * @example
 * ```ts
 * import { jsonFrame, jsonOf } from "denovisor/src/migration/wire.ts";
 * const bytes = jsonFrame("ready", { ok: true });
 * console.log(jsonOf({ kind: "ready", payload: bytes.subarray(12) })); // { ok: true }
 * ```
 */
export function jsonOf(frame: Frame): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(frame.payload));
  } catch (e) {
    throw refuse(`the ${frame.kind} frame is not JSON: ${(e as Error).message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw refuse(`the ${frame.kind} frame is not a JSON object`);
  }
  return value as Record<string, unknown>;
}
