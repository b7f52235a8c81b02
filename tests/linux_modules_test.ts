/**
 * Debian's kernel with its own virtio, vsock and ext4 modules inserted by the
 * test initramfs (`busyboxInitramfs(lines, { modules })`): they load with no
 * virtio device present, `/proc/modules` lists each, a module insmod refuses
 * shows up on the console, and ext4 (with crc32c) mounts an image made on the
 * host with `mkfs.ext4 -d`, through a loop device. Needs guest kernel code at
 * hardware speed (`[linux]`: VT-x/AMD-V, or kvmbox).
 */

import assert from "node:assert/strict";

import { ConsoleDriver, Vm } from "../mod.ts";
import { buildInitramfs } from "../src/linux/initramfs.ts";
import { fetchDebianModules, type KernelModule } from "../src/linux/modules.ts";
import { makeExt4Image } from "./_disk.ts";
import { linuxTest } from "./_helpers.ts";
import {
  busyboxInitramfs,
  debianVmlinux,
  fetchedModules,
  fetchedPath,
  INSMOD_FAILED,
  VIRTIO_MODULE_NAMES,
} from "./_linux.ts";

/** Boot to the shell: ~10-25 s inside kvmbox, a second or two on hardware. */
const BOOT_MS = 480_000;
/** One command at the prompt. */
const COMMAND_MS = 60_000;
// deno-lint-ignore no-control-regex -- ESC is what the terminal query starts with
const PROMPT = /dv# (?:\x1b\[[0-9;]*[A-Za-z])*$/;

/** The virtio modules and `loop` (for the ext4 image), fetched here on the host. */
const MODULES = await fetchDebianModules([...VIRTIO_MODULE_NAMES, "loop"], {
  log: (line) => console.error(`note: ${line}`),
}).catch((e) => ({ ok: false as const, reason: e instanceof Error ? e.message : String(e) }));

/** Runs a command that must succeed and returns its output. */
async function sh(shell: ConsoleDriver, command: string): Promise<string> {
  const { output, status } = await shell.exec(command, { timeoutMs: COMMAND_MS });
  assert.equal(status, 0, `${command} failed (${status}):\n${output}`);
  return output;
}

linuxTest(
  "Debian's virtio, vsock and ext4 modules load into its kernel and ext4 mounts",
  async () => {
    const modules = fetchedModules(MODULES);
    const dir = await Deno.makeTempDir({ prefix: "denovisor-modules-" });
    try {
      // Not a module at all: insmod refuses it, and the console must say so.
      const bogus: KernelModule = {
        name: "not_a_module",
        path: `${dir}/not_a_module.ko`,
        file: "not_a_module.ko",
        depends: [],
        vermagic: "",
      };
      await Deno.writeTextFile(bogus.path, "this is not an ELF file\n");
      const image = `${dir}/disk.img`;
      await makeExt4Image(image, 8, { "hello.txt": "written by mkfs.ext4 on the host\n" });

      const initrd = await busyboxInitramfs([
        "/bin/busybox --install -s /bin",
        "mount -t sysfs sys /sys",
        "mount -t devtmpfs dev /dev",
        "echo DENOVISOR-SHELL-READY",
        "export PS1='dv# '",
        "exec setsid cttyhack /bin/sh",
      ], { modules: [bogus, ...modules] });
      // The image rides in a second archive appended to the first (the kernel unpacks both).
      const disk = buildInitramfs([{
        path: "disk.img",
        mode: 0o644,
        data: await Deno.readFile(image),
      }]);
      const both = new Uint8Array(initrd.length + disk.length);
      both.set(initrd);
      both.set(disk, initrd.length);

      using vm = await Vm.create({ memoryMiB: 512, interrupts: true });
      vm.loadLinux({
        kernel: await Deno.readFile(fetchedPath(debianVmlinux, "Debian's vmlinux")),
        initrd: both,
        cmdline: "console=ttyS0 panic=-1 rdinit=/init",
      });
      const shell = new ConsoleDriver(vm);
      const run = shell.watch(vm.run({ timeoutMs: 600_000 }));
      try {
        await shell.waitFor("DENOVISOR-SHELL-READY", { timeoutMs: BOOT_MS });
        await shell.waitFor(PROMPT, { timeoutMs: COMMAND_MS });

        // The refused module is on the console, with insmod's own message; no other is.
        const transcript = shell.transcript;
        assert.match(transcript, new RegExp(`${INSMOD_FAILED} not_a_module [1-9]\\d*`));
        assert.match(transcript, /insmod: can't insert '\/lib\/modules\/not_a_module\.ko'/);
        const failed = [...transcript.matchAll(new RegExp(`${INSMOD_FAILED} (\\w+)`, "g"))]
          .map((m) => m[1]);
        assert.deepEqual(failed, ["not_a_module"], transcript.slice(-3000));

        // /proc/modules: "name size refcount users state address".
        const listed = new Map(
          (await sh(shell, "cat /proc/modules")).trim().split("\n").map((line) => {
            const [name, , , users, state] = line.trim().split(/\s+/);
            return [name, { users: users.split(",").filter((u) => u !== "-" && u !== ""), state }];
          }),
        );
        for (const m of modules) {
          assert.equal(listed.get(m.name)?.state, "Live", `${m.name} in /proc/modules`);
        }
        assert.ok(!listed.has("not_a_module"));
        assert.equal(listed.size, modules.length, [...listed.keys()].join(" "));
        // The kernel resolved the same dependencies the .modinfo parser read.
        for (const m of modules) {
          for (const dep of m.depends) {
            assert.ok(listed.get(dep)?.users.includes(m.name), `${dep} is used by ${m.name}`);
          }
        }
        assert.match(await sh(shell, "cat /proc/filesystems"), /\text4\n/);
        assert.doesNotMatch(await sh(shell, "dmesg"), /Unknown symbol|disagrees about version/);

        // ext4 with its crc32c checksums reads the host's image.
        await sh(shell, "mkdir -p /mnt && mount -t ext4 -o loop /disk.img /mnt");
        assert.equal(await sh(shell, "cat /mnt/hello.txt"), "written by mkfs.ext4 on the host\n");
        assert.match(await sh(shell, "grep ' /mnt ' /proc/mounts"), /^\/dev\/loop\d+ \/mnt ext4 /);

        shell.send("poweroff -f\n");
        const result = await run;
        assert.equal(
          result.reason,
          "power_off",
          `${result.summary}\n${shell.transcript.slice(-2000)}`,
        );
      } finally {
        vm.stop();
        await run.catch(() => {});
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
