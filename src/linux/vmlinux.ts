/**
 * The uncompressed kernel (`vmlinux`, an ELF) inside a bzImage: its setup
 * header's `payload_offset` and `payload_length` locate the compressed payload,
 * whose magic names the compressor. Booting the ELF skips the decompressor,
 * which is what VMMs that boot `vmlinux` directly (Firecracker, kvmbox) gain.
 *
 * @module
 */

import { DenovisorError } from "../errors.ts";

/** Compressors of a bzImage payload, by magic, and the command that undoes each. */
const COMPRESSORS: readonly { name: string; magic: number[]; command: string[] }[] = [
  { name: "gzip", magic: [0x1f, 0x8b], command: ["gzip", "-dc"] },
  {
    name: "xz",
    magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
    command: ["xz", "-dc", "--single-stream"],
  },
  { name: "zstd", magic: [0x28, 0xb5, 0x2f, 0xfd], command: ["zstd", "-dc"] },
  { name: "lz4", magic: [0x02, 0x21, 0x4c, 0x18], command: ["lz4", "-dc"] },
  { name: "bzip2", magic: [0x42, 0x5a, 0x68], command: ["bzip2", "-dc"] },
  { name: "lzma", magic: [0x5d, 0x00, 0x00], command: ["xz", "-dc", "--format=lzma"] },
];

const ELF_MAGIC = [0x7f, 0x45, 0x4c, 0x46];

function startsWith(bytes: Uint8Array, magic: readonly number[]): boolean {
  return magic.every((b, i) => bytes[i] === b);
}

/**
 * Extracts the `vmlinux` ELF from a bzImage with the host's decompressor
 * (gzip, xz, zstd, lz4, bzip2: whichever the kernel was built with).
 *
 * @param bzImage The kernel image.
 * @returns The ELF.
 * @throws {DenovisorError} `IMAGE` when it is not a bzImage with a known
 *   payload, `IO` when the decompressor is missing or fails.
 * @example
 * ```ts ignore
 * import { extractVmlinux } from "denovisor/src/linux/vmlinux.ts";
 * const elf = await extractVmlinux(await Deno.readFile("vmlinuz"));
 * ```
 */
export async function extractVmlinux(bzImage: Uint8Array): Promise<Uint8Array> {
  const view = new DataView(bzImage.buffer, bzImage.byteOffset, bzImage.byteLength);
  if (bzImage.length < 0x250 || view.getUint32(0x202, true) !== 0x53726448) {
    throw new DenovisorError("IMAGE", "not a bzImage (no HdrS magic at 0x202)");
  }
  const setupSects = bzImage[0x1f1] || 4;
  const payloadOffset = view.getUint32(0x248, true);
  const payloadLength = view.getUint32(0x24c, true);
  const start = (setupSects + 1) * 512 + payloadOffset;
  if (payloadLength === 0 || start + payloadLength > bzImage.length) {
    throw new DenovisorError("IMAGE", "the bzImage's payload lies outside the file");
  }
  const payload = bzImage.subarray(start, start + payloadLength);
  if (startsWith(payload, ELF_MAGIC)) return payload.slice();
  const compressor = COMPRESSORS.find((c) => startsWith(payload, c.magic));
  if (!compressor) {
    throw new DenovisorError("IMAGE", "the bzImage's payload has no known compression magic");
  }
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(compressor.command[0], {
      args: compressor.command.slice(1),
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    throw new DenovisorError(
      "IO",
      `cannot run ${compressor.command[0]} to decompress the ${compressor.name} payload: ${e}`,
    );
  }
  const writer = child.stdin.getWriter();
  // Written concurrently with reading: the output is far larger than a pipe.
  const writing = writer.write(payload).then(() => writer.close()).catch(() => {});
  const output = await child.output();
  await writing;
  const elf = output.stdout;
  // Kernels append the uncompressed size after the stream; trailing bytes are fine.
  if (!startsWith(elf, ELF_MAGIC)) {
    const stderr = new TextDecoder().decode(output.stderr).trim();
    throw new DenovisorError(
      "IO",
      `${compressor.command.join(" ")} did not yield an ELF (status ${output.code}): ${stderr}`,
    );
  }
  return elf;
}
