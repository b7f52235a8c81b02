/**
 * The built-in default guest: `guest/hello/hello.S`, assembled from source on
 * first use (never shipped as a binary) and cached.
 *
 * @module
 */

import { buildGuest, guestSourceUrl } from "./build/guest_build.ts";
import type { LoadOptions } from "./vm.ts";

/** How the default guest is entered: 64-bit user mode (CPL3), ELF entry. */
export const DEFAULT_GUEST_LOAD_OPTIONS: LoadOptions = { mode: "user" };

/** Debug-exit code with which the default guest reports success (it writes 0). */
export const DEFAULT_GUEST_SUCCESS_CODE = 1;

/**
 * Builds (or reads from the cache) the default guest image.
 *
 * @returns A static ELF64 image to load with {@link DEFAULT_GUEST_LOAD_OPTIONS}.
 * @example
 * ```ts
 * import { defaultGuestImage, Vm } from "denovisor";
 * using vm = await Vm.create();
 * vm.load(await defaultGuestImage(), { mode: "user" });
 * console.log((await vm.run({ timeoutMs: 5000 })).console);
 * ```
 */
export function defaultGuestImage(): Promise<Uint8Array> {
  return buildGuest(guestSourceUrl("hello/hello.S"), { format: "elf" });
}
