/**
 * The denovisor command line: `deno run -A main.ts --help`.
 *
 * @module
 */

import { main } from "./src/cli/main_cli.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
