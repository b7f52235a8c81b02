//! What an initrd must look like for the kernel to accept it: an initramfs, that
//! is a `newc` cpio archive (magic `070701`, or `070702` with checksums) or one
//! compressed with a method the kernel can decompress (gzip, bzip2, lzma, xz,
//! lzo, lz4, zstd; see `lib/decompress.c`). The kernel skips NUL padding before
//! an archive, and so does this check.
//!
//! A corrupt initrd would otherwise surface late, as the kernel's own "Initramfs
//! unpacking failed" or a panic with no root. Checked by its magic, plus what is
//! cheap without decompressing: an uncompressed archive is walked header by
//! header to its `TRAILER!!!` (a truncated one is refused), an xz stream must end
//! with its footer magic, and each compressed format has a minimum size.

use thiserror::Error;

/// Why an initrd is not an initramfs the kernel accepts.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InitrdError {
    /// Nothing but NULs
    #[error("the initrd is not an initramfs the kernel accepts: its {0} bytes are all zero")]
    AllZero(usize),
    /// A compressed stream shorter than its format's minimum
    #[error("the initrd is not an initramfs the kernel accepts: a {format} stream of {len} bytes is truncated (at least {min})")]
    CompressedTruncated {
        /// The compression's name.
        format: &'static str,
        /// The stream's length.
        len: usize,
        /// Its format's smallest plausible size.
        min: usize,
    },
    /// A bzip2 stream with a bad block size
    #[error("the initrd is not an initramfs the kernel accepts: bad bzip2 block size")]
    Bzip2BlockSize,
    /// An xz stream without its footer
    #[error("the initrd is not an initramfs the kernel accepts: the xz stream is truncated (no footer magic at its end)")]
    XzFooter,
    /// Neither a newc archive nor a known compression
    #[error("the initrd is not an initramfs the kernel accepts: unknown magic {} at offset {offset} (expected a newc cpio archive \"070701\"/\"070702\", or gzip, bzip2, lzma, xz, lzo, lz4 or zstd)", hex_bytes(.magic))]
    UnknownMagic {
        /// Up to its first 6 bytes.
        magic: Vec<u8>,
        /// Where they start (after NUL padding).
        offset: usize,
    },
    /// A cpio header field is not hex digits
    #[error(
        "the initrd is not an initramfs the kernel accepts: a cpio header field is not hex: {0:?}"
    )]
    NotHex(Vec<u8>),
    /// A cpio header runs past the end
    #[error("the initrd is not an initramfs the kernel accepts: the cpio archive is truncated: a header at offset {offset} runs past the end ({len} bytes, no TRAILER!!!)")]
    HeaderTruncated {
        /// Where the header starts.
        offset: usize,
        /// The archive's length.
        len: usize,
    },
    /// A cpio header without its magic
    #[error(
        "the initrd is not an initramfs the kernel accepts: bad cpio header magic at offset {0}"
    )]
    HeaderMagic(usize),
    /// A cpio entry runs past the end
    #[error("the initrd is not an initramfs the kernel accepts: the cpio archive is truncated: the entry at offset {offset} needs {needs} bytes, the initrd has {len}")]
    EntryTruncated {
        /// Where the entry starts.
        offset: usize,
        /// The bytes it needs.
        needs: u64,
        /// The archive's length.
        len: usize,
    },
}

fn hex_bytes(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    shown.join(" ")
}

/// The result of checking an initrd.
pub type Result<T> = std::result::Result<T, InitrdError>;

/// A newc header: the 6-byte magic and 13 fields of 8 hex digits.
const NEWC_HEADER: usize = 110;
const NEWC_TRAILER: &[u8] = b"TRAILER!!!";

/// Compressed formats: (name, magic, smallest plausible size).
const COMPRESSED: &[(&str, &[u8], usize)] = &[
    ("gzip", &[0x1f, 0x8b], 18),
    ("gzip", &[0x1f, 0x9e], 18),
    ("bzip2", b"BZh", 14),
    ("lzma", &[0x5d, 0x00, 0x00], 13),
    ("xz", &[0xfd, b'7', b'z', b'X', b'Z', 0x00], 32),
    ("lzo", &[0x89, b'L', b'Z', b'O'], 9),
    ("lz4", &[0x02, 0x21, 0x4c, 0x18], 8),
    ("zstd", &[0x28, 0xb5, 0x2f, 0xfd], 9),
];

/// Checks an initrd (non-empty) and returns its format: `"cpio"` or the
/// compression's name.
pub fn check(initrd: &[u8]) -> Result<&'static str> {
    let start = initrd
        .iter()
        .position(|&b| b != 0)
        .ok_or(InitrdError::AllZero(initrd.len()))?;
    let data = &initrd[start..];
    if data.starts_with(b"070701") || data.starts_with(b"070702") {
        walk_newc(data)?;
        return Ok("cpio");
    }
    for &(name, magic, min) in COMPRESSED {
        if !data.starts_with(magic) {
            continue;
        }
        if data.len() < min {
            return Err(InitrdError::CompressedTruncated {
                format: name,
                len: data.len(),
                min,
            });
        }
        if name == "bzip2" && !(b'1'..=b'9').contains(&data[3]) {
            return Err(InitrdError::Bzip2BlockSize);
        }
        if name == "xz" {
            // Stream padding (NULs) may follow the footer, whose last bytes are "YZ".
            let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            if !data[..end].ends_with(b"YZ") {
                return Err(InitrdError::XzFooter);
            }
        }
        return Ok(name);
    }
    Err(InitrdError::UnknownMagic {
        magic: data.iter().take(6).copied().collect(),
        offset: start,
    })
}

fn hex_field(header: &[u8], index: usize) -> Result<u64> {
    let at = 6 + index * 8;
    let digits = &header[at..at + 8];
    let text = std::str::from_utf8(digits).ok();
    text.and_then(|t| u64::from_str_radix(t, 16).ok())
        .ok_or_else(|| InitrdError::NotHex(digits.to_vec()))
}

/// Walks a newc archive's entries up to `TRAILER!!!`; every header, name and
/// file body must lie inside `data`.
fn walk_newc(data: &[u8]) -> Result<()> {
    let mut at = 0usize;
    loop {
        let Some(header) = data.get(at..at + NEWC_HEADER) else {
            return Err(InitrdError::HeaderTruncated {
                offset: at,
                len: data.len(),
            });
        };
        if !(header.starts_with(b"070701") || header.starts_with(b"070702")) {
            return Err(InitrdError::HeaderMagic(at));
        }
        let filesize = hex_field(header, 6)?;
        let namesize = hex_field(header, 11)?;
        let name_end = (at as u64 + NEWC_HEADER as u64).saturating_add(namesize);
        let body = name_end.next_multiple_of(4);
        let next = body.saturating_add(filesize).next_multiple_of(4);
        if namesize == 0 || body.saturating_add(filesize) > data.len() as u64 {
            return Err(InitrdError::EntryTruncated {
                offset: at,
                needs: body.saturating_add(filesize),
                len: data.len(),
            });
        }
        // In bounds: name_end <= body <= data.len().
        let name = &data[at + NEWC_HEADER..name_end as usize];
        if name.strip_suffix(&[0]).unwrap_or(name) == NEWC_TRAILER {
            return Ok(());
        }
        at = next as usize;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A newc archive with one file and the trailer.
    pub fn tiny_cpio() -> Vec<u8> {
        fn entry(out: &mut Vec<u8>, name: &str, body: &[u8]) {
            let fields = [
                1,
                0o100644,
                0,
                0,
                1,
                0,
                body.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0,
            ];
            out.extend_from_slice(b"070701");
            for f in fields {
                out.extend_from_slice(format!("{f:08x}").as_bytes());
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
            out.extend_from_slice(body);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
        let mut out = Vec::new();
        entry(&mut out, "init", b"#!/bin/sh\necho hi\n");
        entry(&mut out, "TRAILER!!!", b"");
        out
    }

    #[test]
    fn accepts_cpio_and_compressed_initrds() {
        let cpio = tiny_cpio();
        assert_eq!(check(&cpio).unwrap(), "cpio");
        let mut padded = vec![0u8; 512];
        padded.extend_from_slice(&cpio);
        padded.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]); // a second archive
        assert_eq!(check(&padded).unwrap(), "cpio");
        let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        gz.extend_from_slice(&[0; 20]);
        assert_eq!(check(&gz).unwrap(), "gzip");
        let mut zst = vec![0x28, 0xb5, 0x2f, 0xfd];
        zst.extend_from_slice(&[0; 20]);
        assert_eq!(check(&zst).unwrap(), "zstd");
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.extend_from_slice(&[1; 40]);
        xz.extend_from_slice(b"YZ\0\0\0\0");
        assert_eq!(check(&xz).unwrap(), "xz");
        let mut bz = b"BZh9".to_vec();
        bz.extend_from_slice(&[1; 20]);
        assert_eq!(check(&bz).unwrap(), "bzip2");
    }

    #[test]
    fn refuses_truncated_and_corrupt_initrds() {
        let cpio = tiny_cpio();
        assert!(matches!(
            check(&cpio[..3]),
            Err(InitrdError::UnknownMagic { offset: 0, .. })
        ));
        for cut in [50, 110, 120, cpio.len() - 8] {
            let e = check(&cpio[..cut]).unwrap_err();
            assert!(
                matches!(
                    e,
                    InitrdError::HeaderTruncated { .. } | InitrdError::EntryTruncated { .. }
                ),
                "cut {cut}: {e}"
            );
        }
        assert_eq!(
            check(&cpio[..50]).unwrap_err(),
            InitrdError::HeaderTruncated { offset: 0, len: 50 }
        );
        let mut bad = cpio.clone();
        bad[60] = b'z'; // a filesize digit
        assert!(matches!(check(&bad), Err(InitrdError::NotHex(_))));
        let e = check(b"\x7fELF\x02\x01\x01").unwrap_err();
        assert_eq!(
            e,
            InitrdError::UnknownMagic {
                magic: b"\x7fELF\x02\x01".to_vec(),
                offset: 0
            }
        );
        assert!(
            e.to_string()
                .contains("unknown magic 7f 45 4c 46 02 01 at offset 0"),
            "{e}"
        );
        assert_eq!(check(&[0; 4096]).unwrap_err(), InitrdError::AllZero(4096));
        assert_eq!(
            check(&[0x1f, 0x8b, 8]).unwrap_err(),
            InitrdError::CompressedTruncated {
                format: "gzip",
                len: 3,
                min: 18
            }
        );
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
        xz.extend_from_slice(&[1; 40]);
        assert_eq!(check(&xz).unwrap_err(), InitrdError::XzFooter);
    }

    #[test]
    fn never_panics_on_mutated_archives() {
        let base = tiny_cpio();
        let mut rng = crate::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut img = base.clone();
            let x = rng.next_u64();
            let pos = (x as usize) % img.len();
            img[pos] = (x >> 32) as u8;
            let len = (x >> 40) as usize % (img.len() + 1);
            let _ = check(&img[..len]);
        }
    }
}
