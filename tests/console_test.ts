/**
 * The serial console's receive side: host input reaching a guest through
 * COM1's FIFO (polled, and by IRQ 4), the Ctrl-A escape keys, and `main.ts run`
 * forwarding standard input from a pipe and from a terminal.
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { buildRuntimeGuest } from "../src/build/workload_build.ts";
import { ConsoleEscape } from "../src/console.ts";
import { kvmTest, MAIN } from "./_helpers.ts";

const RAM_MIB = 16;
const EOT = "\x04";

function echoGuest(): Promise<Uint8Array> {
  return buildRuntimeGuest(new URL("./guests/console_echo.c", import.meta.url));
}

/** FNV-1a 64 of the bytes, as console_echo.c reports it. */
function fnv(bytes: Uint8Array): string {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffff_ffff_ffff_ffffn;
  return h.toString(16).padStart(16, "0");
}

for (const byInterrupt of [false, true]) {
  const how = byInterrupt ? "by IRQ 4" : "by polling the line status";
  kvmTest(`typed input reaches the guest ${how}, in order, past the FIFO`, async () => {
    using vm = await Vm.create({ memoryMiB: RAM_MIB, interrupts: byInterrupt });
    vm.load(await echoGuest(), { mode: "long", arguments: [byInterrupt ? 1 : 0, RAM_MIB << 20] });
    const run = vm.run({ timeoutMs: 20_000 });
    // Sent in pieces while the guest runs, 1000 bytes in all: the 64-byte FIFO
    // is refilled from the host's queue as the guest drains it.
    const lines = Array.from({ length: 20 }, (_, i) => `line ${i} `.padEnd(49, "."));
    const typed = lines.join("\n") + "\n";
    for (let at = 0; at < typed.length; at += 100) {
      vm.sendConsoleInput(typed.slice(at, at + 100));
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    vm.sendConsoleInput(EOT);
    const result = await run;
    assert.equal(result.reason, "guest_exit", result.summary);
    const report = JSON.parse(result.reportText!);
    const bytes = new TextEncoder().encode(typed);
    assert.equal(report.bytes, bytes.length);
    assert.equal(report.fnv, fnv(bytes));
    assert.equal(report.lines, lines.length);
    assert.equal(result.console, "ready\n" + lines.map((l) => `echo: ${l}\n`).join(""));
    if (byInterrupt) {
      // The UART raised IRQ 4 at least once per FIFO load; edges raised before
      // the guest took the last one merge, so the guest may count fewer.
      const raised = vm.irqStats().serial;
      assert.ok(raised >= Math.ceil(bytes.length / 64), `raised: ${raised}`);
      assert.ok(report.irqs >= 1 && report.irqs <= raised, `irqs: ${report.irqs} of ${raised}`);
    } else {
      assert.equal(report.irqs, 0);
    }
  });
}

kvmTest("input the guest does not read is bounded", async () => {
  using vm = await Vm.create({ memoryMiB: 4 });
  vm.sendConsoleInput(new Uint8Array(1 << 20));
  assert.throws(
    () => vm.sendConsoleInput("x".repeat(100)),
    (e: unknown) => e instanceof DenovisorError && e.code === "BUSY",
  );
});

Deno.test("Ctrl-A escapes: x quits, Ctrl-A Ctrl-A sends one, h asks for help", () => {
  const escape = new ConsoleEscape();
  const bytes = (...b: number[]) => new Uint8Array(b);
  assert.deepEqual(escape.feed(bytes(0x61, 0x01, 0x01, 0x62)), {
    bytes: bytes(0x61, 0x01, 0x62),
    quit: false,
    help: false,
  });
  // An escape split across two reads, and an unknown key after it (dropped).
  assert.deepEqual(escape.feed(bytes(0x63, 0x01)).bytes, bytes(0x63));
  assert.deepEqual(escape.feed(bytes(0x7a, 0x64)).bytes, bytes(0x64));
  assert.equal(escape.feed(bytes(0x01, 0x68)).help, true);
  const quit = escape.feed(bytes(0x65, 0x01, 0x78, 0x66));
  assert.deepEqual([quit.bytes, quit.quit], [bytes(0x65), true], "input after a quit is dropped");
  assert.equal(escape.feed(bytes(0x03)).bytes[0], 0x03, "Ctrl-C goes to the guest");
});

async function imagePath(): Promise<string> {
  const path = await Deno.makeTempFile({ suffix: ".elf" });
  await Deno.writeFile(path, await echoGuest());
  return path;
}

kvmTest("main.ts run forwards piped standard input to the guest", async () => {
  const path = await imagePath();
  try {
    for (const irq of [true, false]) {
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          MAIN,
          "run",
          ...(irq ? ["--irqchip", "--arg", "1"] : []),
          "--timeout",
          "20000",
          path,
        ],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
        env: { NO_COLOR: "1" },
      }).spawn();
      const writer = child.stdin.getWriter();
      // A literal Ctrl-A is typed twice; the guest echoes one byte 0x01.
      await writer.write(new TextEncoder().encode(`piped\none\x01\x01two\n${EOT}`));
      await writer.close();
      const output = await child.output();
      const stderr = new TextDecoder().decode(output.stderr);
      assert.equal(output.code, 0, stderr);
      assert.equal(
        new TextDecoder().decode(output.stdout),
        "ready\necho: piped\necho: one\x01two\n",
      );
      assert.match(stderr, /guest exited with status 0/);
    }
  } finally {
    await Deno.remove(path);
  }
});

kvmTest("Ctrl-A x from standard input stops the VM and exits 0", async () => {
  const path = await imagePath();
  try {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, "run", "--irqchip", "--arg", "1", path],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode("\x01x"));
    const output = await child.output();
    await writer.close().catch(() => {});
    const stderr = new TextDecoder().decode(output.stderr);
    assert.equal(output.code, 0, stderr);
    assert.match(stderr, /stopped by the host/);
  } finally {
    await Deno.remove(path);
  }
});

/** Whether python3 (for a pseudo-terminal) is installed. */
function hasPython(): boolean {
  try {
    return new Deno.Command("python3", { args: ["-c", "import pty"] }).outputSync().success;
  } catch {
    return false;
  }
}

/**
 * Runs the CLI on a pseudo-terminal (python3's pty module: Deno has no pty
 * API), types a line, then Ctrl-A x; prints the terminal's output, whether it
 * was in raw mode during the run and whether it was restored after, and the
 * exit status, as JSON.
 */
const PTY_DRIVER = `
import json, os, pty, select, sys, termios, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b""
def read_until(marker, timeout):
    global out
    end = time.time() + timeout
    while marker not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
read_until(b"ready", 20)
raw = not (termios.tcgetattr(fd)[3] & (termios.ICANON | termios.ECHO))
os.write(fd, b"typed\\r")
read_until(b"echo: typed", 10)
os.write(fd, b"\\x01x")
read_until(b"denovisor:", 10)
_, status = os.waitpid(pid, 0)
restored = bool(termios.tcgetattr(fd)[3] & termios.ICANON)
print(json.dumps({"out": out.decode(errors="replace"), "raw": raw, "restored": restored,
                  "code": os.waitstatus_to_exitcode(status)}))
`;

kvmTest("on a terminal, run uses raw mode, quits on Ctrl-A x and restores it", async (t) => {
  if (!hasPython()) {
    t.step({ name: "python3 with pty is not installed: skipped", ignore: true, fn: () => {} });
    return;
  }
  const path = await imagePath();
  try {
    const output = await new Deno.Command("python3", {
      args: [
        "-c",
        PTY_DRIVER,
        Deno.execPath(),
        "run",
        "-A",
        MAIN,
        "run",
        "--irqchip",
        "--arg",
        "1",
        path,
      ],
      env: { NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(output.stderr);
    assert.ok(output.success, stderr);
    const result = JSON.parse(new TextDecoder().decode(output.stdout));
    assert.equal(result.raw, true, "raw mode during the run");
    assert.equal(result.restored, true, "the terminal is restored");
    assert.equal(result.code, 0, result.out);
    assert.match(result.out, /echo: typed/);
    assert.match(result.out, /stopped by the host/);
  } finally {
    await Deno.remove(path);
  }
});
