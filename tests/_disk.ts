/**
 * Disk images for the Linux tests: the e2fsprogs helpers of
 * `src/linux/ext4_image.ts` (`mkfs.ext4 -d` to make an ext4 image, `debugfs`
 * to read files back out of one).
 *
 * @module
 */

export {
  debugfsCat,
  type DebugfsEntry,
  debugfsLs,
  type Ext4Entry,
  makeExt4Image,
} from "../src/linux/ext4_image.ts";
