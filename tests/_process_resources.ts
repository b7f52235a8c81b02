/**
 * What this process holds right now, for leak tests and the soak bench: open
 * fds, the core's threads and the resident set.
 *
 * @module
 */

/** Open fds, core threads and RSS at one moment. */
export interface ProcessResources {
  /** Entries of /proc/self/fd. */
  fds: number;
  /** Threads whose name starts with the prefix asked for. */
  threads: number;
  /** VmRSS in KiB. */
  rssKiB: number;
}

/**
 * Counts this process's open fds, its threads named `threadPrefix*` and its
 * RSS. Deno's own blocking-call pool grows and shrinks on its own schedule, so
 * only the core's threads (named `dv-*`) are counted.
 *
 * @example
 * ```ts
 * import { processResources } from "./_process_resources.ts";
 * console.log(processResources("dv-vcpu").threads);
 * ```
 *
 * @param threadPrefix The thread-name prefix to count (default `dv-`).
 * @returns The counts.
 */
export function processResources(threadPrefix = "dv-"): ProcessResources {
  const fds = [...Deno.readDirSync("/proc/self/fd")].length;
  const threads = [...Deno.readDirSync("/proc/self/task")].filter((task) => {
    try {
      return Deno.readTextFileSync(`/proc/self/task/${task.name}/comm`).startsWith(threadPrefix);
    } catch {
      return false; // the thread exited while we looked
    }
  }).length;
  const status = Deno.readTextFileSync("/proc/self/status");
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  return { fds, threads, rssKiB };
}
