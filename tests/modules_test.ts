/**
 * Debian's kernel modules for the Linux tests (pure: no KVM): the `.modinfo`
 * parser and the load order, against the real `.ko` files of the kernel the
 * Linux tests boot; the cache; the initramfs that inserts them.
 */

import assert from "node:assert/strict";

import { DenovisorError } from "../src/errors.ts";
import {
  elfSection,
  fetchDebianModules,
  type KernelModule,
  loadOrder,
  moduleName,
  parseModinfo,
} from "../src/linux/modules.ts";
import {
  busybox,
  busyboxInitramfs,
  fetchedModules,
  fetchedPath,
  INSMOD_FAILED,
  VIRTIO_MODULE_NAMES,
  VIRTIO_MODULES,
} from "./_linux.ts";

const modules = (): KernelModule[] => fetchedModules(VIRTIO_MODULES);
const version = (): string => {
  if (!VIRTIO_MODULES.ok) throw new Error(VIRTIO_MODULES.reason);
  return VIRTIO_MODULES.version;
};
const byName = (name: string): KernelModule => {
  const found = modules().find((m) => m.name === name);
  assert.ok(found, `${name} is among the fetched modules`);
  return found;
};
const isError = (code: string, message: RegExp) => (e: unknown) =>
  e instanceof DenovisorError && e.code === code && message.test(e.message);

Deno.test(".modinfo of Debian's virtio_pci.ko and ext4.ko: name, depends, vermagic", async () => {
  const pci = parseModinfo(await Deno.readFile(byName("virtio_pci").path));
  assert.equal(pci.name, "virtio_pci");
  assert.deepEqual(
    [...pci.depends].sort(),
    ["virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring"],
  );
  assert.ok(pci.vermagic.startsWith(`${version()} SMP `), pci.vermagic);
  assert.ok(pci.fields.alias.some((a) => a.startsWith("pci:v00001AF4")), "virtio's PCI vendor");
  assert.deepEqual(pci.fields.license, ["GPL"]);

  const ext4 = parseModinfo(await Deno.readFile(byName("ext4").path));
  assert.equal(ext4.name, "ext4");
  assert.deepEqual([...ext4.depends].sort(), ["crc16", "jbd2", "mbcache"]);
  assert.deepEqual(ext4.fields.softdep, ["pre: crypto-crc32c"]);

  // A module with no dependencies has an empty depends= field.
  assert.deepEqual(parseModinfo(await Deno.readFile(byName("virtio_ring").path)).depends, []);
  // virtio-rng.ko is the module virtio_rng.
  assert.equal(byName("virtio_rng").file.replace(/^.*\//, ""), "virtio-rng.ko");
  assert.equal(parseModinfo(await Deno.readFile(byName("virtio_rng").path)).name, "virtio_rng");
});

Deno.test("every fetched module's .modinfo matches the index and the kernel", async () => {
  for (const m of modules()) {
    const info = parseModinfo(await Deno.readFile(m.path), m.path);
    assert.equal(info.name, m.name);
    assert.deepEqual(info.depends, m.depends);
    assert.equal(info.vermagic, m.vermagic);
    assert.ok(m.vermagic.startsWith(`${version()} `), `${m.name}: ${m.vermagic}`);
    assert.ok(m.path.endsWith(`/modules-${version()}/${m.file}`), m.path);
    assert.match(m.file, /^kernel\/.+\.ko$/);
  }
});

/** Each module comes after the modules it depends on. */
function assertDependencyOrder(list: readonly KernelModule[]): void {
  const names = list.map((m) => m.name);
  for (const [i, m] of list.entries()) {
    for (const dep of m.depends) {
      const at = names.indexOf(dep);
      assert.ok(at >= 0 && at < i, `${m.name} (#${i}) needs ${dep} (#${at}) first: ${names}`);
    }
  }
}

Deno.test("one name brings its dependency closure, in load order", async () => {
  const result = await fetchDebianModules(["vmw_vsock_virtio_transport", "ext4", "virtio_pci"]);
  assert.ok(result.ok, result.ok ? "" : result.reason);
  assertDependencyOrder(result.modules);
  assert.deepEqual(result.modules.map((m) => m.name).sort(), [
    "crc16",
    "ext4",
    "jbd2",
    "mbcache",
    "virtio",
    "virtio_pci",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_ring",
    "vmw_vsock_virtio_transport",
    "vmw_vsock_virtio_transport_common",
    "vsock",
  ]);
});

Deno.test("the virtio modules come in dependency order, each once", () => {
  const names = modules().map((m) => m.name);
  assert.equal(new Set(names).size, names.length, `no duplicates: ${names}`);
  for (const wanted of VIRTIO_MODULE_NAMES) assert.ok(names.includes(wanted), wanted);
  assertDependencyOrder(modules());
  // The transports' and drivers' dependency chains are there.
  assert.ok(names.indexOf("virtio_pci") > names.indexOf("virtio_pci_modern_dev"));
  assert.ok(names.indexOf("virtio_net") > names.indexOf("net_failover"));
  assert.ok(names.indexOf("net_failover") > names.indexOf("failover"));
  assert.ok(
    names.indexOf("vmw_vsock_virtio_transport") >
      names.indexOf("vmw_vsock_virtio_transport_common"),
  );
});

Deno.test("the kernel's config: the virtio drivers and ext4 are modules", () => {
  if (!VIRTIO_MODULES.ok) throw new Error(VIRTIO_MODULES.reason);
  const { config } = VIRTIO_MODULES;
  for (
    const option of ["CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_VSOCKETS"]
  ) {
    assert.equal(config[option], "m", option);
  }
  assert.equal(config.CONFIG_MODULES, "y");
  assert.equal(config.CONFIG_CRC32, "y");
  assert.deepEqual(VIRTIO_MODULES.builtIn, []);
});

Deno.test("a built-in name is reported and skipped; an unknown name is an error", async () => {
  const lines: string[] = [];
  const result = await fetchDebianModules(["crc32", "rng-core", "crc16"], {
    log: (l) => lines.push(l),
  });
  assert.ok(result.ok, result.ok ? "" : result.reason);
  assert.deepEqual(result.builtIn, ["crc32", "rng_core"]);
  assert.deepEqual(result.modules.map((m) => m.name), ["crc16"]);
  assert.deepEqual(lines, [], "everything came from the cache");

  await assert.rejects(
    () => fetchDebianModules(["virtio_blk", "no_such_module"]),
    isError("INVALID_ARGUMENT", /no kernel module "no_such_module" in linux-image-/),
  );
});

Deno.test("a second fetch downloads nothing; a lost module comes back from the kept package", async () => {
  const lines: string[] = [];
  const log = (l: string) => lines.push(l);
  const again = await fetchDebianModules(VIRTIO_MODULE_NAMES, { log });
  assert.ok(again.ok, again.ok ? "" : again.reason);
  assert.deepEqual(again.modules, modules());
  assert.deepEqual(lines, []);

  const crc16 = byName("crc16");
  const bytes = await Deno.readFile(crc16.path);
  await Deno.remove(crc16.path);
  const back = await fetchDebianModules(["crc16"], { log });
  assert.ok(back.ok, back.ok ? "" : back.reason);
  assert.deepEqual(await Deno.readFile(crc16.path), bytes);
  assert.equal(lines.length, 1, lines.join("\n"));
  assert.match(lines[0], /^extracting 1 modules from .*\.deb$/);
});

Deno.test("loadOrder: dependencies first, in the order asked; cycles and unknown names refused", () => {
  const graph = new Map<string, string[]>([
    ["app", ["net", "disk"]],
    ["net", ["core"]],
    ["disk", ["core", "crc"]],
    ["core", []],
    ["crc", []],
    ["loop_a", ["loop_b"]],
    ["loop_b", ["loop_a"]],
    ["broken", ["gone"]],
  ]);
  assert.deepEqual(loadOrder(graph, ["app"]), ["core", "net", "crc", "disk", "app"]);
  assert.deepEqual(loadOrder(graph, ["crc", "app", "core"]), ["crc", "core", "net", "disk", "app"]);
  assert.deepEqual(loadOrder(graph, []), []);
  assert.throws(
    () => loadOrder(graph, ["loop_a"]),
    isError("INVALID_ARGUMENT", /cycle: loop_a -> loop_b -> loop_a/),
  );
  assert.throws(
    () => loadOrder(graph, ["broken"]),
    isError("INVALID_ARGUMENT", /broken depends on gone, which does not exist/),
  );
  assert.throws(
    () => loadOrder(graph, ["nothing"]),
    isError("INVALID_ARGUMENT", /no module nothing/),
  );
  assert.equal(moduleName("kernel/drivers/char/hw_random/virtio-rng.ko"), "virtio_rng");
});

Deno.test("parseModinfo refuses what is not a module, whole", async () => {
  const ko = await Deno.readFile(byName("virtio_ring").path);
  assert.throws(
    () => parseModinfo(new TextEncoder().encode("#!/bin/sh\n")),
    isError("IMAGE", /not an ELF/),
  );
  assert.throws(() => parseModinfo(ko.slice(0, 4096)), isError("IMAGE", /outside the file/));
  const bigEndian = ko.slice();
  bigEndian[5] = 2;
  assert.throws(() => parseModinfo(bigEndian), isError("IMAGE", /little-endian ELF64/));
  const badNames = ko.slice();
  new DataView(badNames.buffer).setUint16(0x3e, 0xfff0, true); // e_shstrndx past the table
  assert.throws(() => parseModinfo(badNames), isError("IMAGE", /section name table/));
  // busybox is an ELF64 executable without .modinfo.
  const exe = await Deno.readFile(fetchedPath(busybox, "busybox-static"));
  assert.throws(() => parseModinfo(exe, "busybox"), isError("IMAGE", /busybox: no \.modinfo/));
  // A .modinfo without name= (the section's bytes overwritten in a copy).
  const noName = ko.slice();
  const section = elfSection(noName, ".modinfo");
  assert.ok(section);
  section.fill(0);
  section.set(new TextEncoder().encode("license=GPL\0depends=\0"));
  assert.throws(() => parseModinfo(noName), isError("IMAGE", /no name= in \.modinfo/));
});

/** The files of a newc archive, by name (the format `buildInitramfs` writes). */
function unpackNewc(archive: Uint8Array): Map<string, Uint8Array> {
  const files = new Map<string, Uint8Array>();
  const ascii = new TextDecoder("latin1");
  const align = (n: number) => (n + 3) & ~3;
  let at = 0;
  for (;;) {
    assert.equal(ascii.decode(archive.subarray(at, at + 6)), "070701", `newc magic at ${at}`);
    const field = (i: number) =>
      parseInt(ascii.decode(archive.subarray(at + 6 + i * 8, at + 14 + i * 8)), 16);
    const [size, nameSize] = [field(6), field(11)];
    const name = ascii.decode(archive.subarray(at + 110, at + 110 + nameSize - 1));
    const data = align(at + 110 + nameSize);
    if (name === "TRAILER!!!") return files;
    files.set(name, archive.subarray(data, data + size));
    at = align(data + size);
  }
}

Deno.test("busyboxInitramfs inserts the modules in order before the init lines", async () => {
  const archive = unpackNewc(await busyboxInitramfs(["echo READY"], { modules: modules() }));
  const script = new TextDecoder().decode(archive.get("init")).split("\n");
  const insmods = script.filter((l) => l.includes("insmod"));
  assert.deepEqual(
    insmods,
    modules().map((m) =>
      `/bin/busybox insmod /lib/modules/${m.name}.ko || echo "${INSMOD_FAILED} ${m.name} $?"`
    ),
  );
  assert.ok(script.indexOf("echo READY") > script.indexOf(insmods.at(-1)!));
  for (const m of modules()) {
    assert.deepEqual(archive.get(`lib/modules/${m.name}.ko`), await Deno.readFile(m.path), m.name);
  }

  // The call without modules is unchanged: no insmod, no /lib.
  const plain = unpackNewc(await busyboxInitramfs(["echo READY"]));
  assert.ok(!new TextDecoder().decode(plain.get("init")).includes("insmod"));
  assert.deepEqual([...plain.keys()].filter((n) => n.startsWith("lib")), []);
  assert.deepEqual([...archive.keys()].filter((n) => !n.startsWith("lib")), [...plain.keys()]);
});
