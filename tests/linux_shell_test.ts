/**
 * Debian's own kernel boots to a busybox shell on the serial console, and the
 * tests use it as a person would: type commands, read their output. They need
 * guest kernel code at hardware speed (`[linux]` tests: VT-x/AMD-V, or kvmbox;
 * skipped with the reason on PVM). Every budget holds under kvmbox's ~8x
 * slowdown.
 */

import assert from "node:assert/strict";

import { ConsoleDriver, type RunResult, Vm, type VmConfig } from "../mod.ts";
import { linuxTest } from "./_helpers.ts";
import { busyboxInitramfs, debianKernel, debianVmlinux, fetchedPath } from "./_linux.ts";

const MIB = 1 << 20;
/** Boot to the shell: ~10-25 s inside kvmbox for one vCPU (several vCPUs share its
 * one emulated CPU, so more), a second or two on hardware. */
const BOOT_MS = 480_000;
/** One command at the prompt. */
const COMMAND_MS = 60_000;
/** The prompt, then whatever terminal queries busybox's line editor sends (`ESC [6n`). */
// deno-lint-ignore no-control-regex -- ESC is what the terminal query starts with
const PROMPT = /dv# (?:\x1b\[[0-9;]*[A-Za-z])*$/;

// The API tests boot the vmlinux ELF (no decompressor: seconds saved under an
// emulator); the CLI test boots the bzImage.
const kernelPath = () => fetchedPath(debianKernel, "Debian's kernel");
const vmlinuxPath = () => fetchedPath(debianVmlinux, "Debian's vmlinux");

/** The kernel's version as `uname -r` prints it, from the file name (vmlinuz-VERSION). */
function kernelRelease(): string {
  return kernelPath().replace(/^.*vmlinuz-/, "");
}

/** An initramfs whose /init mounts the pseudo file systems and starts a shell on ttyS0. */
function shellInitramfs(): Promise<Uint8Array> {
  return busyboxInitramfs([
    "/bin/busybox --install -s /bin",
    "mount -t sysfs sys /sys",
    "mount -t devtmpfs dev /dev",
    "echo DENOVISOR-SHELL-READY",
    "export PS1='dv# '",
    "exec setsid cttyhack /bin/sh",
  ]);
}

interface Booted {
  vm: Vm;
  shell: ConsoleDriver;
  run: Promise<RunResult>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Boots Debian's kernel to the shell prompt. */
async function bootShell(
  config: VmConfig & { cmdline?: string } = {},
): Promise<Booted> {
  const vm = await Vm.create({ memoryMiB: 512, interrupts: true, ...config });
  try {
    vm.loadLinux({
      kernel: await Deno.readFile(vmlinuxPath()),
      initrd: await shellInitramfs(),
      cmdline: config.cmdline ?? "console=ttyS0 panic=-1 rdinit=/init",
    });
    const shell = new ConsoleDriver(vm);
    const run = shell.watch(vm.run({ timeoutMs: 600_000 }));
    await shell.waitFor("DENOVISOR-SHELL-READY", { timeoutMs: BOOT_MS });
    await shell.waitFor(PROMPT, { timeoutMs: COMMAND_MS });
    return {
      vm,
      shell,
      run,
      async [Symbol.asyncDispose]() {
        vm.stop();
        await run.catch(() => {});
        vm.close();
      },
    };
  } catch (e) {
    vm.stop();
    vm.close();
    throw e;
  }
}

/** Runs a command that must succeed and returns its output. */
async function sh(shell: ConsoleDriver, command: string): Promise<string> {
  const { output, status } = await shell.exec(command, { timeoutMs: COMMAND_MS });
  assert.equal(status, 0, `${command} failed (${status}):\n${output}`);
  return output;
}

/** `/proc/interrupts` counts of the line named `name` (summed over CPUs). */
function interruptCount(procInterrupts: string, name: RegExp): number {
  const line = procInterrupts.split("\n").find((l) => name.test(l.trimEnd()));
  assert.ok(line, `no ${name} line in /proc/interrupts:\n${procInterrupts}`);
  const counts = line.split(":")[1].trim().split(/\s+/).filter((w) => /^\d+$/.test(w));
  return counts.reduce((sum, n) => sum + Number(n), 0);
}

linuxTest("Debian's kernel boots to a shell that answers typed commands", async (t) => {
  await using booted = await bootShell({ cpuid: { hide: ["popcnt"] } });
  const { shell } = booted;

  await t.step("uname -r is the kernel's version", async () => {
    assert.equal((await sh(shell, "uname -r")).trim(), kernelRelease());
  });

  await t.step("/proc/cpuinfo shows the CPUID policy", async () => {
    const flags = await sh(shell, "grep -m1 '^flags' /proc/cpuinfo");
    const set = new Set(flags.split(":")[1].trim().split(/\s+/));
    assert.ok(set.has("hypervisor"), flags);
    assert.ok(set.has("sse2"), flags);
    assert.ok(!set.has("popcnt"), `popcnt is hidden by the policy: ${flags}`);
    const dmesg = await sh(shell, "dmesg | grep -i 'hypervisor detected' || true");
    assert.match(dmesg, /Hypervisor detected: KVM/);
  });

  await t.step("Linux finds the ACPI tables and KVM's paravirtual clock", async () => {
    const log = await sh(shell, "dmesg");
    for (const table of ["RSDP", "XSDT", "FACP", "DSDT", "APIC"]) {
      assert.match(log, new RegExp(`ACPI: ${table} 0x`), `the ${table} table\n${log}`);
    }
    assert.match(log, /Using ACPI \(MADT\) for SMP configuration information/);
    assert.doesNotMatch(log, /ACPI (BIOS )?(Error|Warning)|ACPI Exception|RSDP was not found/);
    assert.match(log, /Booting paravirtualized kernel on KVM/);
    assert.match(log, /clocksource: Switched to clocksource kvm-clock/);
  });

  await t.step("/proc/meminfo matches the VM's memory", async () => {
    const meminfo = await sh(shell, "grep MemTotal /proc/meminfo");
    const kib = Number(/MemTotal:\s+(\d+) kB/.exec(meminfo)?.[1]);
    // The kernel keeps its own image and early allocations out of MemTotal.
    assert.ok(kib * 1024 <= 512 * MIB && kib * 1024 > 440 * MIB, meminfo);
  });

  await t.step("the console is the 8250 driver on I/O APIC pin 4, interrupt-driven", async () => {
    // Hardware-reduced ACPI has no 8259, so Linux numbers its interrupts from
    // 24 up; the line itself is I/O APIC pin 4, ISA IRQ 4's wire.
    const probe = await sh(shell, "dmesg | grep ttyS0");
    assert.match(probe, /ttyS0 at I\/O 0x3f8 \(irq = \d+, base_baud = 115200\) is a 16550A/);
    const uart = /^\s*\d+:.*IO-APIC\s+4-edge\s+ttyS0$/m;
    const before = interruptCount(await sh(shell, "cat /proc/interrupts"), uart);
    // Typing and echoing a line raises the UART's interrupt for every chunk.
    await sh(shell, "echo typed-through-the-uart-interrupt");
    const after = interruptCount(await sh(shell, "cat /proc/interrupts"), uart);
    assert.ok(before > 0 && after > before, `ttyS0 interrupts ${before} -> ${after}`);
  });

  await t.step("the local APIC timer ticks", async () => {
    // A busy CPU's tick never stops (an idle one's may: NO_HZ).
    const local = (text: string) => interruptCount(text, /^\s*LOC:/);
    const first = await sh(shell, "cat /proc/interrupts");
    await sh(shell, "timeout 1 sh -c 'while :; do :; done' || true");
    const second = await sh(shell, "cat /proc/interrupts");
    assert.ok(local(second) > local(first) + 10, `LOC ${local(first)} -> ${local(second)}`);
  });

  await t.step("reboot stops the VM as reset", async () => {
    // Hardware-reduced ACPI without EFI: the kernel reboots through the reset
    // vector, whose code writes the FADT's reset value (no reboot=k needed).
    shell.send("reboot -f\n");
    const result = await booted.run;
    assert.equal(result.reason, "reset", `${result.summary}\n${shell.transcript.slice(-2000)}`);
    assert.match(result.console, /reboot: machine restart/);
  });
});

for (const cpus of [2, 4]) {
  linuxTest(`with ${cpus} vCPUs every CPU is online and runs work`, async () => {
    await using booted = await bootShell({ vcpus: cpus });
    const { shell } = booted;
    const last = cpus - 1;
    assert.equal((await sh(shell, "cat /sys/devices/system/cpu/online")).trim(), `0-${last}`);
    // Pin a process to each CPU and have it report where it ran (field 39 of
    // /proc/self/stat is the CPU it last ran on).
    const where = await sh(
      shell,
      `for c in $(seq 0 ${last}); do taskset -c $c awk '{print $39}' /proc/self/stat; done`,
    );
    assert.deepEqual(
      where.trim().split(/\s+/).map(Number),
      Array.from({ length: cpus }, (_, i) => i),
    );
    assert.match(await sh(shell, "dmesg"), new RegExp(`smp: Brought up 1 node, ${cpus} CPUs`));
    shell.send("poweroff -f\n");
    const result = await booted.run;
    assert.equal(result.reason, "power_off", `${result.summary}\n${shell.transcript.slice(-2000)}`);
  });
}

linuxTest("main.ts run --kernel: a user types at the shell and poweroff -f exits 0", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-shell-" });
  try {
    const initrd = `${dir}/initrd.img`;
    await Deno.writeFile(initrd, await shellInitramfs());
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("../main.ts", import.meta.url).pathname,
        "run",
        "--kernel",
        kernelPath(),
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0 panic=-1 rdinit=/init",
        "--mem",
        "512",
        "--timeout",
        String(BOOT_MS + 4 * COMMAND_MS),
      ],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stdin = child.stdin.getWriter();
    const type = (line: string) => stdin.write(new TextEncoder().encode(line));
    let out = "";
    const decoder = new TextDecoder();
    const reading = (async () => {
      for await (const chunk of child.stdout) out += decoder.decode(chunk, { stream: true });
    })();
    const stderr = new Response(child.stderr).text();
    const waitFor = async (pattern: RegExp, ms: number) => {
      const deadline = Date.now() + ms;
      while (!pattern.test(out)) {
        if (Date.now() > deadline) {
          child.kill("SIGKILL");
          throw new Error(`no ${pattern} on stdout in ${ms} ms:\n${out.slice(-2000)}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    await waitFor(PROMPT, BOOT_MS);
    await type("echo $((6 * 7))-answered; uname -r\n");
    await waitFor(
      new RegExp(`\\n42-answered\\r?\\n${kernelRelease().replace(/\./g, "\\.")}`),
      COMMAND_MS,
    );
    await type("poweroff -f\n");
    const status = await child.status;
    await stdin.close().catch(() => {});
    await reading;
    const summary = await stderr;
    assert.equal(status.code, 0, `${summary}\n${out.slice(-2000)}`);
    assert.match(summary, /powered off/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
