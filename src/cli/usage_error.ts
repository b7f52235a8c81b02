/**
 * The CLI's usage error: a bad argument, printed as one line with exit status 2.
 *
 * @module
 */

/**
 * A command-line mistake; `main` prints its message and exits with status 2.
 *
 * @example
 * ```ts
 * import { UsageError } from "denovisor/src/cli/usage_error.ts";
 * throw new UsageError("missing --to DIR (see snapshot --help)");
 * ```
 */
export class UsageError extends Error {}
