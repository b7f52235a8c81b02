/**
 * The README's worked example ("A Debian kernel with a root disk and a
 * network"), followed through the command line as a user would:
 * `scripts/make_rootfs.ts` makes the root disk and its initramfs, the test
 * makes a network namespace, and `main.ts run` boots Debian's kernel with the
 * disk and a NIC whose TAP denovisor creates in that namespace, its console on
 * the CLI's standard input and output. The start-up (rcS) prints its banner and
 * no error; at the guest's prompt: `mount` shows
 * `/dev/vda` as the ext4 root, the guest pings the host side, writes a file and
 * powers off; the CLI exits 0 and the host reads the file back out of the image
 * with debugfs. The namespace is removed even when the test fails. Runs as
 * root where `/dev/net/tun` is (kvmbox: Debian's `tun` module is inserted
 * first).
 */

import assert from "node:assert/strict";

import { debugfsCat } from "./_disk.ts";
import { linuxTest, MAIN } from "./_helpers.ts";
import { debianKernel, fetchedPath } from "./_linux.ts";
import { BOOT_MS, COMMAND_MS } from "./_linux_shell.ts";
import { ensureTun, runChecked as run } from "./_netns.ts";

const MAKE_ROOTFS = new URL("../scripts/make_rootfs.ts", import.meta.url).pathname;

// deno-lint-ignore no-control-regex -- ESC: busybox's line editing queries the terminal
const PROMPT = /denovisor:[^\n]*# (?:\x1b\[[0-9;]*[A-Za-z])*$/;

linuxTest(
  "the README's root disk example: Debian's kernel boots from /dev/vda, pings the host and writes a file the host reads",
  async () => {
    await ensureTun();
    const dir = await Deno.makeTempDir({ prefix: "denovisor-rootfs-" });
    const ns = `dvroot${Deno.pid}`;
    let child: Deno.ChildProcess | undefined;
    try {
      const disk = `${dir}/rootfs.img`;
      const initrd = `${dir}/initrd.img`;
      // deno run -A scripts/make_rootfs.ts --disk rootfs.img --size 64 --initrd initrd.img
      const made = await run(
        Deno.execPath(),
        "run",
        "-A",
        MAKE_ROOTFS,
        "--disk",
        disk,
        "--size",
        "64",
        "--initrd",
        initrd,
      );
      console.error(`note: make_rootfs.ts said:\n${made.trim()}`);
      assert.equal((await Deno.stat(disk)).size, 64 << 20);

      // sudo ip netns add dvdemo
      await run("ip", "netns", "add", ns);
      child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          MAIN,
          "run",
          "--kernel",
          fetchedPath(debianKernel, "Debian's kernel"),
          "--initrd",
          initrd,
          "--disk",
          disk,
          "--net",
          `netns=${ns},host=10.0.2.1/24`,
          "--cmdline",
          "console=ttyS0 panic=-1 root=/dev/vda denovisor.ip=10.0.2.15/24",
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
      let err = "";
      const stderr = (async () => {
        const errDecoder = new TextDecoder();
        for await (const chunk of child.stderr) err += errDecoder.decode(chunk, { stream: true });
        return err;
      })();
      let exited: Deno.CommandStatus | undefined;
      child.status.then((s) => exited = s);
      /** Waits for `pattern` in what the console printed after `from`; returns where it ends. */
      const waitFor = async (pattern: RegExp, ms: number, from = 0) => {
        const deadline = Date.now() + ms;
        for (;;) {
          const match = pattern.exec(out.slice(from));
          if (match) return from + match.index + match[0].length;
          if (Date.now() > deadline || exited) {
            const why = exited ? `main.ts exited (${exited.code})` : `none in ${ms} ms`;
            throw new Error(`no ${pattern} on the console: ${why}:\n${out.slice(-3000)}\n${err}`);
          }
          await new Promise((r) => setTimeout(r, 50));
        }
      };
      /** Types `command` at the prompt; returns its output (up to the next prompt). */
      const sh = async (command: string) => {
        const start = out.length;
        await type(`${command}; echo "status=$?"\n`);
        // The echoed command shows `$?`; only the output has the number.
        const end = await waitFor(/\nstatus=(\d+)\r?\n/, COMMAND_MS, start);
        const status = /\nstatus=(\d+)\r?\n[^]*$/.exec(out.slice(start, end));
        await waitFor(PROMPT, COMMAND_MS, end);
        assert.equal(status?.[1], "0", `${command} failed:\n${out.slice(start)}`);
        return out.slice(start, end);
      };

      const banner = await waitFor(/denovisor root disk: [^\n]*\n/, BOOT_MS);
      assert.match(out, /denovisor root disk: \/dev\/vda ext4 on \/, eth0 10\.0\.2\.15\/24/);
      await waitFor(PROMPT, COMMAND_MS, banner);
      // The start-up script ran clean: every command it uses is there and worked.
      const startup = out.slice(out.indexOf("Run /init as init process"), banner);
      assert.doesNotMatch(startup, /not found|failed|can't|No such|INSMOD-FAILED/, startup);

      // The root file system is the disk, read-write.
      assert.match(await sh("mount"), /^\/dev\/vda on \/ type ext4 \(rw/m);
      // The network: the TAP's host side answers.
      assert.match(await sh("ping -c1 10.0.2.1"), /1 packets transmitted, 1 packets received/);
      // A file written on the root disk, read on the host after the VM is gone.
      await sh("echo written-in-the-guest > /root/hello.txt");
      await type("poweroff -f\n");
      const status = await child.status;
      child = undefined;
      await stdin.close().catch(() => {});
      await reading;
      const summary = await stderr;
      assert.equal(status.code, 0, `${summary}\n${out.slice(-3000)}`);
      assert.match(summary, /powered off/);
      // debugfs -R "cat /root/hello.txt" rootfs.img
      const file = new TextDecoder().decode(await debugfsCat(disk, "/root/hello.txt"));
      assert.equal(file, "written-in-the-guest\n");
    } finally {
      if (child) {
        try {
          child.kill("SIGKILL");
        } catch {
          // It had ended.
        }
        await child.status;
      }
      await run("ip", "netns", "del", ns).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
    // Gone with the VM: the namespace (and the TAP denovisor made in it).
    assert.ok(!(await run("ip", "netns", "list")).includes(ns));
  },
);
