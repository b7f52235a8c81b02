/**
 * CPU virtualization policy: which CPUID features a guest sees and which MSRs
 * it may access. Feature names resolve here to CPUID bits; the core applies
 * them on top of KVM's supported CPUID (`core/src/cpuid.rs`) and installs the
 * MSR filter (`core/src/msr_filter.rs`).
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** Where a CPUID feature flag lives. */
export interface CpuidBit {
  /** CPUID leaf (EAX input). */
  leaf: number;
  /** Sub-leaf (ECX input), for leaves that have them (default 0). */
  subleaf?: number;
  /** The output register. */
  register: "eax" | "ebx" | "ecx" | "edx";
  /** Bit number, 0-31. */
  bit: number;
}

/** CPUID features a policy can hide, by their Linux `/proc/cpuinfo` names. */
export const CPUID_FEATURES = {
  sse3: { leaf: 1, register: "ecx", bit: 0 },
  pclmulqdq: { leaf: 1, register: "ecx", bit: 1 },
  ssse3: { leaf: 1, register: "ecx", bit: 9 },
  fma: { leaf: 1, register: "ecx", bit: 12 },
  cx16: { leaf: 1, register: "ecx", bit: 13 },
  sse4_1: { leaf: 1, register: "ecx", bit: 19 },
  sse4_2: { leaf: 1, register: "ecx", bit: 20 },
  x2apic: { leaf: 1, register: "ecx", bit: 21 },
  movbe: { leaf: 1, register: "ecx", bit: 22 },
  popcnt: { leaf: 1, register: "ecx", bit: 23 },
  aes: { leaf: 1, register: "ecx", bit: 25 },
  xsave: { leaf: 1, register: "ecx", bit: 26 },
  avx: { leaf: 1, register: "ecx", bit: 28 },
  f16c: { leaf: 1, register: "ecx", bit: 29 },
  rdrand: { leaf: 1, register: "ecx", bit: 30 },
  tsc: { leaf: 1, register: "edx", bit: 4 },
  msr: { leaf: 1, register: "edx", bit: 5 },
  apic: { leaf: 1, register: "edx", bit: 9 },
  mtrr: { leaf: 1, register: "edx", bit: 12 },
  pat: { leaf: 1, register: "edx", bit: 16 },
  clflush: { leaf: 1, register: "edx", bit: 19 },
  fsgsbase: { leaf: 7, register: "ebx", bit: 0 },
  bmi1: { leaf: 7, register: "ebx", bit: 3 },
  avx2: { leaf: 7, register: "ebx", bit: 5 },
  smep: { leaf: 7, register: "ebx", bit: 7 },
  bmi2: { leaf: 7, register: "ebx", bit: 8 },
  erms: { leaf: 7, register: "ebx", bit: 9 },
  invpcid: { leaf: 7, register: "ebx", bit: 10 },
  avx512f: { leaf: 7, register: "ebx", bit: 16 },
  rdseed: { leaf: 7, register: "ebx", bit: 18 },
  adx: { leaf: 7, register: "ebx", bit: 19 },
  smap: { leaf: 7, register: "ebx", bit: 20 },
  sha_ni: { leaf: 7, register: "ebx", bit: 29 },
  umip: { leaf: 7, register: "ecx", bit: 2 },
  pku: { leaf: 7, register: "ecx", bit: 3 },
  la57: { leaf: 7, register: "ecx", bit: 16 },
  rdpid: { leaf: 7, register: "ecx", bit: 22 },
  lahf_lm: { leaf: 0x8000_0001, register: "ecx", bit: 0 },
  abm: { leaf: 0x8000_0001, register: "ecx", bit: 5 },
  syscall: { leaf: 0x8000_0001, register: "edx", bit: 11 },
  nx: { leaf: 0x8000_0001, register: "edx", bit: 20 },
  pdpe1gb: { leaf: 0x8000_0001, register: "edx", bit: 26 },
  rdtscp: { leaf: 0x8000_0001, register: "edx", bit: 27 },
} as const satisfies Record<string, CpuidBit>;

/** A CPUID feature name of {@link CPUID_FEATURES}. */
export type CpuFeature = keyof typeof CPUID_FEATURES;

/** What CPUID the guest sees. */
export interface CpuidPolicy {
  /** Features to hide, by name. */
  hide?: readonly CpuFeature[];
  /** Further bits to hide, for features without a name here. */
  hideBits?: readonly CpuidBit[];
}

/** Which MSRs the guest may read and write. A denied access gives it #GP. */
export interface MsrPolicy {
  /** What happens to MSRs not listed (default `allow`). */
  default?: "allow" | "deny";
  /** MSR indices always allowed. */
  allow?: readonly number[];
  /** MSR indices always denied. */
  deny?: readonly number[];
}

/** `KVM_MSR_FILTER_MAX_RANGES`: the ranges one MSR filter holds. */
const MSR_FILTER_MAX_RANGES = 16;
/** The most MSRs the core puts in one filter range (`MAX_RANGE_MSRS`). */
const MSR_FILTER_RANGE_MSRS = 1536 * 8;

function checkBit(b: CpuidBit): CpuidBit {
  const u32 = (v: number) => Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff;
  if (
    !u32(b.leaf) || !u32(b.subleaf ?? 0) || !["eax", "ebx", "ecx", "edx"].includes(b.register) ||
    !Number.isInteger(b.bit) || b.bit < 0 || b.bit > 31
  ) {
    throw new DenovisorError("INVALID_ARGUMENT", `bad CPUID bit ${JSON.stringify(b)}`);
  }
  return b;
}

/**
 * Turns a CPUID policy into the JSON the core takes.
 *
 * @param policy Features and bits to hide.
 * @returns The core's policy document.
 * @example
 * ```ts
 * import { cpuidPolicyJson } from "denovisor/src/cpu/policy.ts";
 * console.log(cpuidPolicyJson({ hide: ["avx2"] }));
 * ```
 */
export function cpuidPolicyJson(policy: CpuidPolicy): string {
  if (typeof policy !== "object" || policy === null) {
    throw new DenovisorError("INVALID_ARGUMENT", "cpuid must be an object");
  }
  for (const key of ["hide", "hideBits"] as const) {
    if (policy[key] !== undefined && !Array.isArray(policy[key])) {
      throw new DenovisorError("INVALID_ARGUMENT", `cpuid.${key} must be an array`);
    }
  }
  const bits: CpuidBit[] = [];
  for (const name of policy.hide ?? []) {
    const bit: CpuidBit | undefined = (CPUID_FEATURES as Record<string, CpuidBit>)[name];
    if (!bit) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `unknown CPUID feature "${name}" (known: ${Object.keys(CPUID_FEATURES).join(", ")})`,
      );
    }
    bits.push(bit);
  }
  for (const b of policy.hideBits ?? []) bits.push(checkBit(b));
  return JSON.stringify({
    hide: bits.map((b) => ({
      leaf: b.leaf,
      subleaf: b.subleaf ?? 0,
      register: b.register,
      bit: b.bit,
    })),
  });
}

/**
 * Turns an MSR policy into the JSON the core takes.
 *
 * @param policy Default action and listed MSRs.
 * @returns The core's policy document.
 * @example
 * ```ts
 * import { msrPolicyJson } from "denovisor/src/cpu/policy.ts";
 * console.log(msrPolicyJson({ deny: [0x1b] }));
 * ```
 */
export function msrPolicyJson(policy: MsrPolicy): string {
  const fail = (message: string) => new DenovisorError("INVALID_ARGUMENT", message);
  if (typeof policy !== "object" || policy === null) throw fail("msrs must be an object");
  const action = policy.default ?? "allow";
  if (action !== "allow" && action !== "deny") {
    throw fail(`bad MSR policy: default must be "allow" or "deny", got ${JSON.stringify(action)}`);
  }
  for (const key of ["allow", "deny"] as const) {
    if (policy[key] !== undefined && !Array.isArray(policy[key])) {
      throw fail(`msrs.${key} must be an array`);
    }
  }
  const indices = [...policy.allow ?? [], ...policy.deny ?? []];
  const bad = indices.find((i) => !Number.isInteger(i) || i < 0 || i > 0xffff_ffff);
  if (bad !== undefined) throw fail(`bad MSR index ${bad}`);
  // The core's rules (core/src/msr_filter.rs), checked here too so that a bad
  // policy is refused before /dev/kvm is opened.
  const allowed = new Set(policy.allow ?? []);
  const both = (policy.deny ?? []).find((i) => allowed.has(i));
  if (both !== undefined) {
    throw fail(`bad MSR policy: MSR 0x${both.toString(16)} is both allowed and denied`);
  }
  const listed = [...new Set(indices)].sort((a, b) => a - b);
  let ranges = 0;
  let base = -2;
  let count = 0;
  for (const msr of listed) {
    if (msr === base + count && count < MSR_FILTER_RANGE_MSRS) {
      count++;
    } else {
      ranges++;
      base = msr;
      count = 1;
    }
  }
  if (ranges > MSR_FILTER_MAX_RANGES) {
    throw fail(
      `bad MSR policy: the listed MSRs form ${ranges} separate ranges; KVM takes at most ` +
        MSR_FILTER_MAX_RANGES,
    );
  }
  return JSON.stringify({
    default: policy.default ?? "allow",
    allow: policy.allow ?? [],
    deny: policy.deny ?? [],
  });
}
