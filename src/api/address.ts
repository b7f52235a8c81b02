/**
 * Where a migrating VM goes: `tcp:HOST:PORT` (QEMU's convention) or
 * `unix:PATH`, parsed and checked in one place for the control API
 * (`PUT /migrate`), `main.ts migrate --to` and `main.ts run --incoming`.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** A parsed migration address. */
export type MigrationAddress =
  | { transport: "tcp"; hostname: string; port: number }
  | { transport: "unix"; path: string };

/** The longest Unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL). */
export const UNIX_PATH_MAX = 107;

/**
 * Parses `tcp:HOST:PORT` (HOST a name, an IPv4 address or a bracketed IPv6
 * address; PORT 1 to 65535) or `unix:PATH`.
 *
 * @param text The address.
 * @returns Its parts.
 * @throws {DenovisorError} `INVALID_ARGUMENT` naming what is wrong.
 * @example
 * ```ts
 * import { parseMigrationAddress } from "denovisor/src/api/address.ts";
 * console.log(parseMigrationAddress("tcp:127.0.0.1:4444"));
 * // { transport: "tcp", hostname: "127.0.0.1", port: 4444 }
 * ```
 */
export function parseMigrationAddress(text: string): MigrationAddress {
  const bad = (why: string) =>
    new DenovisorError(
      "INVALID_ARGUMENT",
      `migration address must be tcp:HOST:PORT or unix:PATH (${why}), got ${JSON.stringify(text)}`,
    );
  if (typeof text !== "string") throw bad("not a string");
  if (text.startsWith("unix:")) {
    const path = text.slice(5);
    if (path === "") throw bad("empty path");
    if (new TextEncoder().encode(path).length > UNIX_PATH_MAX) {
      throw bad(`a socket path has at most ${UNIX_PATH_MAX} bytes`);
    }
    if (path.includes("\0")) throw bad("NUL in the path");
    return { transport: "unix", path };
  }
  if (!text.startsWith("tcp:")) throw bad("unknown transport");
  const rest = text.slice(4);
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$/.exec(rest);
  if (!m) throw bad("expected HOST:PORT");
  const port = Number(m[2]);
  if (port < 1 || port > 65535) throw bad("port out of 1..65535");
  const hostname = m[1].startsWith("[") ? m[1].slice(1, -1) : m[1];
  return { transport: "tcp", hostname, port };
}

/**
 * Formats an address back into its text form.
 *
 * @param address A parsed address.
 * @returns `tcp:HOST:PORT` or `unix:PATH`.
 * @example
 * ```ts
 * import { formatMigrationAddress } from "denovisor/src/api/address.ts";
 * console.log(formatMigrationAddress({ transport: "tcp", hostname: "::1", port: 1 })); // tcp:[::1]:1
 * ```
 */
export function formatMigrationAddress(address: MigrationAddress): string {
  if (address.transport === "unix") return `unix:${address.path}`;
  const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return `tcp:${host}:${address.port}`;
}
