//! Reading the mailbox page the guest runtime fills (see [`super::abi`]).
//! Everything in it is written by the guest, so every value is checked here
//! before the host acts on it: magic and version, the state, buffers inside
//! guest RAM and clear of the mailbox, lengths within their capacities, the
//! ENOSYS table within its size and the message NUL-bounded. Pure functions of
//! the page's bytes, unit-tested with hostile pages.

use thiserror::Error;

use super::abi::{self, mb, outcome, state, ENOSYS_MAX, MAILBOX_ADDR, MAILBOX_SIZE, MESSAGE_MAX};

/// The mailbox page as the host reads it.
pub type Page = [u8; MAILBOX_SIZE as usize];

/// How the guest broke the mailbox protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The magic is not "DVFN"
    #[error("mailbox magic is {0:#x}, not \"DVFN\"")]
    Magic(u32),
    /// Another ABI version
    #[error("mailbox ABI version is {0}, the host speaks {want}", want = abi::ABI_VERSION)]
    Version(u32),
    /// The state is not the one expected
    #[error("mailbox state is {got}, expected {want}")]
    State {
        /// The state expected.
        want: u32,
        /// The state found.
        got: u32,
    },
    /// A buffer outside guest RAM or over the mailbox
    #[error("the {name} buffer {addr:#x}..+{cap:#x} is outside guest RAM or overlaps the mailbox")]
    Buffer {
        /// Which buffer.
        name: &'static str,
        /// Its address.
        addr: u64,
        /// Its capacity.
        cap: u64,
    },
    /// A length beyond its capacity
    #[error("{name} length {len} exceeds its capacity {cap}")]
    Length {
        /// Which length.
        name: &'static str,
        /// The length claimed.
        len: u64,
        /// The capacity.
        cap: u64,
    },
    /// An outcome this ABI does not define
    #[error("mailbox outcome {0} is unknown")]
    Outcome(u32),
    /// More ENOSYS entries than the table holds
    #[error("mailbox ENOSYS count {0} exceeds {ENOSYS_MAX}")]
    Enosys(u32),
}

fn u32_at(page: &Page, off: u64) -> u32 {
    let o = off as usize;
    u32::from_le_bytes([page[o], page[o + 1], page[o + 2], page[o + 3]])
}

fn u64_at(page: &Page, off: u64) -> u64 {
    let o = off as usize;
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[o..o + 8]);
    u64::from_le_bytes(b)
}

/// The buffers the runtime set up at READY (checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// Where the host writes the input.
    pub input_addr: u64,
    /// The largest input.
    pub input_cap: u64,
    /// Where the program's stdout goes.
    pub stdout_addr: u64,
    /// Its capacity.
    pub stdout_cap: u64,
    /// Where the program's stderr goes.
    pub stderr_addr: u64,
    /// Its capacity.
    pub stderr_cap: u64,
}

/// What the runtime wrote at DONE (checked against the [`Ready`] buffers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// One of [`abi::outcome`].
    pub outcome: u32,
    /// The exit status (or the signal).
    pub exit_status: i64,
    /// Bytes of stdout, at most its capacity.
    pub stdout_len: u64,
    /// Bytes of stderr, at most its capacity.
    pub stderr_len: u64,
    /// Peak brk + mmap bytes.
    pub memory_used: u64,
    /// System calls served.
    pub syscalls: u64,
    /// `(nr, count)` of the calls answered -ENOSYS, at most [`ENOSYS_MAX`].
    pub enosys: Vec<(u32, u32)>,
    /// The runtime's message, up to its NUL (at most [`MESSAGE_MAX`] bytes).
    pub message: String,
}

fn header(page: &Page, want: u32) -> Result<(), ProtocolError> {
    let magic = u32_at(page, mb::MAGIC);
    if magic != abi::MAILBOX_MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let version = u32_at(page, mb::VERSION);
    if version != abi::ABI_VERSION {
        return Err(ProtocolError::Version(version));
    }
    let got = u32_at(page, mb::STATE);
    if got != want {
        return Err(ProtocolError::State { want, got });
    }
    Ok(())
}

/// The mailbox's state word (unchecked).
pub fn state_of(page: &Page) -> u32 {
    u32_at(page, mb::STATE)
}

/// Checks a READY mailbox: `in_ram(addr, len)` says whether a range is guest
/// RAM. Every buffer must be inside RAM and clear of the mailbox page.
pub fn parse_ready(page: &Page, in_ram: impl Fn(u64, u64) -> bool) -> Result<Ready, ProtocolError> {
    header(page, state::READY)?;
    let buffer = |name: &'static str, addr_off: u64, cap_off: u64| {
        let addr = u64_at(page, addr_off);
        let cap = u64_at(page, cap_off);
        let clear = addr
            .checked_add(cap)
            .is_some_and(|end| end <= MAILBOX_ADDR || addr >= MAILBOX_ADDR + MAILBOX_SIZE);
        if clear && in_ram(addr, cap) {
            Ok((addr, cap))
        } else {
            Err(ProtocolError::Buffer { name, addr, cap })
        }
    };
    let (input_addr, input_cap) = buffer("input", mb::INPUT_ADDR, mb::INPUT_CAP)?;
    let (stdout_addr, stdout_cap) = buffer("stdout", mb::STDOUT_ADDR, mb::STDOUT_CAP)?;
    let (stderr_addr, stderr_cap) = buffer("stderr", mb::STDERR_ADDR, mb::STDERR_CAP)?;
    Ok(Ready {
        input_addr,
        input_cap,
        stdout_addr,
        stdout_cap,
        stderr_addr,
        stderr_cap,
    })
}

/// The NUL-terminated message (lossy UTF-8; the whole field when it has no NUL).
pub fn message(page: &Page) -> String {
    let field = &page[mb::MESSAGE as usize..(mb::MESSAGE + MESSAGE_MAX) as usize];
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Checks a DONE mailbox against the buffers `ready` (from the checkpoint:
/// the addresses in the page now are not trusted again).
pub fn parse_done(page: &Page, ready: &Ready) -> Result<Done, ProtocolError> {
    header(page, state::DONE)?;
    let outcome = u32_at(page, mb::OUTCOME);
    if outcome > outcome::SIGNAL {
        return Err(ProtocolError::Outcome(outcome));
    }
    let length = |name: &'static str, off: u64, cap: u64| {
        let len = u64_at(page, off);
        if len <= cap {
            Ok(len)
        } else {
            Err(ProtocolError::Length { name, len, cap })
        }
    };
    let stdout_len = length("stdout", mb::STDOUT_LEN, ready.stdout_cap)?;
    let stderr_len = length("stderr", mb::STDERR_LEN, ready.stderr_cap)?;
    let count = u32_at(page, mb::ENOSYS_COUNT);
    if u64::from(count) > ENOSYS_MAX {
        return Err(ProtocolError::Enosys(count));
    }
    let enosys = (0..u64::from(count))
        .map(|i| {
            let at = mb::ENOSYS + i * 8;
            (u32_at(page, at), u32_at(page, at + 4))
        })
        .collect();
    Ok(Done {
        outcome,
        exit_status: u64_at(page, mb::EXIT_STATUS) as i64,
        stdout_len,
        stderr_len,
        memory_used: u64_at(page, mb::MEMORY_USED),
        syscalls: u64_at(page, mb::SYSCALLS),
        enosys,
        message: message(page),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 2 << 20;

    fn in_ram(addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= RAM)
    }

    fn put32(page: &mut Page, off: u64, v: u32) {
        page[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(page: &mut Page, off: u64, v: u64) {
        page[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn ready_page() -> Page {
        let mut p = [0u8; MAILBOX_SIZE as usize];
        put32(&mut p, mb::MAGIC, abi::MAILBOX_MAGIC);
        put32(&mut p, mb::VERSION, abi::ABI_VERSION);
        put32(&mut p, mb::STATE, state::READY);
        put64(&mut p, mb::INPUT_ADDR, 0x30000);
        put64(&mut p, mb::INPUT_CAP, 0x1000);
        put64(&mut p, mb::STDOUT_ADDR, 0x31000);
        put64(&mut p, mb::STDOUT_CAP, 0x2000);
        put64(&mut p, mb::STDERR_ADDR, 0x33000);
        put64(&mut p, mb::STDERR_CAP, 0x1000);
        p
    }

    fn done_page() -> (Page, Ready) {
        let mut p = ready_page();
        let ready = parse_ready(&p, in_ram).unwrap();
        put32(&mut p, mb::STATE, state::DONE);
        put64(&mut p, mb::STDOUT_LEN, 5);
        put64(&mut p, mb::EXIT_STATUS, (-3i64) as u64);
        put32(&mut p, mb::ENOSYS_COUNT, 1);
        put32(&mut p, mb::ENOSYS, 999);
        put32(&mut p, mb::ENOSYS + 4, 2);
        p[mb::MESSAGE as usize..mb::MESSAGE as usize + 3].copy_from_slice(b"hi\0");
        (p, ready)
    }

    #[test]
    fn a_ready_mailbox_gives_its_buffers() {
        let r = parse_ready(&ready_page(), in_ram).unwrap();
        assert_eq!((r.input_addr, r.input_cap), (0x30000, 0x1000));
        assert_eq!((r.stdout_addr, r.stdout_cap), (0x31000, 0x2000));
        assert_eq!((r.stderr_addr, r.stderr_cap), (0x33000, 0x1000));
    }

    #[test]
    fn hostile_ready_mailboxes_are_refused() {
        let mut p = ready_page();
        put32(&mut p, mb::MAGIC, 7);
        assert_eq!(parse_ready(&p, in_ram), Err(ProtocolError::Magic(7)));
        let mut p = ready_page();
        put32(&mut p, mb::VERSION, 99);
        assert_eq!(parse_ready(&p, in_ram), Err(ProtocolError::Version(99)));
        let mut p = ready_page();
        put32(&mut p, mb::STATE, state::DONE);
        assert!(matches!(
            parse_ready(&p, in_ram),
            Err(ProtocolError::State { .. })
        ));
        // Outside RAM, wrapping around, over the mailbox.
        for (addr, cap) in [
            (RAM - 0x800, 0x1000),
            (u64::MAX - 4, 0x10),
            (0x1f800, 0x1000),
        ] {
            let mut p = ready_page();
            put64(&mut p, mb::STDOUT_ADDR, addr);
            put64(&mut p, mb::STDOUT_CAP, cap);
            assert!(
                matches!(
                    parse_ready(&p, in_ram),
                    Err(ProtocolError::Buffer { name: "stdout", .. })
                ),
                "{addr:#x}+{cap:#x}"
            );
        }
    }

    #[test]
    fn a_done_mailbox_gives_its_results() {
        let (p, ready) = done_page();
        let d = parse_done(&p, &ready).unwrap();
        assert_eq!(d.stdout_len, 5);
        assert_eq!(d.exit_status, -3);
        assert_eq!(d.enosys, vec![(999, 2)]);
        assert_eq!(d.message, "hi");
    }

    #[test]
    fn hostile_done_mailboxes_are_refused() {
        let (mut p, ready) = done_page();
        put64(&mut p, mb::STDOUT_LEN, 0x2001);
        assert!(matches!(
            parse_done(&p, &ready),
            Err(ProtocolError::Length { name: "stdout", .. })
        ));
        let (mut p, ready) = done_page();
        put64(&mut p, mb::STDERR_LEN, u64::MAX);
        assert!(matches!(
            parse_done(&p, &ready),
            Err(ProtocolError::Length { name: "stderr", .. })
        ));
        let (mut p, ready) = done_page();
        put32(&mut p, mb::ENOSYS_COUNT, 65);
        assert_eq!(parse_done(&p, &ready), Err(ProtocolError::Enosys(65)));
        let (mut p, ready) = done_page();
        put32(&mut p, mb::OUTCOME, 77);
        assert_eq!(parse_done(&p, &ready), Err(ProtocolError::Outcome(77)));
        let (mut p, ready) = done_page();
        put32(&mut p, mb::STATE, state::READY);
        assert!(matches!(
            parse_done(&p, &ready),
            Err(ProtocolError::State { .. })
        ));
    }

    #[test]
    fn a_message_without_nul_is_bounded_by_its_field() {
        let (mut p, ready) = done_page();
        for b in &mut p[mb::MESSAGE as usize..] {
            *b = b'x';
        }
        let d = parse_done(&p, &ready).unwrap();
        assert_eq!(d.message.len(), MESSAGE_MAX as usize);
    }
}
