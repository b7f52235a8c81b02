/**
 * Shared test plumbing: KVM availability (tests that need /dev/kvm are skipped
 * with a reason outside CI, and fail inside CI) and test-guest builds.
 *
 * @module
 */

import { buildGuest, type BuildGuestOptions } from "../src/build/guest_build.ts";
import { detectKvm, TAG } from "./_host.ts";

const HOST = detectKvm();

/** Why KVM tests cannot run here, or undefined when they can. */
export const KVM_PROBLEM = HOST.problem;

/** Why a Linux kernel cannot boot here in useful time, or undefined when it can. */
export const SLOW_KERNEL_PROBLEM = HOST.slowKernelProblem;

/** The host's kind of KVM (`hardware`, `pvm` or `none`). */
export const KVM_KIND = HOST.kind;

const inCi = Deno.env.get("CI") === "true";

if (KVM_PROBLEM && !inCi) {
  console.error(`note: skipping tests that need KVM: ${KVM_PROBLEM}`);
} else if (SLOW_KERNEL_PROBLEM && !KVM_PROBLEM) {
  console.error(`note: skipping tests that boot Linux: ${SLOW_KERNEL_PROBLEM}`);
}

/**
 * Tag groups the test command runs elsewhere (in kvmbox): their tests are not
 * registered here at all, so they are counted once, where they run. (Deno's
 * `--filter` has no negative lookahead to exclude them by name.)
 */
const RUN_ELSEWHERE = new Set(
  (Deno.env.get("DENOVISOR_TESTS_ELSEWHERE") ?? "").split(",").filter((t) => t !== ""),
);

/** A test that cannot run here: skipped with the reason outside CI, failed in CI. */
function needs(
  tag: string,
  name: string,
  problem: string | undefined,
  skipInCi: boolean,
  fn: (t: Deno.TestContext) => void | Promise<void>,
): void {
  if (RUN_ELSEWHERE.has(tag.trim())) return;
  Deno.test({
    name: `${tag}${name}`,
    ignore: problem !== undefined && (!inCi || skipInCi),
    fn: problem && inCi && !skipInCi
      ? () => {
        throw new Error(`CI requires KVM: ${problem}`);
      }
      : fn,
  });
}

/**
 * Registers a test that runs real guests on /dev/kvm (its name is tagged
 * `[kvm]`, which the test command uses to run it inside kvmbox on a host without
 * /dev/kvm). Without KVM it is skipped, except under CI=true where it fails with
 * the reason.
 */
export function kvmTest(name: string, fn: (t: Deno.TestContext) => void | Promise<void>): void {
  needs(TAG.kvm, name, KVM_PROBLEM, false, fn);
}

/**
 * Registers a test that boots a Linux kernel (tagged `[linux]`): it needs guest
 * kernel code at hardware speed (VT-x/AMD-V, or kvmbox). On PVM it is skipped
 * with the reason, in CI too (the test command runs these tests inside kvmbox
 * there when kvmbox is available); without KVM it fails under CI=true.
 */
export function linuxTest(name: string, fn: (t: Deno.TestContext) => void | Promise<void>): void {
  needs(TAG.linux, name, SLOW_KERNEL_PROBLEM, KVM_KIND === "pvm", fn);
}

/** Builds a guest from `tests/guests/`. */
export function testGuest(name: string, options?: BuildGuestOptions): Promise<Uint8Array> {
  return buildGuest(new URL(`./guests/${name}`, import.meta.url), options);
}

/** Decodes console bytes. */
export function text(bytes: Uint8Array): string {
  return new TextDecoder().decode(bytes);
}

/** `main.ts`, for tests that run the CLI as a subprocess. */
export const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** Runs `main.ts` with `args` (no standard input) and returns its status and output. */
export async function cli(
  ...args: string[]
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    env: { NO_COLOR: "1" },
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: output.code, stdout: decode(output.stdout), stderr: decode(output.stderr) };
}
