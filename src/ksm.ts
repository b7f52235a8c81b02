/**
 * Memory deduplication with KSM (Kernel Samepage Merging): the counters the
 * core reads from `/sys/kernel/mm/ksm/` and `/proc/self/ksm_stat`, and what they
 * say was saved.
 *
 * A VM created with `dedup: true` has its guest RAM marked `MADV_MERGEABLE`;
 * the host's `ksmd` (when `/sys/kernel/mm/ksm/run` is 1, the host's choice)
 * then backs identical pages with one copy. Identical idle guests share most of
 * their memory that way.
 *
 * @module
 */

/** The host-wide counters of `/sys/kernel/mm/ksm/` (null: the file is absent). */
export interface KsmHostCounters {
  /** `run`: 0 stopped, 1 running, 2 stopped and unmerging everything. */
  run: number | null;
  /** `pages_shared`: KSM pages in use (each the one copy of a merged set). */
  pagesShared: number | null;
  /** `pages_sharing`: further pages mapped to those copies: the pages saved. */
  pagesSharing: number | null;
  /** `pages_unshared`: pages scanned, unique so far. */
  pagesUnshared: number | null;
  /** `pages_volatile`: pages changing too often to be merged. */
  pagesVolatile: number | null;
  /** `full_scans`: how many times ksmd has scanned all mergeable memory. */
  fullScans: number | null;
}

/** This process's counters (null: the host's kernel does not report it). */
export interface KsmProcessCounters {
  /** `ksm_rmap_items`: pages of this process ksmd tracks. */
  rmapItems: number | null;
  /** `ksm_merging_pages`: pages of this process backed by a shared KSM page
   * (`/proc/self/ksm_stat`, or `/proc/self/ksm_merging_pages` on kernels
   * such as 6.1 whose `ksm_stat` lacks it). */
  mergingPages: number | null;
  /** `ksm_zero_pages`: pages merged into the zero page (newer kernels). */
  zeroPages: number | null;
  /** `ksm_process_profit`: the kernel's estimate of bytes saved minus its
   * tracking cost (newer kernels; may be negative). */
  profit: number | null;
}

/** What the core reports (`dv_vm_ksm`): a VM's setting and KSM's counters. */
export interface KsmCounters {
  /** Whether this VM's RAM is marked mergeable. */
  dedup: boolean;
  /** The host's page size in bytes. */
  pageSize: number;
  /** Host-wide counters. */
  host: KsmHostCounters;
  /** This process's counters (every VM of the process created with dedup). */
  process: KsmProcessCounters;
}

/** The `ksm` section of a VM's metrics: the counters and the bytes they save. */
export interface KsmMetrics extends KsmCounters {
  /** Host-wide counters, and `savedBytes` = `pagesSharing` × page size. */
  host: KsmHostCounters & { savedBytes: number | null };
  /** This process's counters, and `savedBytes` = `mergingPages` × page size:
   * the process's pages that KSM backs with a shared copy (the measure the
   * kernel's own `ksm_process_profit` counts as saved, before its overhead). */
  process: KsmProcessCounters & { savedBytes: number | null };
}

/**
 * Adds the bytes saved to KSM's counters.
 *
 * @param counters What the core read (`KvmVm.ksm()`).
 * @returns The counters with `host.savedBytes` and `process.savedBytes` (null
 *   where the count they come from is unknown).
 * @example
 * ```ts
 * import { ksmMetrics } from "denovisor";
 * const host = {
 *   run: 1, pagesShared: 10, pagesSharing: 30, pagesUnshared: 0, pagesVolatile: 0, fullScans: 4,
 * };
 * const m = ksmMetrics({
 *   dedup: true,
 *   pageSize: 4096,
 *   host,
 *   process: { rmapItems: 40, mergingPages: 40, zeroPages: null, profit: null },
 * });
 * console.log(m.host.savedBytes, m.process.savedBytes); // 122880 163840
 * ```
 */
export function ksmMetrics(counters: KsmCounters): KsmMetrics {
  const bytes = (pages: number | null) => pages === null ? null : pages * counters.pageSize;
  return {
    ...counters,
    host: { ...counters.host, savedBytes: bytes(counters.host.pagesSharing) },
    process: { ...counters.process, savedBytes: bytes(counters.process.mergingPages) },
  };
}
