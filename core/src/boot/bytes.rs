//! Little-endian field readers for the boot image parsers (`bzimage`, `elf`).
//!
//! They index the slice directly, so they panic when the field runs past its end:
//! callers check the header's length before reading its fields.

/// The byte at `off`.
pub(crate) fn u8_at(b: &[u8], off: usize) -> u8 {
    b[off]
}

/// The little-endian `u16` at `off`.
pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// The little-endian `u32` at `off`.
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The little-endian `u64` at `off`.
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_fields_at_any_offset() {
        let b = [0xff, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xee];
        assert_eq!(u8_at(&b, 0), 0xff);
        assert_eq!(u16_at(&b, 1), 0x0201);
        assert_eq!(u32_at(&b, 1), 0x0403_0201);
        assert_eq!(u64_at(&b, 1), 0x0807_0605_0403_0201);
        assert_eq!(u64_at(&b, 2), 0xee08_0706_0504_0302);
    }

    #[test]
    #[should_panic]
    fn a_field_past_the_end_panics() {
        u32_at(&[1, 2, 3, 4], 1);
    }
}
