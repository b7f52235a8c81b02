//! The snapshot directory: a `state` file and a `memory` file.
//!
//! `state` starts with [`MAGIC`] and [`FORMAT_VERSION`] (u32 LE) and a section
//! count (u32 LE), then the sections in the fixed order of [`SECTIONS`]: each
//! is a name length (u8), the name, a payload length (u64 LE), a CRC-64/XZ
//! (u64 LE) of name, length and payload, and the payload. Nothing follows the
//! last section. The payloads are JSON: `host` ([`HostCpu`]), `config` (the
//! caller's opaque JSON), `vm` ([`VmState`]), `devices` ([`DeviceStates`]),
//! `memory` ([`MemoryManifest`]).
//!
//! A full snapshot's `memory` is guest RAM byte for byte, its ranges
//! ([`ram_ranges`]) one after the other; all-zero 4 KiB pages are left as
//! holes of a sparse file. A diff snapshot's `memory` holds only the pages
//! written since its parent (the VM's previous snapshot), packed one after
//! another in RAM order; the `memory` section lists them as runs of page
//! numbers and names the parent (a path relative to the diff's directory and
//! the checksum of the parent's whole `state` file). Packed and not sparse at
//! their offsets: a page the guest zeroed must be told from one it did not
//! touch, which holes cannot say (and filesystems may report holes as data),
//! and the file's size is then exactly what changed on every filesystem and
//! through every copy tool. A restore reads a chain back to its full base
//! ([`read_chain`]), checks every link, then maps or reads the base and
//! writes each diff's pages over it, oldest first.
//!
//! A snapshot is read whole and checked — every section's checksum, the
//! version, the JSON of each section, the memory file's size — before any of
//! it is applied to a VM ([`Snapshot::read`]). The memory file's own checksum
//! is recorded too, but only an eager restore (which reads the file anyway)
//! verifies it: a lazy restore maps the file and checks its length and that
//! it is a regular file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::vm::VmState;
use super::SnapshotError;
use crate::devices::platform::DeviceStates;
use crate::dirty::DirtyBitmap;
use crate::memory::{ram_ranges, GuestRam};
use crate::vm::Vm;

/// The first bytes of a `state` file.
pub const MAGIC: [u8; 8] = *b"DVSNAP\r\n";
/// The format this code writes and reads (any other is refused).
pub const FORMAT_VERSION: u32 = 2;
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The sections of a state file, in their order.
pub const SECTIONS: [&str; 5] = ["host", "config", "vm", "devices", "memory"];
/// `dv_vm_create_from_snapshot` mode: guest RAM maps the memory file
/// copy-on-write ([`GuestRam::from_file`]).
pub const RESTORE_LAZY: u32 = 0;
/// `dv_vm_create_from_snapshot` mode: the memory file is read into anonymous
/// RAM and its checksum verified.
pub const RESTORE_EAGER: u32 = 1;
/// The longest chain of diffs a restore follows (a loop of parents ends
/// here too).
pub const MAX_CHAIN: usize = 64;
/// The largest state file read (the memory travels apart): a sanity bound.
const MAX_STATE_BYTES: u64 = 256 << 20;
const PAGE: usize = 4096;

/// CRC-64/XZ (the ECMA-182 polynomial, reflected, initial value and final
/// XOR all ones), table-driven, eight bytes at a time.
#[derive(Clone, Copy)]
pub struct Crc64(u64);

const CRC64_POLY: u64 = 0xc96c_5795_d787_0f42;

const fn crc64_tables() -> [[u64; 256]; 8] {
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC64_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC64_TABLES: [[u64; 256]; 8] = crc64_tables();

/// `m` (64 columns over GF(2)) applied to `v`.
fn gf2_apply(m: &[u64; 64], mut v: u64) -> u64 {
    let mut out = 0;
    let mut i = 0;
    while v != 0 {
        if v & 1 != 0 {
            out ^= m[i];
        }
        v >>= 1;
        i += 1;
    }
    out
}

impl Default for Crc64 {
    fn default() -> Self {
        Crc64(!0)
    }
}

impl Crc64 {
    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let t = &CRC64_TABLES;
        let mut c = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for b in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            let v = c ^ u64::from_le_bytes(word);
            c = t[7][(v & 0xff) as usize]
                ^ t[6][((v >> 8) & 0xff) as usize]
                ^ t[5][((v >> 16) & 0xff) as usize]
                ^ t[4][((v >> 24) & 0xff) as usize]
                ^ t[3][((v >> 32) & 0xff) as usize]
                ^ t[2][((v >> 40) & 0xff) as usize]
                ^ t[1][((v >> 48) & 0xff) as usize]
                ^ t[0][(v >> 56) as usize];
        }
        for &b in chunks.remainder() {
            c = (c >> 8) ^ t[0][((c ^ u64::from(b)) & 0xff) as usize];
        }
        self.0 = c;
    }

    /// Feeds `n` zero bytes without reading any: a zero byte is a linear map
    /// of the CRC register, so a page of them is one precomputed 64x64 bit
    /// matrix (squared up from one byte's, as zlib's `crc32_combine` does)
    /// applied in 64 XORs.
    pub fn update_zeros(&mut self, n: u64) {
        static ZERO_PAGE: OnceLock<[u64; 64]> = OnceLock::new();
        let page = ZERO_PAGE.get_or_init(|| {
            // Column i: the register after one zero byte from the basis vector 1 << i.
            let mut m = [0u64; 64];
            for (i, col) in m.iter_mut().enumerate() {
                let c = 1u64 << i;
                *col = (c >> 8) ^ CRC64_TABLES[0][(c & 0xff) as usize];
            }
            for _ in 0..PAGE.trailing_zeros() {
                let square: [u64; 64] = std::array::from_fn(|i| gf2_apply(&m, m[i]));
                m = square;
            }
            m
        });
        for _ in 0..n / PAGE as u64 {
            self.0 = gf2_apply(page, self.0);
        }
        self.update(&[0u8; PAGE][..(n % PAGE as u64) as usize]);
    }

    /// The checksum of everything fed.
    pub fn finish(self) -> u64 {
        !self.0
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut c = Crc64::default();
        c.update(bytes);
        c.finish()
    }
}

/// What the restoring host must match: the CPU the snapshot was taken on
/// (vendor, family/model/stepping) and the CPUID feature bits its guest was
/// given, which the new host's KVM must support.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostCpu {
    /// CPUID leaf 0's vendor string (`AuthenticAMD`, `GenuineIntel`).
    pub vendor: String,
    /// CPUID leaf 1's EAX: stepping, model, family (with their extensions).
    pub signature: u32,
    /// The guest's CPUID feature registers (see [`FEATURE_LEAVES`]).
    pub features: Vec<FeatureBits>,
}

/// One CPUID feature register the guest saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureBits {
    /// The leaf (EAX in).
    pub function: u32,
    /// The subleaf (ECX in).
    pub index: u32,
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// The bits set.
    pub bits: u32,
}

/// The CPUID registers that list features: `(leaf, subleaf, register, bits
/// that are not features but state)` — OSXSAVE and OSPKE follow the guest's
/// CR4, the hypervisor bit is KVM's own.
pub const FEATURE_LEAVES: [(u32, u32, &str, u32); 8] = [
    (1, 0, "ecx", (1 << 27) | (1 << 31)),
    (1, 0, "edx", 0),
    (7, 0, "ebx", 0),
    (7, 0, "ecx", 1 << 4),
    (7, 0, "edx", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 0),
    (0x8000_0001, 0, "edx", 0),
];

fn register(e: &kvm_bindings::kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

fn find_entry(
    entries: &[kvm_bindings::kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&kvm_bindings::kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .or_else(|| {
            entries.iter().find(|e| {
                e.function == function
                    && e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0
            })
        })
}

/// The feature registers of `entries` (a guest's CPUID).
pub fn feature_bits(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<FeatureBits> {
    FEATURE_LEAVES
        .iter()
        .filter_map(|&(function, index, reg, ignored)| {
            find_entry(entries, function, index).map(|e| FeatureBits {
                function,
                index,
                register: reg.to_string(),
                bits: register(e, reg) & !ignored,
            })
        })
        .collect()
}

/// This host's CPU vendor and signature (CPUID leaves 0 and 1).
pub fn host_cpu_identity() -> (String, u32) {
    // CPUID is available on every x86-64 CPU and only reads.
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let mut vendor = Vec::with_capacity(12);
    for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    (String::from_utf8_lossy(&vendor).into_owned(), leaf1.eax)
}

/// Family, model and stepping of a CPUID signature, as Intel and AMD define
/// them (the extended fields count when the base family is 0xf, or 6 for the
/// model on Intel).
pub fn decode_signature(sig: u32) -> (u32, u32, u32) {
    let stepping = sig & 0xf;
    let base_model = (sig >> 4) & 0xf;
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((sig >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0xf || base_family == 6 {
        base_model | (((sig >> 16) & 0xf) << 4)
    } else {
        base_model
    };
    (family, model, stepping)
}

impl HostCpu {
    /// Why this snapshot's host does not match the current one (`vendor`,
    /// `signature`, and the features `supported` lacks), empty when it does.
    pub fn mismatches(
        &self,
        vendor: &str,
        signature: u32,
        supported: &[kvm_bindings::kvm_cpuid_entry2],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if self.vendor != vendor {
            problems.push(format!(
                "the snapshot's CPU vendor is {:?}, this host's {vendor:?}",
                self.vendor
            ));
        }
        if self.signature != signature {
            let (f, m, s) = decode_signature(self.signature);
            let (hf, hm, hs) = decode_signature(signature);
            problems.push(format!(
                "the snapshot's CPU is family {f:#x} model {m:#x} stepping {s}, this host's family {hf:#x} model {hm:#x} stepping {hs}"
            ));
        }
        for want in &self.features {
            let have = find_entry(supported, want.function, want.index)
                .map(|e| register(e, &want.register))
                .unwrap_or(0);
            let missing = want.bits & !have;
            if missing != 0 {
                problems.push(format!(
                    "CPUID {:#x}.{} {} bits {missing:#010x} the guest was given are not supported here",
                    want.function, want.index, want.register
                ));
            }
        }
        problems
    }

    /// Checks this snapshot's host against the current one: vendor and
    /// signature from CPUID, features against KVM's supported CPUID.
    pub fn check_current(&self) -> Result<(), SnapshotError> {
        let (vendor, signature) = host_cpu_identity();
        let supported = crate::vm::supported_cpuid()
            .map_err(|e| SnapshotError::refused("host", format!("cannot read KVM's CPUID: {e}")))?;
        let problems = self.mismatches(&vendor, signature, &supported);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::WrongHost(problems.join("; ")))
        }
    }
}

/// The `memory` section: where guest RAM is and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryManifest {
    /// Guest RAM in bytes.
    pub size: u64,
    /// The guest-physical ranges `[start, length]`, in file order.
    pub ranges: Vec<(u64, u64)>,
    /// The memory file's name in the snapshot directory.
    pub file: String,
    /// Its length in bytes (the RAM size).
    pub length: u64,
    /// Its CRC-64/XZ as 16 hex digits (JSON numbers lose 64-bit precision).
    pub crc64: String,
    /// `full` (the memory file is all of RAM) or `diff` (only `pages`).
    pub kind: String,
    /// A diff's parent snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// A diff's pages, as runs `[first page, pages]` of 4 KiB page numbers in
    /// RAM order (the memory file holds them packed, in this order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<(u64, u64)>>,
}

/// The snapshot a diff was taken against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// Its directory, relative to the diff's.
    pub dir: String,
    /// The CRC-64/XZ of its whole `state` file, 16 hex digits: a parent
    /// replaced by another snapshot is refused.
    pub state_crc64: String,
}

/// One snapshot, by where it is and what its `state` file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotId {
    /// Its directory, canonical.
    pub dir: PathBuf,
    /// The CRC-64/XZ of its whole `state` file.
    pub state_crc64: u64,
}

/// What a diff snapshot of a VM is taken against: the pages dirtied since
/// then are exactly what the diff holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DiffBase {
    /// Nothing: no snapshot yet, tracking off, or the dirty set was taken or
    /// restarted since the last snapshot.
    #[default]
    None,
    /// The VM was restored from this snapshot and has not run; starting
    /// dirty-page tracking now makes it the base.
    Restored(SnapshotId),
    /// Tracking has run since this snapshot was written (or restored).
    Tracking(SnapshotId),
}

/// A snapshot read and checked: every section parsed.
pub struct Snapshot {
    /// The host it was taken on.
    pub host: HostCpu,
    /// The caller's configuration (JSON text).
    pub config: String,
    /// KVM's state.
    pub vm: VmState,
    /// The devices' state.
    pub devices: DeviceStates,
    /// Where the memory is.
    pub memory: MemoryManifest,
    /// Each section's name, offset of its payload and length, for inspection.
    pub layout: Vec<(String, u64, u64, u64)>,
    /// The CRC-64/XZ of the whole state file (what a diff's parent names).
    pub state_crc64: u64,
}

fn invalid(section: &str, message: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid {
        section: section.to_string(),
        message: message.into(),
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Encodes the sections (in [`SECTIONS`] order) into a state file's bytes.
pub fn encode_state(sections: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (name, payload) in sections {
        let head_start = out.len();
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut crc = Crc64::default();
        crc.update(&out[head_start..]);
        crc.update(payload);
        out.extend_from_slice(&crc.finish().to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// One section of a decoded state file: its name, the offset of its payload
/// in the file, the payload and its recorded CRC.
pub type Section<'a> = (&'static str, u64, &'a [u8], u64);

/// Decodes and verifies a state file's bytes: magic, version, and every
/// section of [`SECTIONS`] in order with its checksum.
pub fn decode_state(bytes: &[u8]) -> Result<Vec<Section<'_>>, SnapshotError> {
    if bytes.len() < 16 {
        return Err(invalid(
            "header",
            format!("truncated: {} bytes, a header has 16", bytes.len()),
        ));
    }
    if bytes[..8] != MAGIC {
        return Err(invalid("header", "not a denovisor snapshot (bad magic)"));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(invalid(
            "header",
            format!("format version {version}; this denovisor reads version {FORMAT_VERSION}"),
        ));
    }
    let count = word(12);
    if count as usize != SECTIONS.len() {
        return Err(invalid(
            "header",
            format!(
                "{count} sections where format {FORMAT_VERSION} has {}",
                SECTIONS.len()
            ),
        ));
    }
    let mut at = 16usize;
    let mut out = Vec::with_capacity(SECTIONS.len());
    for name in SECTIONS {
        let rest = &bytes[at..];
        let Some(&name_len) = rest.first() else {
            return Err(invalid(
                name,
                "missing: the file ends before it (truncated)",
            ));
        };
        let head_len = 1 + name_len as usize + 16;
        if rest.len() < head_len {
            return Err(invalid(name, "truncated inside its header"));
        }
        let found = &rest[1..1 + name_len as usize];
        if found != name.as_bytes() {
            return Err(invalid(
                name,
                format!(
                    "missing: the section here is named {:?}",
                    String::from_utf8_lossy(found)
                ),
            ));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&rest[1 + name_len as usize..9 + name_len as usize]);
        let len = u64::from_le_bytes(len_bytes);
        let mut crc_bytes = [0u8; 8];
        crc_bytes.copy_from_slice(&rest[9 + name_len as usize..head_len]);
        let want = u64::from_le_bytes(crc_bytes);
        let available = (rest.len() - head_len) as u64;
        if len > available {
            return Err(invalid(
                name,
                format!("truncated: {len} bytes announced, {available} left in the file"),
            ));
        }
        let payload = &rest[head_len..head_len + len as usize];
        let mut crc = Crc64::default();
        crc.update(&rest[..9 + name_len as usize]);
        crc.update(payload);
        let got = crc.finish();
        if got != want {
            return Err(invalid(
                name,
                format!("corrupted: checksum {got:016x}, recorded {want:016x}"),
            ));
        }
        out.push((name, (at + head_len) as u64, payload, want));
        at += head_len + len as usize;
    }
    if at != bytes.len() {
        return Err(invalid(
            "memory",
            format!(
                "{} unexpected bytes after the last section",
                bytes.len() - at
            ),
        ));
    }
    Ok(out)
}

fn parse<T: serde::de::DeserializeOwned>(section: &str, bytes: &[u8]) -> Result<T, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|e| invalid(section, format!("malformed: {e}")))
}

impl Snapshot {
    /// Parses and checks a state file's bytes (see [`decode_state`]) and the
    /// consistency of its sections; the memory file is not looked at.
    pub fn parse(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let sections = decode_state(bytes)?;
        let payload = |i: usize| sections[i].2;
        let host: HostCpu = parse("host", payload(0))?;
        let config = std::str::from_utf8(payload(1))
            .map_err(|_| invalid("config", "malformed: not UTF-8"))?
            .to_string();
        serde_json::from_str::<serde_json::Value>(&config)
            .map_err(|e| invalid("config", format!("malformed: {e}")))?;
        let vm: VmState = parse("vm", payload(2))?;
        let devices: DeviceStates = parse("devices", payload(3))?;
        let memory: MemoryManifest = parse("memory", payload(4))?;
        if memory.size != vm.memory_bytes {
            return Err(invalid(
                "memory",
                format!(
                    "{} bytes of RAM, the vm section has {}",
                    memory.size, vm.memory_bytes
                ),
            ));
        }
        GuestRam::check_size(memory.size).map_err(|e| invalid("memory", e.to_string()))?;
        memory.check_kind()?;
        if memory.ranges != ram_ranges(memory.size) {
            return Err(invalid("memory", "the RAM ranges are not this size's"));
        }
        if memory.file != MEMORY_FILE {
            return Err(invalid(
                "memory",
                format!(
                    "the memory file must be {MEMORY_FILE:?}, not {:?}",
                    memory.file
                ),
            ));
        }
        if memory.crc64.len() != 16 || u64::from_str_radix(&memory.crc64, 16).is_err() {
            return Err(invalid("memory", "the checksum is not 16 hex digits"));
        }
        let layout = sections
            .iter()
            .map(|(n, off, p, crc)| (n.to_string(), *off, p.len() as u64, *crc))
            .collect();
        Ok(Snapshot {
            host,
            config,
            vm,
            devices,
            memory,
            layout,
            state_crc64: Crc64::of(bytes),
        })
    }

    /// Reads and checks `dir/state` and that `dir/memory` is a regular file
    /// of the recorded length; for a diff, the same of every link of its
    /// chain back to the full base ([`read_chain`]).
    pub fn read(dir: &Path) -> Result<Chain, SnapshotError> {
        read_chain(dir)
    }

    /// [`Snapshot::read`] of this directory alone (its parent unread).
    pub fn read_link(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let bytes = read_state_bytes(&dir.join(STATE_FILE))?;
        let snapshot = Snapshot::parse(&bytes)?;
        snapshot.open_memory(dir)?;
        Ok(snapshot)
    }

    /// Opens the memory file and checks it is a regular file of the recorded
    /// length.
    pub fn open_memory(&self, dir: &Path) -> Result<File, SnapshotError> {
        let path = dir.join(&self.memory.file);
        let file =
            File::open(&path).map_err(|e| invalid("memory", format!("{}: {e}", path.display())))?;
        let meta = file.metadata().map_err(io(&path, "stat"))?;
        if !meta.is_file() {
            return Err(invalid("memory", "the memory file is not a regular file"));
        }
        if meta.len() != self.memory.length {
            return Err(invalid(
                "memory",
                format!(
                    "the memory file holds {} bytes, the snapshot recorded {}",
                    meta.len(),
                    self.memory.length
                ),
            ));
        }
        Ok(file)
    }

    /// Guest RAM for a VM restoring this snapshot: `lazy` maps the (base's)
    /// memory file copy-on-write ([`GuestRam::from_file`]); otherwise it is
    /// read into anonymous RAM and its checksum verified. A diff's chain is
    /// read and checked whole — every link's state, every diff's memory
    /// file and its checksum — before the base is mapped and the diffs'
    /// pages are written over it, oldest first.
    pub fn guest_ram(&self, dir: &Path, lazy: bool) -> Result<GuestRam, SnapshotError> {
        if self.memory.parent.is_none() {
            return self.base_ram(dir, lazy);
        }
        let chain = read_chain(dir)?;
        let chain = chain.links();
        for link in &chain[..chain.len() - 1] {
            link.check_diff_file()?;
        }
        let base = &chain[chain.len() - 1];
        let ram = base.snapshot.base_ram(&base.dir, lazy)?;
        for link in chain[..chain.len() - 1].iter().rev() {
            link.apply_diff(&ram)?;
        }
        Ok(ram)
    }

    fn base_ram(&self, dir: &Path, lazy: bool) -> Result<GuestRam, SnapshotError> {
        let file = self.open_memory(dir)?;
        let mem_err = |e: crate::memory::MemoryError| invalid("memory", e.to_string());
        if lazy {
            return GuestRam::from_file(self.memory.size, file).map_err(mem_err);
        }
        let ram = GuestRam::new(self.memory.size).map_err(mem_err)?;
        let path = dir.join(&self.memory.file);
        let mut crc = Crc64::default();
        let mut offset = 0u64;
        for (_, ptr, len) in ram.host_regions() {
            // SAFETY: `ptr..ptr + len` is one region of `ram`'s own fresh
            // anonymous mapping, alive while `ram` is and not yet given to KVM
            // or any other thread: nothing else reads or writes it meanwhile.
            let host = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            // Only the file's data is read: its holes are zero pages, which
            // fresh anonymous RAM already is; the checksum covers them without
            // reading them (`Crc64::update_zeros`).
            let mut at = 0usize;
            for (start, end) in
                data_extents(&file, offset, len as u64).map_err(io(&path, "seek"))?
            {
                let (start, end) = ((start - offset) as usize, (end - offset) as usize);
                crc.update_zeros((start - at) as u64);
                file.read_exact_at(&mut host[start..end], offset + start as u64)
                    .map_err(io(&path, "read"))?;
                crc.update(&host[start..end]);
                at = end;
            }
            crc.update_zeros((len - at) as u64);
            offset += len as u64;
        }
        let got = format!("{:016x}", crc.finish());
        if got != self.memory.crc64 {
            return Err(invalid(
                "memory",
                format!(
                    "the memory file is corrupted: checksum {got}, recorded {}",
                    self.memory.crc64
                ),
            ));
        }
        Ok(ram)
    }

    /// Applies the VM and device state to `vm`, built from this snapshot's
    /// RAM and config (the same vCPU count, irqchip and devices): the shape
    /// is checked first, then KVM's state and the devices are restored.
    pub fn apply(&self, vm: &Vm) -> Result<(), SnapshotError> {
        if vm.ram().size() != self.memory.size {
            return Err(SnapshotError::refused(
                "vm",
                format!(
                    "the snapshot has {} bytes of RAM, the VM {}",
                    self.memory.size,
                    vm.ram().size()
                ),
            ));
        }
        if vm.vcpu_count() != self.vm.vcpus.len() {
            return Err(SnapshotError::refused(
                "vm",
                format!(
                    "the snapshot has {} vCPUs, the VM {}",
                    self.vm.vcpus.len(),
                    vm.vcpu_count()
                ),
            ));
        }
        if vm.has_irqchip() != self.vm.irqchip.is_some() {
            return Err(SnapshotError::refused(
                "vm",
                "the VM and the snapshot differ in the in-kernel irqchip",
            ));
        }
        // KVM's state first, the devices after: a restored virtio device
        // starts its queues and is kicked once, and what it then serves (a
        // frame the new TAP already holds, a TX chain posted before the
        // snapshot) raises its MSI at once. Raised before the vCPUs' local
        // APICs are written, that interrupt was lost with the IRR that
        // `KVM_SET_LAPIC` overwrote, and with EVENT_IDX the device does not
        // raise another until the driver moves `used_event`, which it only
        // does after an interrupt: the restored guest's virtio-net RX queue
        // stayed silent forever.
        self.vm.restore(vm)?;
        vm.restore_device_states(&self.devices)
            .map_err(|e| SnapshotError::refused("devices", e.to_string()))
    }
}

impl MemoryManifest {
    /// A full manifest's fields agree with its size; a diff's name a parent
    /// and list sorted, disjoint runs of pages inside RAM that the file's
    /// length counts.
    fn check_kind(&self) -> Result<(), SnapshotError> {
        match (self.kind.as_str(), &self.parent, &self.pages) {
            ("full", None, None) => {
                if self.length != self.size {
                    return Err(invalid(
                        "memory",
                        format!(
                            "a full memory file of {} bytes for {} bytes of RAM",
                            self.length, self.size
                        ),
                    ));
                }
                Ok(())
            }
            ("diff", Some(parent), Some(runs)) => {
                if parent.dir.is_empty() || parent.dir.contains('\0') {
                    return Err(invalid("memory", "the parent's directory is empty"));
                }
                if parent.state_crc64.len() != 16
                    || u64::from_str_radix(&parent.state_crc64, 16).is_err()
                {
                    return Err(invalid(
                        "memory",
                        "the parent's checksum is not 16 hex digits",
                    ));
                }
                let total = self.size / PAGE as u64;
                let mut next = 0u64;
                let mut count = 0u64;
                for &(first, pages) in runs {
                    let end = first.saturating_add(pages);
                    if pages == 0 || first < next || end > total {
                        return Err(invalid(
                            "memory",
                            format!(
                                "the page run [{first}, {pages}] is empty, out of order or outside {total} pages"
                            ),
                        ));
                    }
                    next = end;
                    count += pages;
                }
                if self.length != count * PAGE as u64 {
                    return Err(invalid(
                        "memory",
                        format!(
                            "a diff of {count} pages in a memory file of {} bytes",
                            self.length
                        ),
                    ));
                }
                Ok(())
            }
            (kind, ..) => Err(invalid(
                "memory",
                format!("kind {kind:?} with the fields of neither a full snapshot nor a diff"),
            )),
        }
    }

    /// A diff's pages as a bitmap over RAM.
    fn page_bitmap(&self) -> DirtyBitmap {
        let mut bitmap = DirtyBitmap::new(&ram_ranges(self.size));
        for &(first, pages) in self.pages.as_deref().unwrap_or_default() {
            for page in first..first + pages {
                bitmap.set(page);
            }
        }
        bitmap
    }
}

/// Runs `[first, pages]` of the pages set in `bitmap`.
fn page_runs(bitmap: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for page in bitmap.iter() {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == page => *n += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// One snapshot of a chain, read and checked.
pub struct Link {
    /// Its directory, canonical.
    pub dir: PathBuf,
    /// What its state file holds.
    pub snapshot: Snapshot,
}

impl Link {
    /// Reads this diff's memory file whole and checks its checksum.
    fn check_diff_file(&self) -> Result<(), SnapshotError> {
        let file = self.snapshot.open_memory(&self.dir)?;
        let path = self.dir.join(&self.snapshot.memory.file);
        let mut crc = Crc64::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.snapshot.memory.length {
            let n = (self.snapshot.memory.length - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(io(&path, "read"))?;
            crc.update(&buf[..n]);
            at += n as u64;
        }
        let got = format!("{:016x}", crc.finish());
        if got != self.snapshot.memory.crc64 {
            return Err(invalid(
                "memory",
                format!(
                    "the diff memory file {} is corrupted: checksum {got}, recorded {}",
                    path.display(),
                    self.snapshot.memory.crc64
                ),
            ));
        }
        Ok(())
    }

    /// Writes this diff's pages into `ram`.
    fn apply_diff(&self, ram: &GuestRam) -> Result<(), SnapshotError> {
        let file = self.snapshot.open_memory(&self.dir)?;
        let path = self.dir.join(&self.snapshot.memory.file);
        let mut page = [0u8; PAGE];
        for (i, addr) in self.snapshot.memory.page_bitmap().addresses().enumerate() {
            file.read_exact_at(&mut page, i as u64 * PAGE as u64)
                .map_err(io(&path, "read"))?;
            ram.write(addr, &page)
                .map_err(|e| invalid("memory", e.to_string()))?;
        }
        Ok(())
    }
}

/// The data extents of `file` within `[offset, offset + len)`, as absolute
/// `(start, end)` byte ranges in order, found with `SEEK_DATA`/`SEEK_HOLE`;
/// the rest of the range is holes (reads as zeros). A file system without
/// them answers the whole range as data.
fn data_extents(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = offset + len;
    let seek = |at: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a descriptor this `File` owns and keeps open; it
        // only moves the file offset, which nothing here relies on (reads use
        // pread).
        let got = unsafe { libc::lseek(fd, at, whence) };
        if got >= 0 {
            return Ok(Some(got as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(s)) if s < end => s,
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(at, end)]),
            Err(e) => return Err(e),
        };
        let stop = seek(start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((start, stop));
        at = stop;
    }
    Ok(out)
}

fn crc_hex(crc: u64) -> String {
    format!("{crc:016x}")
}

/// A snapshot chain as [`read_chain`] answers it: newest first; it derefs to
/// the newest link's [`Snapshot`].
#[derive(Clone)]
pub struct Chain(Arc<Vec<Link>>);

impl std::ops::Deref for Chain {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0[0].snapshot
    }
}

impl Chain {
    /// Its links, newest first (one for a full snapshot).
    pub fn links(&self) -> &[Link] {
        &self.0
    }
}

/// The bytes of the state file at `path`, refused beyond [`MAX_STATE_BYTES`].
fn read_state_bytes(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let mut file = File::open(path).map_err(io(path, "open"))?;
    let meta = file.metadata().map_err(io(path, "stat"))?;
    if !meta.is_file() {
        return Err(invalid("header", "the state is not a regular file"));
    }
    if meta.len() > MAX_STATE_BYTES {
        return Err(invalid(
            "header",
            format!("{} bytes is more than a state file holds", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    Read::by_ref(&mut file)
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path, "read"))?;
    Ok(bytes)
}

/// Whether `link`'s files are still what it was read from: its state file's
/// CRC-64 the same (the parse is what changes nothing else), its memory file
/// a regular file of the recorded length (all an uncached read checks of it).
fn still_current(link: &Link) -> bool {
    let Ok(bytes) = read_state_bytes(&link.dir.join(STATE_FILE)) else {
        return false;
    };
    Crc64::of(&bytes) == link.snapshot.state_crc64 && link.snapshot.open_memory(&link.dir).is_ok()
}

/// The chain read last: a restore inspects, creates and applies one snapshot
/// in three calls, and each would otherwise parse every state file again. A
/// hit reads each state file and compares its checksum ([`still_current`]).
static LAST_CHAIN: Mutex<Option<(PathBuf, Chain)>> = Mutex::new(None);

/// Reads the snapshot in `dir` and, for a diff, its parents back to the full
/// base: every link's state file and memory file size checked, each parent's
/// state file the one the diff was taken against, the same RAM in all.
/// Newest first. Refusals about a parent name it. The chain read last is
/// answered again while its files are unchanged (see [`LAST_CHAIN`]).
pub fn read_chain(dir: &Path) -> Result<Chain, SnapshotError> {
    let top = fs::canonicalize(dir).map_err(io(dir, "open the snapshot directory"))?;
    let mut last = LAST_CHAIN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((cached_dir, chain)) = last.as_ref() {
        let links = chain.links();
        let parents_same = links.windows(2).all(|pair| {
            pair[0].snapshot.memory.parent.as_ref().is_some_and(|p| {
                fs::canonicalize(pair[0].dir.join(&p.dir)).is_ok_and(|d| d == pair[1].dir)
            })
        });
        if *cached_dir == top && parents_same && links.iter().all(still_current) {
            return Ok(chain.clone());
        }
    }
    let chain = Chain(Arc::new(read_links(top.clone())?));
    *last = Some((top, chain.clone()));
    Ok(chain)
}

fn read_links(mut dir: PathBuf) -> Result<Vec<Link>, SnapshotError> {
    let mut snapshot = Snapshot::read_link(&dir)?;
    let mut chain = Vec::new();
    while let Some(parent) = snapshot.memory.parent.clone() {
        if chain.len() + 1 >= MAX_CHAIN {
            return Err(invalid(
                "parent",
                format!("a chain of more than {MAX_CHAIN} snapshots (a loop?)"),
            ));
        }
        let named = dir.join(&parent.dir);
        let name = format!("{} ({})", parent.dir, named.display());
        let parent_dir = fs::canonicalize(&named)
            .map_err(|e| invalid("parent", format!("{name} is missing: {e}")))?;
        let parent_snapshot = Snapshot::read_link(&parent_dir)
            .map_err(|e| invalid("parent", format!("{name} is not a valid snapshot: {e}")))?;
        if crc_hex(parent_snapshot.state_crc64) != parent.state_crc64 {
            return Err(invalid(
                "parent",
                format!(
                    "{name} was replaced: its state checksum is {}, the diff in {} was taken against {}",
                    crc_hex(parent_snapshot.state_crc64),
                    dir.display(),
                    parent.state_crc64
                ),
            ));
        }
        if parent_snapshot.memory.size != snapshot.memory.size {
            return Err(invalid(
                "parent",
                format!(
                    "{name} has {} bytes of RAM, its diff {}",
                    parent_snapshot.memory.size, snapshot.memory.size
                ),
            ));
        }
        chain.push(Link { dir, snapshot });
        dir = parent_dir;
        snapshot = parent_snapshot;
    }
    chain.push(Link { dir, snapshot });
    Ok(chain)
}

/// `to` relative to `from` (both absolute and canonical).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// Where `dir` (which need not exist) is, canonically.
fn canonical_target(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let name = dir.file_name().ok_or_else(|| {
        SnapshotError::refused("snapshot", format!("{} has no name", dir.display()))
    })?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(fs::canonicalize(parent)
        .map_err(io(parent, "open the directory"))?
        .join(name))
}

/// How a snapshot was written.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteStats {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of guest RAM (the memory file's length).
    pub memory_bytes: u64,
    /// Bytes actually written to the memory file (the rest are holes).
    pub memory_written: u64,
    /// Milliseconds spent writing the memory file.
    pub memory_ms: f64,
    /// `full` or `diff`.
    pub kind: String,
    /// A diff's pages (4 KiB each), none for a full snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff_pages: Option<u64>,
}

/// Writes guest RAM into `file` in RAM-range order, leaving all-zero pages as
/// holes, and returns its checksum and the bytes written. The VM must be
/// paused (nothing may change RAM meanwhile).
pub fn write_memory(ram: &GuestRam, file: &File) -> std::io::Result<(u64, u64)> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let mut crc = Crc64::default();
    let mut offset = 0u64;
    let mut written = 0u64;
    for (_, ptr, len) in ram.host_regions() {
        // SAFETY: `ptr..ptr + len` is one region of `ram`'s live mapping; the
        // caller guarantees the VM is paused, so no vCPU writes it meanwhile
        // (device threads of a paused VM are quiesced by the pause).
        let host = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let mut run_start: Option<usize> = None;
        let mut at = 0usize;
        while at < len {
            let end = (at + PAGE).min(len);
            let page = &host[at..end];
            let zero = page == &ZERO[..page.len()];
            if zero {
                crc.update_zeros(page.len() as u64);
            } else {
                crc.update(page);
            }
            match (zero, run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(s)) => {
                    file.write_all_at(&host[s..at], offset + s as u64)?;
                    written += (at - s) as u64;
                    run_start = None;
                }
                _ => {}
            }
            at = end;
        }
        if let Some(s) = run_start {
            file.write_all_at(&host[s..len], offset + s as u64)?;
            written += (len - s) as u64;
        }
        offset += len as u64;
    }
    file.set_len(offset)?;
    Ok((crc.finish(), written))
}

/// Writes a snapshot of the paused `vm` into the directory `dir`, which must
/// not exist or be empty: everything goes into a temporary directory beside
/// it first, renamed into place only once complete, so a failed snapshot
/// never leaves a valid-looking one behind.
///
/// With `parent`, a diff: only the pages dirtied since `parent`, which must
/// be this VM's last snapshot (or the one it was restored from) with
/// dirty-page tracking on ever since. With tracking on, every snapshot
/// takes the dirty set, so the next diff starts at it.
pub fn write_snapshot(
    vm: &Vm,
    dir: &Path,
    config: &str,
    parent: Option<&Path>,
) -> Result<WriteStats, SnapshotError> {
    serde_json::from_str::<serde_json::Value>(config)
        .map_err(|e| SnapshotError::refused("config", format!("not JSON: {e}")))?;
    let state = VmState::capture(vm)?;
    let devices = vm.device_states();
    let host = host_of(&state);
    if let Ok(meta) = fs::symlink_metadata(dir) {
        let empty = meta.is_dir()
            && fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty {
            return Err(SnapshotError::refused(
                "snapshot",
                format!("{} exists and is not an empty directory", dir.display()),
            ));
        }
    }
    let target = canonical_target(dir)?;
    let parent = match parent {
        None => None,
        Some(p) => Some(diff_parent(vm, p, &target)?),
    };
    let tracking = vm.is_dirty_logging();
    let dirty = if tracking {
        // Paused: the set taken is every page written since the base.
        Some(
            vm.take_dirty_log()
                .map_err(|e| SnapshotError::refused("memory", e.to_string()))?,
        )
    } else {
        None
    };
    // The set is taken: until this snapshot is in place nothing is a base.
    vm.set_diff_base(DiffBase::None);
    let diff = match (parent, &dirty) {
        (Some(parent), Some(pages)) => Some((parent, pages)),
        _ => None,
    };
    let tmp = temp_dir_beside(dir)?;
    let result = write_into(vm, &tmp, &host, config, &state, &devices, diff);
    let result = result.and_then(|(stats, state_crc64)| {
        fs::rename(&tmp, dir).map_err(io(dir, "rename the finished snapshot into place"))?;
        Ok((stats, state_crc64))
    });
    match result {
        Ok((stats, state_crc64)) => {
            if tracking {
                vm.set_diff_base(DiffBase::Tracking(SnapshotId {
                    dir: target,
                    state_crc64,
                }));
            }
            Ok(stats)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Checks that `parent` is what a diff of `vm` is taken against and names
/// it relative to the diff's directory `target`.
fn diff_parent(vm: &Vm, parent: &Path, target: &Path) -> Result<ParentRef, SnapshotError> {
    let base = match vm.diff_base() {
        DiffBase::Tracking(id) => id,
        _ if !vm.is_dirty_logging() => {
            return Err(SnapshotError::refused(
                "parent",
                "dirty-page tracking is off: start it before the snapshot a diff is taken against",
            ))
        }
        _ => {
            return Err(SnapshotError::refused(
                "parent",
                "no snapshot was taken (or restored and tracked) since dirty-page tracking started or its pages were taken: take a full snapshot",
            ))
        }
    };
    let dir = fs::canonicalize(parent).map_err(|e| {
        SnapshotError::refused("parent", format!("{} is missing: {e}", parent.display()))
    })?;
    let snapshot = Snapshot::read_link(&dir).map_err(|e| {
        SnapshotError::refused(
            "parent",
            format!("{} is not a valid snapshot: {e}", parent.display()),
        )
    })?;
    if dir != base.dir || snapshot.state_crc64 != base.state_crc64 {
        return Err(SnapshotError::refused(
            "parent",
            format!(
                "{} is not this VM's last snapshot ({})",
                parent.display(),
                base.dir.display()
            ),
        ));
    }
    Ok(ParentRef {
        dir: relative_path(target, &dir).to_string_lossy().into_owned(),
        state_crc64: crc_hex(snapshot.state_crc64),
    })
}

/// The `host` section for a VM's captured state: this host's CPU and the
/// CPUID feature registers its guest was given.
pub fn host_of(state: &VmState) -> HostCpu {
    let (vendor, signature) = host_cpu_identity();
    let guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2> = state
        .vcpus
        .first()
        .map(|v| v.cpuid.iter().map(|e| e.0).collect())
        .unwrap_or_default();
    HostCpu {
        vendor,
        signature,
        features: feature_bits(&guest_cpuid),
    }
}

/// A state file's bytes for the paused `vm` without a memory file: what a
/// live migration sends once guest RAM has moved. The `memory` section
/// describes the RAM (its checksum field is all zeros: the pages went with
/// their own frames); [`apply_state_bytes`] reads it back.
pub fn encode_vm_state(vm: &Vm, config: &str) -> Result<Vec<u8>, SnapshotError> {
    serde_json::from_str::<serde_json::Value>(config)
        .map_err(|e| SnapshotError::refused("config", format!("not JSON: {e}")))?;
    let state = VmState::capture(vm)?;
    let devices = vm.device_states();
    let host = host_of(&state);
    let size = vm.ram().size();
    let manifest = MemoryManifest {
        size,
        ranges: ram_ranges(size),
        file: MEMORY_FILE.to_string(),
        length: size,
        crc64: "0".repeat(16),
        kind: "full".into(),
        parent: None,
        pages: None,
    };
    let host_json = to_json(&host);
    let vm_json = state.to_json().into_bytes();
    let devices_json = to_json(&devices);
    let memory_json = to_json(&manifest);
    Ok(encode_state(&[
        ("host", &host_json),
        ("config", config.as_bytes()),
        ("vm", &vm_json),
        ("devices", &devices_json),
        ("memory", &memory_json),
    ]))
}

/// Verifies state bytes from [`encode_vm_state`] whole (every section's
/// checksum and contents, this host against the `host` section, the VM's
/// shape) before applying any of it to `vm`, whose RAM already holds the
/// guest's pages.
pub fn apply_state_bytes(vm: &Vm, bytes: &[u8]) -> Result<(), SnapshotError> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(invalid("header", "more bytes than a state file holds"));
    }
    let snapshot = Snapshot::parse(bytes)?;
    snapshot.host.check_current()?;
    snapshot.apply(vm)
}

fn temp_dir_beside(dir: &Path) -> Result<PathBuf, SnapshotError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dir.file_name().ok_or_else(|| {
        SnapshotError::refused("snapshot", format!("{} has no name", dir.display()))
    })?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&tmp).map_err(io(&tmp, "create the temporary directory"))?;
    Ok(tmp)
}

/// Writes the pages of `pages` from `ram` into `file`, packed in RAM order;
/// returns the checksum and the pages written. The VM must be paused.
pub fn write_diff_memory(
    ram: &GuestRam,
    pages: &DirtyBitmap,
    file: &File,
) -> std::io::Result<(u64, u64)> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut crc = Crc64::default();
    let mut page = [0u8; PAGE];
    let mut n = 0u64;
    for addr in pages.addresses() {
        ram.read(addr, &mut page)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        crc.update(&page);
        out.write_all(&page)?;
        n += 1;
    }
    out.flush()?;
    Ok((crc.finish(), n))
}

fn write_into(
    vm: &Vm,
    tmp: &Path,
    host: &HostCpu,
    config: &str,
    state: &VmState,
    devices: &serde_json::Value,
    diff: Option<(ParentRef, &DirtyBitmap)>,
) -> Result<(WriteStats, u64), SnapshotError> {
    let mem_path = tmp.join(MEMORY_FILE);
    let mem_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&mem_path)
        .map_err(io(&mem_path, "create"))?;
    let started = std::time::Instant::now();
    let size = vm.ram().size();
    let (written, manifest) = match diff {
        None => {
            let (crc, written) =
                write_memory(vm.ram(), &mem_file).map_err(io(&mem_path, "write"))?;
            let manifest = MemoryManifest {
                size,
                ranges: ram_ranges(size),
                file: MEMORY_FILE.to_string(),
                length: size,
                crc64: crc_hex(crc),
                kind: "full".into(),
                parent: None,
                pages: None,
            };
            (written, manifest)
        }
        Some((parent, pages)) => {
            let (crc, n) =
                write_diff_memory(vm.ram(), pages, &mem_file).map_err(io(&mem_path, "write"))?;
            let manifest = MemoryManifest {
                size,
                ranges: ram_ranges(size),
                file: MEMORY_FILE.to_string(),
                length: n * PAGE as u64,
                crc64: crc_hex(crc),
                kind: "diff".into(),
                parent: Some(parent),
                pages: Some(page_runs(pages)),
            };
            (n * PAGE as u64, manifest)
        }
    };
    mem_file.sync_all().map_err(io(&mem_path, "sync"))?;
    let memory_ms = started.elapsed().as_secs_f64() * 1000.0;
    let host_json = to_json(host);
    let vm_json = state.to_json().into_bytes();
    let devices_json = to_json(devices);
    let memory_json = to_json(&manifest);
    let bytes = encode_state(&[
        ("host", &host_json),
        ("config", config.as_bytes()),
        ("vm", &vm_json),
        ("devices", &devices_json),
        ("memory", &memory_json),
    ]);
    let state_path = tmp.join(STATE_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&state_path)
        .map_err(io(&state_path, "create"))?;
    f.write_all(&bytes).map_err(io(&state_path, "write"))?;
    f.sync_all().map_err(io(&state_path, "sync"))?;
    let diff_pages = manifest.pages.as_ref().map(|_| written / PAGE as u64);
    Ok((
        WriteStats {
            state_bytes: bytes.len() as u64,
            memory_bytes: size,
            memory_written: written,
            memory_ms,
            kind: manifest.kind.clone(),
            diff_pages,
        },
        Crc64::of(&bytes),
    ))
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data with string keys: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// What `inspect` reports about a snapshot directory: everything checked
/// without a VM, and whether this host can restore it.
pub fn inspect(dir: &Path) -> Result<serde_json::Value, SnapshotError> {
    let s = Snapshot::read(dir)?;
    let (vendor, signature) = host_cpu_identity();
    let host_check = match crate::vm::supported_cpuid() {
        Ok(supported) => {
            let problems = s.host.mismatches(&vendor, signature, &supported);
            serde_json::json!({ "ok": problems.is_empty(), "problems": problems })
        }
        Err(e) => {
            serde_json::json!({ "ok": false, "problems": [format!("cannot read KVM's CPUID: {e}")] })
        }
    };
    let (f, m, st) = decode_signature(s.host.signature);
    let config: serde_json::Value = serde_json::from_str(&s.config).unwrap_or_default();
    Ok(serde_json::json!({
        "format": { "magic": String::from_utf8_lossy(&MAGIC[..6]), "version": FORMAT_VERSION },
        "sections": s.layout.iter().map(|(n, off, len, crc)| serde_json::json!({
            "name": n, "offset": off, "length": len, "crc64": format!("{crc:016x}"),
        })).collect::<Vec<_>>(),
        "host": {
            "vendor": s.host.vendor, "family": f, "model": m, "stepping": st,
            "features": s.host.features,
        },
        "hostCheck": host_check,
        "config": config,
        "vcpus": s.vm.vcpus.len(),
        "irqchip": s.vm.irqchip.is_some(),
        "memory": s.memory,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vcpu::exit::UnhandledAccess;
    use crate::vm::VmShared;
    use kvm_bindings::kvm_cpuid_entry2;

    const MIB: u64 = 1 << 20;

    fn temp_dir(tag: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dv-snapfile-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn host() -> HostCpu {
        HostCpu {
            vendor: "AuthenticAMD".into(),
            signature: 0x00a2_0f12,
            features: vec![FeatureBits {
                function: 1,
                index: 0,
                register: "ecx".into(),
                bits: 0x0000_0201,
            }],
        }
    }

    fn sections(size: u64) -> Vec<(&'static str, Vec<u8>)> {
        let vm = VmState {
            memory_bytes: size,
            irqchip: None,
            pit: None,
            clock: Default::default(),
            vcpus: Vec::new(),
        };
        let shared = VmShared::new(GuestRam::new(size).unwrap(), UnhandledAccess::Ignore).unwrap();
        let memory = MemoryManifest {
            size,
            ranges: ram_ranges(size),
            file: MEMORY_FILE.into(),
            length: size,
            crc64: format!("{:016x}", 0x1234u64),
            kind: "full".into(),
            parent: None,
            pages: None,
        };
        vec![
            ("host", to_json(&host())),
            ("config", br#"{"memoryMiB":1,"vcpus":1}"#.to_vec()),
            ("vm", vm.to_json().into_bytes()),
            ("devices", to_json(&shared.device_states())),
            ("memory", to_json(&memory)),
        ]
    }

    fn encoded(size: u64) -> Vec<u8> {
        let s = sections(size);
        let refs: Vec<(&str, &[u8])> = s.iter().map(|(n, p)| (*n, p.as_slice())).collect();
        encode_state(&refs)
    }

    /// The section a refusal names and its message.
    fn refusal(bytes: &[u8]) -> (String, String) {
        match Snapshot::parse(bytes) {
            Ok(_) => panic!("a damaged state file was accepted"),
            Err(SnapshotError::Invalid { section, message }) => (section, message),
            Err(e) => panic!("not an Invalid refusal: {e}"),
        }
    }

    #[test]
    fn a_state_file_round_trips_with_every_section() {
        let bytes = encoded(MIB);
        let s = Snapshot::parse(&bytes).unwrap();
        assert_eq!(s.host, host());
        assert_eq!(s.config, r#"{"memoryMiB":1,"vcpus":1}"#);
        assert_eq!(s.vm.memory_bytes, MIB);
        assert_eq!(s.memory.ranges, vec![(0, MIB)]);
        let names: Vec<&str> = s.layout.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(names, SECTIONS);
        // The layout's offsets and lengths point at each payload.
        for ((_, off, len, _), (_, payload)) in s.layout.iter().zip(sections(MIB)) {
            assert_eq!(
                &bytes[*off as usize..(*off + *len) as usize],
                payload.as_slice()
            );
        }
    }

    #[test]
    fn a_corrupted_byte_in_any_section_is_refused_naming_that_section() {
        let bytes = encoded(MIB);
        let layout = Snapshot::parse(&bytes).unwrap().layout;
        for (name, off, len, _) in &layout {
            // The first, middle and last byte of the payload, and the
            // section's own length field and checksum.
            for at in [*off, *off + *len / 2, *off + *len - 1, *off - 16, *off - 1] {
                let mut bad = bytes.clone();
                bad[at as usize] ^= 0x20;
                let (section, message) = refusal(&bad);
                // A damaged length may read as a truncation.
                assert_eq!(&section, name, "byte {at}: {message}");
                assert!(
                    message.contains("corrupted") || message.contains("truncated"),
                    "byte {at} of {name}: {message}"
                );
            }
            // A damaged name: the section is missing where it belongs.
            let mut bad = bytes.clone();
            let name_at = *off as usize - 16 - name.len();
            bad[name_at] ^= 0x01;
            let (section, message) = refusal(&bad);
            assert_eq!(&section, name, "{message}");
            assert!(message.contains("missing"), "{message}");
        }
    }

    #[test]
    fn a_file_truncated_at_every_section_boundary_or_inside_one_is_refused_naming_it() {
        let bytes = encoded(MIB);
        let layout = Snapshot::parse(&bytes).unwrap().layout;
        for (i, (name, off, len, _)) in layout.iter().enumerate() {
            let head = *off as usize - 17 - name.len();
            // The file ends right before this section: it is missing.
            let (section, message) = refusal(&bytes[..head]);
            assert_eq!(&section, name, "cut at {head}: {message}");
            assert!(message.contains("missing"), "{message}");
            // Inside its header, and inside its payload.
            for cut in [head + 3, (*off + *len / 2) as usize] {
                let (section, message) = refusal(&bytes[..cut]);
                assert_eq!(&section, name, "cut at {cut}: {message}");
                assert!(message.contains("truncated"), "{message}");
            }
            if i == layout.len() - 1 {
                // Every section present: the file is whole.
                assert_eq!((*off + *len) as usize, bytes.len());
            }
        }
        for cut in [0, 7, 15] {
            assert_eq!(refusal(&bytes[..cut]).0, "header");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(refusal(&longer).1.contains("unexpected bytes"));
    }

    #[test]
    fn another_magic_or_format_version_or_section_count_is_refused_in_the_header() {
        let bytes = encoded(MIB);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(refusal(&bad).1.contains("bad magic"));
        let mut bad = bytes.clone();
        bad[8] = 1;
        let (section, message) = refusal(&bad);
        assert_eq!(section, "header");
        assert!(message.contains("format version 1"), "{message}");
        let mut bad = bytes.clone();
        bad[12] = 4;
        assert!(refusal(&bad).1.contains("4 sections"));
    }

    #[test]
    fn sections_that_check_but_do_not_parse_or_agree_are_refused_naming_them() {
        for (victim, payload) in [
            ("host", b"{}".to_vec()),
            ("config", b"not json".to_vec()),
            ("vm", b"{\"memoryBytes\":1}".to_vec()),
            ("devices", b"[]".to_vec()),
            ("memory", b"{\"size\":1}".to_vec()),
        ] {
            let mut s = sections(MIB);
            for (name, p) in s.iter_mut() {
                if *name == victim {
                    *p = payload.clone();
                }
            }
            let refs: Vec<(&str, &[u8])> = s.iter().map(|(n, p)| (*n, p.as_slice())).collect();
            let (section, message) = refusal(&encode_state(&refs));
            assert_eq!(section, victim, "{message}");
            assert!(message.contains("malformed"), "{message}");
        }
        // A memory section for another RAM size than the vm section's.
        let mut s = sections(MIB);
        let other = sections(2 * MIB);
        s[4].1 = other[4].1.clone();
        let refs: Vec<(&str, &[u8])> = s.iter().map(|(n, p)| (*n, p.as_slice())).collect();
        assert_eq!(refusal(&encode_state(&refs)).0, "memory");
    }

    fn cpuid(function: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn another_vendor_model_or_missing_feature_is_the_wrong_host() {
        let h = host();
        let supported = [cpuid(1, 0xffff_ffff)];
        assert!(h
            .mismatches("AuthenticAMD", h.signature, &supported)
            .is_empty());
        let p = h.mismatches("GenuineIntel", h.signature, &supported);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("vendor"), "{p:?}");
        let p = h.mismatches("AuthenticAMD", 0x00a2_0f10, &supported);
        assert!(p[0].contains("family 0x19 model 0x21 stepping 2"), "{p:?}");
        let p = h.mismatches("AuthenticAMD", h.signature, &[cpuid(1, 0x1)]);
        assert!(p[0].contains("0x00000200"), "{p:?}");
        let p = h.mismatches("AuthenticAMD", h.signature, &[]);
        assert!(p[0].contains("not supported"), "{p:?}");
    }

    #[test]
    fn feature_bits_leave_out_state_bits() {
        let entries = [cpuid(1, (1 << 27) | (1 << 31) | 1)];
        let bits = feature_bits(&entries);
        assert_eq!(bits[0].bits, 1);
        assert_eq!(bits.len(), 2, "ecx and edx of leaf 1: {bits:?}");
    }

    fn patterned_ram(size: u64) -> GuestRam {
        let ram = GuestRam::new(size).unwrap();
        // Every fourth page holds its number + 1, the rest are zero; the last
        // page too, so the file ends in data and not in a hole.
        let last = size / 4096 - 1;
        for page in (0..size / 4096).step_by(4).chain([last]) {
            ram.write(page * 4096 + 8, &(page + 1).to_le_bytes())
                .unwrap();
        }
        ram
    }

    fn snapshot_for(ram: &GuestRam, crc: u64) -> Snapshot {
        let mut s = Snapshot::parse(&encoded(ram.size())).unwrap();
        s.memory.crc64 = format!("{crc:016x}");
        s
    }

    fn same_bytes(a: &GuestRam, b: &GuestRam) -> bool {
        let mut x = vec![0u8; a.size() as usize];
        let mut y = vec![0u8; b.size() as usize];
        a.read(0, &mut x).unwrap();
        b.read(0, &mut y).unwrap();
        x == y
    }

    #[test]
    fn memory_is_written_sparse_and_restores_lazily_and_eagerly() {
        let size = 4 * MIB;
        let ram = patterned_ram(size);
        let dir = temp_dir("memory");
        let file = File::create(dir.join(MEMORY_FILE)).unwrap();
        let (crc, written) = write_memory(&ram, &file).unwrap();
        drop(file);
        assert_eq!(
            written,
            size / 4 + 4096,
            "only the non-zero pages are written"
        );
        let meta = fs::metadata(dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(meta.len(), size);
        let bytes = fs::read(dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(Crc64::of(&bytes), crc);
        let s = snapshot_for(&ram, crc);
        let eager = s.guest_ram(&dir, false).unwrap();
        assert!(same_bytes(&ram, &eager));
        let lazy = s.guest_ram(&dir, true).unwrap();
        assert!(lazy.is_file_backed());
        assert!(same_bytes(&ram, &lazy));
        // Writes are private: the file and a second mapping keep the bytes.
        lazy.write(8, &[0xee; 8]).unwrap();
        let other = s.guest_ram(&dir, true).unwrap();
        assert!(same_bytes(&ram, &other));
        assert_eq!(fs::read(dir.join(MEMORY_FILE)).unwrap(), bytes);
        // zero() reads back zeros; discard() reverts to the file's bytes.
        lazy.zero(0, 4096).unwrap();
        let mut b = [0xffu8; 16];
        lazy.read(0, &mut b).unwrap();
        assert_eq!(b, [0; 16]);
        lazy.discard(0, 4096).unwrap();
        lazy.read(0, &mut b).unwrap();
        assert_eq!(&b[8..], &1u64.to_le_bytes(), "page 0 is the file's again");
        lazy.write(4 * 4096 + 8, &[0xaa; 8]).unwrap();
        lazy.discard(4 * 4096, 4096).unwrap();
        lazy.read(4 * 4096, &mut b).unwrap();
        assert_eq!(&b[8..], &5u64.to_le_bytes(), "the file's page is back");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupted_or_resized_memory_file_is_refused() {
        let ram = patterned_ram(MIB);
        let dir = temp_dir("corrupt");
        let path = dir.join(MEMORY_FILE);
        let (crc, _) = write_memory(&ram, &File::create(&path).unwrap()).unwrap();
        let s = snapshot_for(&ram, crc);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1], 4096 * 3 + 100).unwrap();
        match s.guest_ram(&dir, false) {
            Err(SnapshotError::Invalid { section, message }) => {
                assert_eq!(section, "memory");
                assert!(message.contains("corrupted"), "{message}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a corrupted memory file was read"),
        }
        // Lazy restore cannot see a changed byte (documented), but a changed
        // length is refused by both.
        assert!(s.guest_ram(&dir, true).is_ok());
        f.set_len(MIB - 4096).unwrap();
        for lazy in [true, false] {
            match s.guest_ram(&dir, lazy) {
                Err(SnapshotError::Invalid { section, message }) => {
                    assert_eq!(section, "memory");
                    assert!(message.contains("holds"), "{message}");
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a short memory file was mapped"),
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_large_ram_skips_the_mmio_gap_in_file_order() {
        // Above 3.25 GiB RAM comes in two ranges; mapping is cheap (sparse).
        let size = crate::memory::MMIO_GAP_START + 2 * MIB;
        let dir = temp_dir("gap");
        let path = dir.join(MEMORY_FILE);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"above", crate::memory::MMIO_GAP_START)
            .unwrap();
        drop(f);
        let ram = GuestRam::from_file(size, File::open(&path).unwrap()).unwrap();
        let mut b = [0u8; 5];
        ram.read(crate::memory::MMIO_GAP_END, &mut b).unwrap();
        assert_eq!(&b, b"above");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Writes a snapshot directory of `ram` without a VM: a full one, or a
    /// diff of `pages` against `parent` (a directory and its state's
    /// checksum). Returns the state file's checksum.
    fn write_link(dir: &Path, ram: &GuestRam, parent: Option<(&str, u64, &DirtyBitmap)>) -> u64 {
        fs::create_dir_all(dir).unwrap();
        let file = File::create(dir.join(MEMORY_FILE)).unwrap();
        let size = ram.size();
        let memory = match parent {
            None => {
                let (crc, _) = write_memory(ram, &file).unwrap();
                MemoryManifest {
                    size,
                    ranges: ram_ranges(size),
                    file: MEMORY_FILE.into(),
                    length: size,
                    crc64: crc_hex(crc),
                    kind: "full".into(),
                    parent: None,
                    pages: None,
                }
            }
            Some((rel, state_crc, pages)) => {
                let (crc, n) = write_diff_memory(ram, pages, &file).unwrap();
                MemoryManifest {
                    size,
                    ranges: ram_ranges(size),
                    file: MEMORY_FILE.into(),
                    length: n * 4096,
                    crc64: crc_hex(crc),
                    kind: "diff".into(),
                    parent: Some(ParentRef {
                        dir: rel.into(),
                        state_crc64: crc_hex(state_crc),
                    }),
                    pages: Some(page_runs(pages)),
                }
            }
        };
        let mut s = sections(size);
        s[4].1 = to_json(&memory);
        let refs: Vec<(&str, &[u8])> = s.iter().map(|(n, p)| (*n, p.as_slice())).collect();
        let bytes = encode_state(&refs);
        fs::write(dir.join(STATE_FILE), &bytes).unwrap();
        Crc64::of(&bytes)
    }

    /// Writes `value` into `pages` of `ram` and returns them as a bitmap.
    fn touch(ram: &GuestRam, pages: &[u64], value: u8) -> DirtyBitmap {
        let mut bitmap = DirtyBitmap::new(&ram_ranges(ram.size()));
        for &p in pages {
            ram.write(p * 4096, &[value; 4096]).unwrap();
            bitmap.set(p);
        }
        bitmap
    }

    /// A full -> diff -> diff chain under `root` (`base`, `d1`, `d2`) of a
    /// RAM whose last diff zeroes a page; returns the final RAM.
    fn chain(root: &Path) -> GuestRam {
        let ram = patterned_ram(MIB);
        let base_crc = write_link(&root.join("base"), &ram, None);
        let p1 = touch(&ram, &[1, 2, 3, 200], 0x11);
        let d1_crc = write_link(&root.join("d1"), &ram, Some(("../base", base_crc, &p1)));
        // Page 4 held data in the base: zeroed now, which a diff must carry.
        let p2 = touch(&ram, &[2, 4, 255], 0);
        write_link(&root.join("d2"), &ram, Some(("../d1", d1_crc, &p2)));
        ram
    }

    fn parent_refusal(dir: &Path) -> String {
        match Snapshot::read(dir) {
            Err(SnapshotError::Invalid { section, message }) => {
                assert_eq!(section, "parent", "{message}");
                message
            }
            Err(e) => panic!("not an Invalid refusal: {e}"),
            Ok(_) => panic!("a broken chain was accepted"),
        }
    }

    #[test]
    fn a_diff_chain_restores_lazily_and_eagerly_to_the_last_links_memory() {
        let root = temp_dir("chain");
        let ram = chain(&root);
        let d2 = root.join("d2");
        let s = Snapshot::read(&d2).unwrap();
        assert_eq!(s.memory.kind, "diff");
        assert_eq!(s.memory.pages, Some(vec![(2, 1), (4, 1), (255, 1)]));
        // Packed: the diff file holds exactly the pages that changed.
        assert_eq!(fs::metadata(d2.join(MEMORY_FILE)).unwrap().len(), 3 * 4096);
        assert_eq!(read_chain(&d2).unwrap().links().len(), 3);
        for lazy in [true, false] {
            let restored = s.guest_ram(&d2, lazy).unwrap();
            assert_eq!(restored.is_file_backed(), lazy);
            assert!(same_bytes(&ram, &restored), "lazy {lazy}");
        }
        // The middle link restores to its own memory, not the last one's.
        let mid = Snapshot::read(&root.join("d1")).unwrap();
        let restored = mid.guest_ram(&root.join("d1"), true).unwrap();
        let mut b = [0u8; 4];
        restored.read(4 * 4096 + 8, &mut b).unwrap();
        assert_eq!(b, 5u32.to_le_bytes(), "page 4 is still the base's in d1");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_broken_or_replaced_parent_is_refused_naming_it() {
        let root = temp_dir("parents");
        chain(&root);
        let d2 = root.join("d2");
        // Replaced: another snapshot (of other bytes) where d1 was.
        fs::rename(root.join("d1"), root.join("d1.orig")).unwrap();
        let other = patterned_ram(MIB);
        other.write(0, b"other").unwrap();
        write_link(&root.join("d1"), &other, None);
        let m = parent_refusal(&d2);
        assert!(m.contains("../d1") && m.contains("was replaced"), "{m}");
        fs::remove_dir_all(root.join("d1")).unwrap();
        // Missing.
        let m = parent_refusal(&d2);
        assert!(m.contains("../d1") && m.contains("missing"), "{m}");
        fs::rename(root.join("d1.orig"), root.join("d1")).unwrap();
        assert!(Snapshot::read(&d2).is_ok());
        // Broken further up: the base's state corrupted, named by d1's link.
        let state = root.join("base").join(STATE_FILE);
        let good = fs::read(&state).unwrap();
        let mut bad = good.clone();
        let at = bad.len() - 3;
        bad[at] ^= 1;
        fs::write(&state, &bad).unwrap();
        let m = parent_refusal(&d2);
        assert!(m.contains("../base") && m.contains("corrupted"), "{m}");
        // The base's memory file gone.
        fs::write(&state, &good).unwrap();
        fs::remove_file(root.join("base").join(MEMORY_FILE)).unwrap();
        let m = parent_refusal(&d2);
        assert!(m.contains("../base") && m.contains("memory"), "{m}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_snapshot_changed_in_place_after_a_read_is_read_afresh() {
        let root = temp_dir("reread");
        chain(&root);
        let d2 = root.join("d2");
        assert_eq!(Snapshot::read(&d2).unwrap().memory.kind, "diff");
        // The same size, within the file system's timestamp granularity: only
        // the bytes tell the state apart from the one read just now.
        let state = d2.join(STATE_FILE);
        let mut bytes = fs::read(&state).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 1;
        fs::write(&state, &bytes).unwrap();
        assert!(matches!(
            Snapshot::read(&d2),
            Err(SnapshotError::Invalid { .. })
        ));
        bytes[at] ^= 1;
        fs::write(&state, &bytes).unwrap();
        assert!(Snapshot::read(&d2).is_ok());
        // Its memory file truncated.
        let memory = d2.join(MEMORY_FILE);
        let len = fs::metadata(&memory).unwrap().len();
        File::options()
            .write(true)
            .open(&memory)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(Snapshot::read(&d2).is_err());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_corrupted_diff_memory_file_is_refused_before_any_ram_is_built() {
        let root = temp_dir("diffcrc");
        chain(&root);
        let d2 = root.join("d2");
        let s = Snapshot::read(&d2).unwrap();
        // A flipped byte in the middle link's pages: both modes refuse it.
        let path = root.join("d1").join(MEMORY_FILE);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x42], 4096 + 7).unwrap();
        for lazy in [true, false] {
            match s.guest_ram(&d2, lazy) {
                Err(SnapshotError::Invalid { section, message }) => {
                    assert_eq!(section, "memory");
                    assert!(
                        message.contains("d1") && message.contains("corrupted"),
                        "{message}"
                    );
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a corrupted diff was applied"),
            }
        }
        // A diff file of another length is refused by the state check.
        f.set_len(4096).unwrap();
        let m = parent_refusal(&d2);
        assert!(m.contains("../d1") && m.contains("holds"), "{m}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_diff_manifest_that_does_not_add_up_is_refused() {
        let good = MemoryManifest {
            size: MIB,
            ranges: ram_ranges(MIB),
            file: MEMORY_FILE.into(),
            length: 3 * 4096,
            crc64: crc_hex(1),
            kind: "diff".into(),
            parent: Some(ParentRef {
                dir: "../base".into(),
                state_crc64: crc_hex(2),
            }),
            pages: Some(vec![(0, 2), (5, 1)]),
        };
        assert!(good.check_kind().is_ok());
        let mut bad = Vec::new();
        for runs in [
            vec![(0, 2), (1, 1)],   // overlapping
            vec![(5, 1), (0, 2)],   // out of order
            vec![(0, 2), (255, 2)], // past the end of RAM
            vec![(0, 3), (9, 0)],   // empty run
            vec![(0, 2), (u64::MAX, 1)],
            vec![(0, 2)], // 2 pages in a 3-page file
        ] {
            bad.push(MemoryManifest {
                pages: Some(runs),
                ..good.clone()
            });
        }
        bad.push(MemoryManifest {
            parent: None,
            ..good.clone()
        });
        bad.push(MemoryManifest {
            kind: "full".into(),
            ..good.clone()
        });
        bad.push(MemoryManifest {
            parent: Some(ParentRef {
                dir: "../base".into(),
                state_crc64: "xyz".into(),
            }),
            ..good.clone()
        });
        for m in bad {
            match m.check_kind() {
                Err(SnapshotError::Invalid { section, .. }) => assert_eq!(section, "memory"),
                other => panic!("{:?} accepted: {:?}", m.pages, other.is_ok()),
            }
        }
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        assert_eq!(
            relative_path(Path::new("/a/b/d2"), Path::new("/a/b/d1")),
            PathBuf::from("../d1")
        );
        assert_eq!(
            relative_path(Path::new("/a/x/y"), Path::new("/a/b")),
            PathBuf::from("../../b")
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c"), Path::new("/a/b/c/base")),
            PathBuf::from("base")
        );
    }

    #[test]
    fn zeros_fed_without_reading_them_checksum_as_zeros_read() {
        for n in [0u64, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 64 * 4096] {
            let mut fast = Crc64::default();
            fast.update(b"lead");
            fast.update_zeros(n);
            fast.update(b"tail");
            let mut slow = Crc64::default();
            slow.update(b"lead");
            slow.update(&vec![0u8; n as usize]);
            slow.update(b"tail");
            assert_eq!(fast.finish(), slow.finish(), "{n} zeros");
        }
    }

    #[test]
    fn data_extents_skip_holes_and_cover_all_data() {
        let root = temp_dir("extents");
        let path = root.join("sparse");
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(64 * 4096).unwrap();
        file.write_all_at(&[1; 4096], 4096).unwrap();
        file.write_all_at(&[2; 2 * 4096], 40 * 4096).unwrap();
        let extents = data_extents(&file, 0, 64 * 4096).unwrap();
        // Every data byte is inside an extent, and extents stay in range.
        for at in [4096u64, 8191, 40 * 4096, 42 * 4096 - 1] {
            assert!(
                extents.iter().any(|&(s, e)| s <= at && at < e),
                "{at}: {extents:?}"
            );
        }
        assert!(
            extents.iter().all(|&(s, e)| s < e && e <= 64 * 4096),
            "{extents:?}"
        );
        // A window inside the second run answers only that window.
        let inner = data_extents(&file, 41 * 4096, 4096).unwrap();
        assert_eq!(inner, vec![(41 * 4096, 42 * 4096)]);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn crc64_xz_known_answer() {
        assert_eq!(Crc64::of(b"123456789"), 0x995d_c9bb_df19_39fa);
        assert_eq!(Crc64::of(b""), 0);
        // Fed in pieces of every alignment, the same checksum.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = Crc64::of(&data);
        for split in [1, 3, 8, 9, 500, 999] {
            let mut c = Crc64::default();
            c.update(&data[..split]);
            c.update(&data[split..]);
            assert_eq!(c.finish(), whole, "split at {split}");
        }
    }
}
