/**
 * KSM plumbing shared by tests/ksm_test.ts and bench/ksm_bench.ts: turning the
 * host's ksmd on for a while (root only, restored afterwards) and running
 * identical idle guests that fill their RAM with the same pages.
 *
 * @module
 */

import { buildGuest } from "../src/build/guest_build.ts";
import { type RunResult, Vm } from "../mod.ts";

/** The host's KSM controls and counters. */
export const KSM_DIR = "/sys/kernel/mm/ksm";

/** Where a fill guest's pattern starts (above its image at 1 MiB). */
export const FILL_START = 0x20_0000;
/** A fill guest's RAM beyond what it fills (its image, boot structures, stack). */
export const EXTRA_MIB = 4;

/** How fast ksmd scans while {@link withKsmRunning} holds it. */
export interface KsmTuning {
  /** `sleep_millisecs` between batches (default 10). */
  sleepMillisecs?: number;
  /** `pages_to_scan` per batch (default 10000). */
  pagesToScan?: number;
}

async function readSetting(name: string): Promise<string> {
  return (await Deno.readTextFile(`${KSM_DIR}/${name}`)).trim();
}

async function writeSetting(name: string, value: string | number): Promise<void> {
  await Deno.writeTextFile(`${KSM_DIR}/${name}`, `${value}\n`);
}

/**
 * Runs `fn` with the host's ksmd running and scanning fast, then puts `run`,
 * `sleep_millisecs` and `pages_to_scan` back as they were, also when `fn`
 * throws. Throws (it does not skip) when the host has no KSM, or when ksmd is
 * off and this process may not turn it on; where ksmd already runs and the
 * settings are read-only, `fn` runs at the host's own pace.
 */
export async function withKsmRunning<T>(
  fn: () => Promise<T>,
  tuning: KsmTuning = {},
): Promise<T> {
  try {
    await Deno.stat(KSM_DIR);
  } catch (e) {
    throw new Error(
      `this host's kernel has no KSM (${KSM_DIR} is missing: built without CONFIG_KSM?): ${e}`,
    );
  }
  const names = ["run", "sleep_millisecs", "pages_to_scan"] as const;
  const old = Object.fromEntries(
    await Promise.all(names.map(async (n) => [n, await readSetting(n)] as const)),
  ) as Record<(typeof names)[number], string>;
  const wanted = {
    sleep_millisecs: tuning.sleepMillisecs ?? 10,
    pages_to_scan: tuning.pagesToScan ?? 10_000,
    run: 1,
  };
  const changed: (typeof names)[number][] = [];
  try {
    for (const [name, value] of Object.entries(wanted) as [(typeof names)[number], number][]) {
      if (old[name] === `${value}`) continue;
      try {
        await writeSetting(name, value);
        changed.push(name);
      } catch (e) {
        if (!(e instanceof Deno.errors.PermissionDenied) || old.run !== "1") {
          throw new Error(
            `cannot set ${KSM_DIR}/${name} to ${value} (run is ${old.run}; turning ksmd on ` +
              `needs root): ${e}`,
          );
        }
      }
    }
    return await fn();
  } finally {
    // In reverse: ksmd stops (when it was off) before its pace goes back.
    for (const name of [...changed].reverse()) await writeSetting(name, old[name]);
  }
}

/** The fill guest (tests/guests/ksm_fill.S), built once per process. */
let fillImage: Promise<Uint8Array> | undefined;

/** Identical idle guests that filled their RAM, running until closed. */
export class FilledGuests {
  /** The VMs, each idle in `hlt` after its fill. */
  readonly vms: Vm[];
  readonly #runs: Promise<RunResult>[];
  #closed?: Promise<RunResult[]>;

  private constructor(vms: Vm[], runs: Promise<RunResult>[]) {
    this.vms = vms;
    this.#runs = runs;
  }

  /**
   * Starts `count` VMs running tests/guests/ksm_fill.S: each fills `fillMiB`
   * MiB from {@link FILL_START} with pages that differ inside a guest and
   * match across guests, prints "filled", and halts (the irqchip keeps it
   * asleep in KVM). Resolves once every guest has filled.
   */
  static async start(
    count: number,
    options: { dedup: boolean; fillMiB: number; timeoutMs?: number },
  ): Promise<FilledGuests> {
    fillImage ??= buildGuest(new URL("./guests/ksm_fill.S", import.meta.url), {
      format: "flat",
    });
    const image = await fillImage;
    const memoryMiB = options.fillMiB + EXTRA_MIB;
    const guests = new FilledGuests([], []);
    try {
      for (let i = 0; i < count; i++) {
        const vm = await Vm.create({ memoryMiB, interrupts: true, dedup: options.dedup });
        guests.vms.push(vm);
        vm.load(image, { mode: "long", arguments: [FILL_START, options.fillMiB << 20] });
        guests.#runs.push(vm.run());
      }
      const deadline = performance.now() + (options.timeoutMs ?? 120_000);
      const seen = guests.vms.map(() => "");
      while (seen.some((s) => !s.includes("filled"))) {
        if (performance.now() > deadline) {
          throw new Error(`guests did not fill in time: ${JSON.stringify(seen)}`);
        }
        await new Promise((r) => setTimeout(r, 20));
        guests.vms.forEach((vm, i) => seen[i] += vm.readConsole());
      }
    } catch (e) {
      await guests.close();
      throw e;
    }
    return guests;
  }

  /** Stops and closes every VM; resolves with their runs' results. Idempotent. */
  close(): Promise<RunResult[]> {
    this.#closed ??= (async () => {
      for (const vm of this.vms) vm.stop();
      const results = await Promise.all(this.#runs);
      for (const vm of this.vms) vm.close();
      return results;
    })();
    return this.#closed;
  }
}
