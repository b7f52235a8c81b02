/**
 * The root disk and its initramfs (`src/linux/rootfs.ts`, made through
 * `scripts/make_rootfs.ts` as the README does), checked on the host without a
 * VM: what the ext4 image holds (read back with debugfs) and what the
 * initramfs's `/init` does (unpacked with busybox's cpio). Booting them is
 * `tests/linux_rootfs_test.ts`.
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../src/errors.ts";
import { fetchDebianModules } from "../src/linux/modules.ts";
import { checkRootfsNetwork, ROOTFS_MODULE_NAMES, rootfsInitramfs } from "../src/linux/rootfs.ts";
import { debugfsCat, debugfsLs } from "./_disk.ts";
import { busybox, fetchedModules, fetchedPath, INSMOD_FAILED } from "./_linux.ts";

const MAKE_ROOTFS = new URL("../scripts/make_rootfs.ts", import.meta.url).pathname;

async function makeRootfs(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAKE_ROOTFS, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

/** The files of a newc archive, unpacked by busybox's cpio into `dir`. */
async function unpack(archive: Uint8Array, dir: string): Promise<void> {
  const cpio = new Deno.Command(fetchedPath(busybox, "busybox"), {
    args: ["cpio", "-i", "-d"],
    cwd: dir,
    stdin: "piped",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const writer = cpio.stdin.getWriter();
  await writer.write(archive);
  await writer.close();
  const { success, stderr } = await cpio.output();
  assert.ok(success, new TextDecoder().decode(stderr));
}

Deno.test("make_rootfs.ts writes an ext4 root disk with busybox, its links, init and rcS", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-rootfs-test-" });
  try {
    const disk = `${dir}/rootfs.img`;
    const { code, stdout, stderr } = await makeRootfs(
      "--disk",
      disk,
      "--size",
      "32",
      "--ip",
      "10.9.8.7/16",
      "--gateway",
      "10.9.0.1",
      "--hostname",
      "guest-1",
    );
    assert.equal(code, 0, stderr);
    assert.match(stdout, /wrote .*rootfs\.img: a 32 MiB ext4 root disk/);
    assert.equal((await Deno.stat(disk)).size, 32 << 20);

    const entries = async (path: string) =>
      new Map((await debugfsLs(disk, path)).map((e) => [e.name, e]));
    const bin = await entries("/bin");
    assert.equal(bin.get("busybox")?.mode, 0o100755);
    assert.equal(bin.get("busybox")?.size, (await Deno.stat(fetchedPath(busybox, "bb"))).size);
    for (const applet of ["sh", "mount", "ping", "cttyhack"]) {
      assert.equal(bin.get(applet)?.type, "symlink", `/bin/${applet}`);
    }
    for (const applet of ["init", "ip", "poweroff", "switch_root"]) {
      assert.equal((await entries("/sbin")).get(applet)?.type, "symlink", `/sbin/${applet}`);
    }
    const root = await entries("/");
    for (const d of ["dev", "proc", "sys", "run", "etc"]) assert.equal(root.get(d)?.type, "dir", d);
    assert.equal(root.get("tmp")?.mode, 0o041777);
    assert.equal(root.get("root")?.mode, 0o040700);

    const text = async (path: string) => new TextDecoder().decode(await debugfsCat(disk, path));
    assert.match(await text("/etc/inittab"), /^::sysinit:\/etc\/init\.d\/rcS$/m);
    assert.match(await text("/etc/inittab"), /^::respawn:\/bin\/cttyhack \/bin\/sh -l$/m);
    assert.equal((await entries("/etc/init.d")).get("rcS")?.mode, 0o100755);
    const rcS = await text("/etc/init.d/rcS");
    assert.match(rcS, /^IP=10\.9\.8\.7\/16$/m);
    assert.match(rcS, /^GATEWAY=10\.9\.0\.1$/m);
    assert.match(rcS, /^HOSTNAME=guest-1$/m);
    assert.match(rcS, /mount -t devtmpfs devtmpfs \/dev/);
    assert.match(rcS, /ip link set lo up/);
    assert.match(rcS, /denovisor root disk: /);
    assert.equal(await text("/etc/hostname"), "guest-1\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Shell words that are not commands to look up, and ash's builtins. */
const SHELL_WORDS = new Set([
  "if",
  "then",
  "else",
  "elif",
  "fi",
  "for",
  "in",
  "do",
  "done",
  "while",
  "case",
  "esac",
  "export",
  "set",
  "exec",
  "echo",
  "cd",
  "[",
  "return",
  "local",
  "!",
  "{",
  "}",
]);

/**
 * The commands a shell script runs: the first word of each command (at a line's
 * start, after `;`, `|`, `||`, `&&`, `then`, `do`, `else`, and inside `$(...)`,
 * quoted or not), less arithmetic, variable assignments, case patterns, shell words and the
 * functions it defines. Quoted strings are not looked into otherwise.
 */
function commandsOf(script: string): Set<string> {
  const commands = new Set<string>();
  const add = (word: string) => commands.add(word.replace(/^.*\//, ""));
  for (const m of script.matchAll(/\$\(\s*([\w./-]+)/g)) add(m[1]);
  const functions = new Set([...script.matchAll(/^\s*([A-Za-z_]+)\(\)/gm)].map((m) => m[1]));
  for (const raw of script.split("\n")) {
    const line = raw.replace(/^\s*#.*$/, "").replace(/\$\(\([^)]*\)\)/g, "N")
      .replace(/"(?:[^"\\]|\\.)*"|'[^']*'/g, "Q")
      .replace(/^\s*[^\s()]+\)\s/, "");
    for (const segment of line.split(/;|\|\||&&|\||\bthen\b|\bdo\b|\belse\b/)) {
      const words = segment.trim().split(/\s+/).filter((w) => w !== "!" && !/^\w+=/.test(w));
      const word = words[0];
      if (!word || SHELL_WORDS.has(word) || functions.has(word) || /^[)$Q]/.test(word)) continue;
      if (word.endsWith(")")) continue;
      add(word);
    }
  }
  return commands;
}

Deno.test("every command rcS and the initramfs's /init run is a busybox applet", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-rootfs-test-" });
  try {
    const bb = fetchedPath(busybox, "bb");
    const listed = await new Deno.Command(bb, { args: ["--list"], stdout: "piped" }).output();
    const applets = new Set(new TextDecoder().decode(listed.stdout).split("\n"));
    applets.add("busybox");
    const disk = `${dir}/rootfs.img`;
    const { code, stderr } = await makeRootfs(
      "--disk",
      disk,
      "--size",
      "16",
      "--initrd",
      `${dir}/i`,
    );
    assert.equal(code, 0, stderr);
    await unpack(await Deno.readFile(`${dir}/i`), dir);
    const scripts = {
      rcS: new TextDecoder().decode(await debugfsCat(disk, "/etc/init.d/rcS")),
      init: await Deno.readTextFile(`${dir}/init`),
    };
    for (const [name, script] of Object.entries(scripts)) {
      const commands = commandsOf(script);
      assert.ok(commands.has("mount") && commands.has("ip") === (name === "rcS"), name);
      const missing = [...commands].filter((c) => !applets.has(c));
      assert.deepEqual(missing, [], `${name} runs commands busybox lacks: ${missing.join(" ")}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("make_rootfs.ts refuses bad flags with status 2 before writing anything", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-rootfs-test-" });
  try {
    const disk = `${dir}/rootfs.img`;
    for (
      const [args, message] of [
        [[], /nothing to do/],
        [["--disk", disk, "--ip", "10.0.2.15/24; reboot -f"], /bad address/],
        [["--disk", disk, "--ip", "10.0.2.15"], /bad address/],
        [["--disk", disk, "--ip", "10.0.2.256/24"], /bad address/],
        [["--disk", disk, "--gateway", "$(reboot)"], /bad gateway/],
        [["--disk", disk, "--hostname", "a b"], /bad host name/],
        [["--disk", disk, "--size", "4"], /bad --size/],
        [["--disk", disk, "--size", "1e3"], /bad --size/],
        [["--disk", disk, "--bogus"], /bogus/],
      ] as const
    ) {
      const { code, stderr } = await makeRootfs(...args);
      assert.equal(code, 2, `${args.join(" ")}: ${stderr}`);
      assert.match(stderr, message);
    }
    await assert.rejects(Deno.stat(disk), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assert.throws(
    () => checkRootfsNetwork({ address: "10.0.2.15/33" }),
    (e) => e instanceof DenovisorError && e.code === "INVALID_ARGUMENT",
  );
  assert.deepEqual(checkRootfsNetwork({}), {
    address: undefined,
    gateway: undefined,
    hostname: "denovisor",
  });
});

Deno.test("the root disk's initramfs inserts virtio and ext4 in load order, then mounts root= and switch_roots", async () => {
  const dir = await Deno.makeTempDir({ prefix: "denovisor-rootfs-test-" });
  try {
    const modules = fetchedModules(await fetchDebianModules(ROOTFS_MODULE_NAMES));
    const names = modules.map((m) => m.name);
    // Each one after what it depends on; the four the disk needs among them.
    for (const m of modules) {
      for (const dep of m.depends) assert.ok(names.indexOf(dep) < names.indexOf(m.name), m.name);
    }
    for (const wanted of ["virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic"]) {
      assert.ok(names.includes(wanted), wanted);
    }
    const initrd = `${dir}/initrd.img`;
    const { code, stderr } = await makeRootfs("--initrd", initrd);
    assert.equal(code, 0, stderr);
    const archive = await Deno.readFile(initrd);
    assert.deepEqual(
      archive,
      await rootfsInitramfs(await Deno.readFile(fetchedPath(busybox, "bb")), modules),
    );
    await unpack(archive, dir);
    for (const m of modules) {
      assert.deepEqual(
        await Deno.readFile(`${dir}/lib/modules/${m.name}.ko`),
        await Deno.readFile(m.path),
      );
    }
    const init = (await Deno.readTextFile(`${dir}/init`)).split("\n");
    const insmods = init.filter((l) => l.includes(" insmod "));
    assert.deepEqual(
      insmods,
      names.map((n) =>
        `/bin/busybox insmod /lib/modules/${n}.ko || echo "${INSMOD_FAILED} ${n} $?"`
      ),
    );
    const after = (line: string) => {
      const at = init.findIndex((l) => l.trim() === line);
      assert.ok(at > init.indexOf(insmods.at(-1)!), `${line} after the modules`);
      return at;
    };
    const mount = after('if ! mount -t "$fstype" -o "$flags" "$root" /newroot; then');
    const move = after("mount --move /dev /newroot/dev || umount /dev");
    const switchRoot = after('exec switch_root /newroot "$init"');
    assert.ok(mount < move && move < switchRoot);
    assert.ok(init.includes("root=/dev/vda fstype=ext4 flags=rw init=/sbin/init"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
