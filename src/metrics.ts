/**
 * Exit metrics as reports: a JSON document and the Prometheus text exposition
 * format. The counters themselves live in the core (atomic, per vCPU) and are
 * read in one call ({@link Vm.metrics}); nothing here runs per exit.
 *
 * @module
 */

import type { VcpuMetrics } from "./kvm/kvm.ts";
import type { BusRange } from "./devices.ts";
import type { KsmMetrics } from "./ksm.ts";
import type { Vm } from "./vm.ts";

/** A VM's metrics at one moment, as `main.ts run --metrics FILE` writes them. */
export interface MetricsReport {
  /** When the snapshot was taken (ISO 8601). */
  takenAt: string;
  /** All vCPUs summed. */
  total: VcpuMetrics;
  /** One entry per vCPU, by index. */
  vcpus: VcpuMetrics[];
  /** Memory deduplication: whether the VM has it, what KSM saves the host and
   * this process ({@link Vm.ksm}). */
  ksm: KsmMetrics;
  /** Exits by the device that claimed the access (port and MMIO ranges, all
   * vCPUs), and the accesses no device claimed. */
  devices: DeviceExits;
}

/** Exits attributed to devices: every bus range with its reads and writes. */
export interface DeviceExits {
  /** Each range, port I/O first, by address. */
  ranges: BusRange[];
  /** Accesses no device claimed (open bus), by space. */
  unclaimed: Record<"pio" | "mmio", { reads: number; writes: number }>;
}

function sumInto(into: Record<string, unknown>, from: Record<string, unknown>): void {
  for (const [key, value] of Object.entries(from)) {
    if (typeof value === "number") {
      into[key] = ((into[key] as number | undefined) ?? 0) + value;
    } else if (Array.isArray(value)) {
      const acc = (into[key] as number[] | undefined) ?? value.map(() => 0);
      value.forEach((v: number, i) => acc[i] += v);
      into[key] = acc;
    } else if (value && typeof value === "object") {
      const acc = (into[key] as Record<string, unknown> | undefined) ?? {};
      sumInto(acc, value as Record<string, unknown>);
      into[key] = acc;
    }
  }
}

/**
 * Sums per-vCPU metrics field by field.
 *
 * @param vcpus Per-vCPU metrics.
 * @returns Their sum (histogram buckets summed bucket by bucket).
 * @example
 * ```ts
 * import { sumMetrics, Vm } from "denovisor";
 * using vm = await Vm.create();
 * console.log(sumMetrics(vm.metrics()).exits); // 0
 * ```
 */
export function sumMetrics(vcpus: readonly VcpuMetrics[]): VcpuMetrics {
  const total: Record<string, unknown> = {};
  for (const m of vcpus) sumInto(total, m as unknown as Record<string, unknown>);
  return total as unknown as VcpuMetrics;
}

/**
 * Takes a metrics report of a VM.
 *
 * @param vm The VM.
 * @returns Per-vCPU metrics, their total and the VM's KSM section.
 * @example
 * ```ts
 * import { metricsReport, Vm } from "denovisor";
 * using vm = await Vm.create();
 * console.log(JSON.stringify(metricsReport(vm), null, 2));
 * ```
 */
export function metricsReport(vm: Vm): MetricsReport {
  const vcpus = vm.metrics();
  const { buses } = vm.devices();
  return {
    takenAt: new Date().toISOString(),
    total: sumMetrics(vcpus),
    vcpus,
    ksm: vm.ksm(),
    devices: {
      ranges: [...buses.pio.devices, ...buses.mmio.devices],
      unclaimed: { pio: buses.pio.unclaimed, mmio: buses.mmio.unclaimed },
    },
  };
}

/** Escapes a Prometheus label value. */
function label(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

/**
 * Renders metrics in the Prometheus text exposition format (version 0.0.4).
 *
 * @param metrics Per-vCPU metrics, or a whole {@link MetricsReport}, whose KSM
 *   section adds `denovisor_vm_dedup` and the `denovisor_ksm_*` gauges (a
 *   count the kernel does not report is left out).
 * @param labels Extra labels for every sample (for example `{ vm: "web-1" }`).
 * @returns The exposition text, ending with a newline.
 * @example
 * ```ts
 * import { toPrometheus, Vm } from "denovisor";
 * using vm = await Vm.create();
 * console.log(toPrometheus(vm.metrics(), { vm: "demo" }));
 * ```
 */
export function toPrometheus(
  metrics: readonly VcpuMetrics[] | MetricsReport,
  labels: Readonly<Record<string, string>> = {},
): string {
  const vcpus = "vcpus" in metrics ? metrics.vcpus : metrics;
  const lines: string[] = [];
  const labelText = (extra: Record<string, string>) => {
    const all = { ...labels, ...extra };
    const parts = Object.entries(all).map(([k, v]) => `${k}="${label(v)}"`);
    return parts.length ? `{${parts.join(",")}}` : "";
  };
  const family = (name: string, type: string, help: string) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  };

  family("denovisor_vcpu_exits_total", "counter", "VM exits by reason.");
  const reasons = [
    ["io_in", "ioIn"],
    ["io_out", "ioOut"],
    ["mmio_read", "mmioRead"],
    ["mmio_write", "mmioWrite"],
    ["hlt", "hlt"],
    ["shutdown", "shutdown"],
    ["internal_error", "internalError"],
    ["interrupted", "interrupted"],
    ["msr_read_denied", "msrReadDenied"],
    ["msr_write_denied", "msrWriteDenied"],
    ["other", "other"],
  ] as const;
  vcpus.forEach((m, vcpu) => {
    for (const [reason, key] of reasons) {
      lines.push(`denovisor_vcpu_exits_total${labelText({ vcpu: `${vcpu}`, reason })} ${m[key]}`);
    }
  });

  family(
    "denovisor_vcpu_io_exits_total",
    "counter",
    "Port-I/O exits by direction and the device range of the port.",
  );
  vcpus.forEach((m, vcpu) => {
    for (const [direction, counts] of [["in", m.ioInByPort], ["out", m.ioOutByPort]] as const) {
      for (const [range, n] of Object.entries(counts)) {
        lines.push(
          `denovisor_vcpu_io_exits_total${labelText({ vcpu: `${vcpu}`, direction, range })} ${n}`,
        );
      }
    }
  });

  family("denovisor_vcpu_hypercalls_total", "counter", "Hypercalls by kind.");
  vcpus.forEach((m, vcpu) => {
    for (const [kind, n] of Object.entries(m.hypercalls)) {
      lines.push(`denovisor_vcpu_hypercalls_total${labelText({ vcpu: `${vcpu}`, kind })} ${n}`);
    }
  });

  family(
    "denovisor_vcpu_console_bytes_total",
    "counter",
    "Console bytes by what became of them: written by the guest, dropped by the " +
      "in-memory capture (beyond its newest 1 MiB), dropped by the stream (the fd did not drain).",
  );
  vcpus.forEach((m, vcpu) => {
    const kinds = [
      ["written", m.console.bytes],
      ["capture_dropped", m.console.captureDropped],
      ["stream_dropped", m.console.streamDropped],
    ] as const;
    for (const [kind, n] of kinds) {
      lines.push(`denovisor_vcpu_console_bytes_total${labelText({ vcpu: `${vcpu}`, kind })} ${n}`);
    }
  });

  family(
    "denovisor_vcpu_kvm_run_seconds_total",
    "counter",
    "Time inside KVM_RUN: guest execution plus KVM's own exit handling.",
  );
  vcpus.forEach((m, vcpu) => {
    lines.push(
      `denovisor_vcpu_kvm_run_seconds_total${labelText({ vcpu: `${vcpu}` })} ${m.kvmRunNs / 1e9}`,
    );
  });

  family(
    "denovisor_vcpu_exit_handling_seconds",
    "histogram",
    "Time the VMM spent handling each exit, between two KVM_RUNs.",
  );
  vcpus.forEach((m, vcpu) => {
    let cumulative = 0;
    m.handlingLatencyLog2Ns.forEach((count, i) => {
      cumulative += count;
      // Bucket i holds [2^i, 2^(i+1)) ns, so its upper bound is 2^(i+1) ns.
      const le = `${2 ** (i + 1) / 1e9}`;
      lines.push(
        `denovisor_vcpu_exit_handling_seconds_bucket${
          labelText({ vcpu: `${vcpu}`, le })
        } ${cumulative}`,
      );
    });
    lines.push(
      `denovisor_vcpu_exit_handling_seconds_bucket${
        labelText({ vcpu: `${vcpu}`, le: "+Inf" })
      } ${cumulative}`,
      `denovisor_vcpu_exit_handling_seconds_sum${labelText({ vcpu: `${vcpu}` })} ${m.vmmNs / 1e9}`,
      `denovisor_vcpu_exit_handling_seconds_count${labelText({ vcpu: `${vcpu}` })} ${cumulative}`,
    );
  });

  if ("ksm" in metrics) {
    const ksm = metrics.ksm;
    family("denovisor_vm_dedup", "gauge", "1 when the VM's RAM is mergeable for KSM.");
    lines.push(`denovisor_vm_dedup${labelText({})} ${ksm.dedup ? 1 : 0}`);
    const gauge = (name: string, help: string, samples: [string, number | null][]) => {
      const known = samples.filter(([, v]) => v !== null);
      if (known.length === 0) return;
      family(name, "gauge", help);
      for (const [scope, v] of known) lines.push(`${name}${labelText({ scope })} ${v}`);
    };
    gauge(
      "denovisor_ksm_saved_bytes",
      "Memory KSM saves: the host's pages_sharing, this process's merging pages, in bytes.",
      [["host", ksm.host.savedBytes], ["process", ksm.process.savedBytes]],
    );
    gauge("denovisor_ksm_pages_shared", "KSM pages in use on the host.", [[
      "host",
      ksm.host.pagesShared,
    ]]);
    gauge("denovisor_ksm_pages_sharing", "Pages sharing a KSM page on the host.", [[
      "host",
      ksm.host.pagesSharing,
    ]]);
    gauge("denovisor_ksm_merging_pages", "This process's pages backed by a KSM page.", [[
      "process",
      ksm.process.mergingPages,
    ]]);
    gauge("denovisor_ksm_full_scans", "Full scans ksmd has made.", [["host", ksm.host.fullScans]]);
  }
  if ("devices" in metrics) {
    family(
      "denovisor_device_exits_total",
      "counter",
      "VM exits by the device that claimed the access (reads and writes of its port or MMIO range).",
    );
    for (const r of metrics.devices.ranges) {
      for (const op of ["read", "write"] as const) {
        const value = op === "read" ? r.reads : r.writes;
        lines.push(
          `denovisor_device_exits_total${
            labelText({ device: r.name, space: r.space, op })
          } ${value}`,
        );
      }
    }
    for (const space of ["pio", "mmio"] as const) {
      const u = metrics.devices.unclaimed[space];
      for (const [op, value] of [["read", u.reads], ["write", u.writes]] as const) {
        lines.push(
          `denovisor_device_exits_total${labelText({ device: "(none)", space, op })} ${value}`,
        );
      }
    }
  }
  return lines.join("\n") + "\n";
}
