/**
 * Shared test plumbing: KVM availability (tests that need /dev/kvm are skipped
 * with a reason outside CI, and fail inside CI) and test-guest builds.
 *
 * @module
 */

import { buildGuest, type BuildGuestOptions } from "../src/build/guest_build.ts";

function kvmProblem(): string | undefined {
  try {
    Deno.openSync("/dev/kvm", { read: true, write: true }).close();
    return undefined;
  } catch (e) {
    return `/dev/kvm cannot be opened read-write: ${e instanceof Error ? e.message : e}`;
  }
}

/** Why KVM tests cannot run here, or undefined when they can. */
export const KVM_PROBLEM = kvmProblem();

const inCi = Deno.env.get("CI") === "true";

if (KVM_PROBLEM && !inCi) {
  console.error(`note: skipping tests that need KVM: ${KVM_PROBLEM}`);
}

/**
 * Registers a test that runs real guests on /dev/kvm. Without KVM it is
 * skipped, except under CI=true where it fails with the reason.
 */
export function kvmTest(name: string, fn: (t: Deno.TestContext) => void | Promise<void>): void {
  Deno.test({
    name,
    ignore: KVM_PROBLEM !== undefined && !inCi,
    fn: KVM_PROBLEM && inCi
      ? () => {
        throw new Error(`CI requires KVM: ${KVM_PROBLEM}`);
      }
      : fn,
  });
}

/** Builds a guest from `tests/guests/`. */
export function testGuest(name: string, options?: BuildGuestOptions): Promise<Uint8Array> {
  return buildGuest(new URL(`./guests/${name}`, import.meta.url), options);
}

/** Decodes console bytes. */
export function text(bytes: Uint8Array): string {
  return new TextDecoder().decode(bytes);
}
