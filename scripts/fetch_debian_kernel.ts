/**
 * Fetches Debian's current amd64 kernel (and, with `--busybox`, the static
 * busybox) into `.cache/kernels/` with `apt-get download`, and prints the
 * paths. Already cached files are not downloaded again.
 *
 *   deno run -A scripts/fetch_debian_kernel.ts [--busybox]
 *
 * @module
 */

import { fetchBusybox, fetchDebianKernel } from "../src/linux/debian_kernel.ts";

if (import.meta.main) {
  const log = (line: string) => console.error(`denovisor: ${line}`);
  const wanted = [fetchDebianKernel];
  if (Deno.args.includes("--busybox")) wanted.push(fetchBusybox);
  let failed = false;
  for (const fetch of wanted) {
    const result = await fetch({ log });
    if (result.ok) console.log(result.file.path);
    else {
      console.error(`denovisor: ${result.reason}`);
      failed = true;
    }
  }
  Deno.exit(failed ? 1 : 0);
}
