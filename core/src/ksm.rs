//! Kernel Samepage Merging (KSM): what the host kernel's `ksmd` has merged.
//!
//! A VM created with dedup on marks its guest RAM `MADV_MERGEABLE`
//! ([`crate::memory::GuestRam::set_mergeable`]); `ksmd` then scans those pages
//! and maps identical ones to a single write-protected copy, which is how many
//! identical idle guests share most of their memory. Whether `ksmd` runs at all,
//! and how fast, is the host's policy (`/sys/kernel/mm/ksm/run`, root only):
//! denovisor only opts a VM in and reports what was merged.
//!
//! Two sources, both plain text, both read here without failing when absent (a
//! kernel without `CONFIG_KSM`, or too old for a file, gives `None` fields):
//! - the host's counters in `/sys/kernel/mm/ksm/` (one number per file);
//! - this process's in `/proc/self/ksm_stat` (`key value` lines; Linux 6.1 has
//!   only `ksm_rmap_items` there, later kernels add `ksm_merging_pages` and
//!   more) and `/proc/self/ksm_merging_pages` (Linux 5.19+), the fallback for
//!   the merged-page count on kernels whose `ksm_stat` lacks it.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

/// Where the host's KSM counters live.
pub const SYS_KSM_DIR: &str = "/sys/kernel/mm/ksm";
/// Where this process's KSM counters live.
pub const PROC_SELF_DIR: &str = "/proc/self";

/// What can go wrong with KSM.
#[derive(Debug, Error)]
pub enum KsmError {
    /// The host kernel has no KSM: `madvise(MADV_MERGEABLE)` is unknown to it
    #[error(
        "memory deduplication needs KSM, which this host's kernel lacks (built without \
         CONFIG_KSM): madvise(MADV_MERGEABLE): {0}"
    )]
    Unsupported(io::Error),
    /// `madvise(MADV_MERGEABLE)` failed for another reason
    #[error(
        "cannot mark {len} bytes of guest RAM mergeable for KSM: madvise(MADV_MERGEABLE): {source}"
    )]
    Madvise { len: u64, source: io::Error },
    /// A KSM file exists but cannot be read
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A KSM file holds something other than what the kernel writes there
    #[error("{}: expected {expected}, found {found:?}", path.display())]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
}

impl KsmError {
    /// The error for a failed `madvise(MADV_MERGEABLE)` over `len` bytes:
    /// `EINVAL` on page-aligned anonymous memory means the advice itself is
    /// unknown, i.e. a kernel built without `CONFIG_KSM`.
    pub fn from_madvise(len: u64, source: io::Error) -> KsmError {
        if source.raw_os_error() == Some(libc::EINVAL) {
            KsmError::Unsupported(source)
        } else {
            KsmError::Madvise { len, source }
        }
    }
}

/// The host-wide counters of `/sys/kernel/mm/ksm/` (`None`: the file is absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KsmHostStats {
    /// `run`: 0 stopped, 1 running, 2 stopped and unmerging everything.
    pub run: Option<u64>,
    /// `pages_shared`: KSM pages in use (each the one copy of a merged set).
    pub pages_shared: Option<u64>,
    /// `pages_sharing`: pages mapped to a KSM page beyond its first user: the
    /// pages saved.
    pub pages_sharing: Option<u64>,
    /// `pages_unshared`: pages scanned, unique so far, checked again each scan.
    pub pages_unshared: Option<u64>,
    /// `pages_volatile`: pages changing too fast to be merged.
    pub pages_volatile: Option<u64>,
    /// `full_scans`: how many times ksmd has scanned all mergeable memory.
    pub full_scans: Option<u64>,
}

/// This process's counters (`None`: the kernel does not report it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KsmProcessStats {
    /// `ksm_rmap_items`: pages of this process ksmd is tracking.
    pub rmap_items: Option<u64>,
    /// `ksm_merging_pages`: pages of this process mapped to a KSM page.
    pub merging_pages: Option<u64>,
    /// `ksm_zero_pages`: pages merged into the shared zero page (newer
    /// kernels, with `use_zero_pages`).
    pub zero_pages: Option<u64>,
    /// `ksm_process_profit`: the kernel's own estimate of bytes saved minus its
    /// tracking overhead (newer kernels; may be negative).
    pub profit: Option<i64>,
}

/// A reading of KSM's state, for the host and for this process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KsmStats {
    /// The host's base page size in bytes (what KSM merges).
    pub page_size: u64,
    /// Host-wide counters.
    pub host: KsmHostStats,
    /// This process's counters.
    pub process: KsmProcessStats,
}

impl KsmStats {
    /// Reads the host's and this process's KSM counters.
    pub fn read() -> Result<KsmStats, KsmError> {
        Self::read_from(Path::new(SYS_KSM_DIR), Path::new(PROC_SELF_DIR))
    }

    /// Reads the counters from a `sys_dir` laid out like `/sys/kernel/mm/ksm`
    /// and a `proc_dir` laid out like `/proc/self`. Absent files (and absent
    /// directories) give `None` fields; files the kernel wrote differently
    /// than documented are an error rather than a silently wrong number.
    pub fn read_from(sys_dir: &Path, proc_dir: &Path) -> Result<KsmStats, KsmError> {
        let count = |name: &str| read_count(&sys_dir.join(name));
        let host = KsmHostStats {
            run: count("run")?,
            pages_shared: count("pages_shared")?,
            pages_sharing: count("pages_sharing")?,
            pages_unshared: count("pages_unshared")?,
            pages_volatile: count("pages_volatile")?,
            full_scans: count("full_scans")?,
        };
        let stat_path = proc_dir.join("ksm_stat");
        let mut process = match read_optional(&stat_path)? {
            Some(text) => parse_ksm_stat(&stat_path, &text)?,
            None => KsmProcessStats::default(),
        };
        if process.merging_pages.is_none() {
            process.merging_pages = read_count(&proc_dir.join("ksm_merging_pages"))?;
        }
        Ok(KsmStats {
            page_size: page_size(),
            host,
            process,
        })
    }
}

/// The host's base page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// A file's contents, or `None` when it (or its directory) does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, KsmError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KsmError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A file holding one decimal count and a newline, or `None` when absent.
fn read_count(path: &Path) -> Result<Option<u64>, KsmError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| KsmError::Malformed {
            path: path.to_owned(),
            expected: "a decimal count",
            found: text,
        })
}

/// Parses `/proc/<pid>/ksm_stat`: `key value` lines. Keys this code does not
/// know (newer kernels add some, like `ksm_merge_any: no`) are skipped; a known
/// key with a value that is not a number is an error.
pub fn parse_ksm_stat(path: &Path, text: &str) -> Result<KsmProcessStats, KsmError> {
    let mut stats = KsmProcessStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let value = value.trim();
        let malformed = |expected| KsmError::Malformed {
            path: path.to_owned(),
            expected,
            found: line.to_owned(),
        };
        let unsigned = || {
            value
                .parse::<u64>()
                .map_err(|_| malformed("a decimal count"))
        };
        match key {
            "ksm_rmap_items" => stats.rmap_items = Some(unsigned()?),
            "ksm_merging_pages" => stats.merging_pages = Some(unsigned()?),
            "ksm_zero_pages" => stats.zero_pages = Some(unsigned()?),
            "ksm_process_profit" => {
                stats.profit = Some(value.parse().map_err(|_| malformed("a signed count"))?)
            }
            _ => {}
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("denovisor-ksm-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> &Self {
            std::fs::write(self.0.join(name), text).unwrap();
            self
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sys_sample() -> TempDir {
        let sys = TempDir::new("sys");
        sys.write("run", "1\n")
            .write("pages_shared", "8192\n")
            .write("pages_sharing", "16384\n")
            .write("pages_unshared", "37\n")
            .write("pages_volatile", "5\n")
            .write("full_scans", "12\n")
            .write("sleep_millisecs", "20\n");
        sys
    }

    #[test]
    fn reads_the_host_counters_and_a_6_1_process() {
        // Linux 6.1: ksm_stat has only ksm_rmap_items; the merged-page count is
        // in its own file.
        let sys = sys_sample();
        let proc = TempDir::new("proc61");
        proc.write("ksm_stat", "ksm_rmap_items 24576\n")
            .write("ksm_merging_pages", "24000\n");
        let stats = KsmStats::read_from(&sys.0, &proc.0).unwrap();
        assert_eq!(
            stats.host,
            KsmHostStats {
                run: Some(1),
                pages_shared: Some(8192),
                pages_sharing: Some(16384),
                pages_unshared: Some(37),
                pages_volatile: Some(5),
                full_scans: Some(12),
            }
        );
        assert_eq!(
            stats.process,
            KsmProcessStats {
                rmap_items: Some(24576),
                merging_pages: Some(24000),
                zero_pages: None,
                profit: None,
            }
        );
        assert_eq!(stats.page_size, page_size());
    }

    #[test]
    fn reads_a_newer_ksm_stat_and_skips_unknown_lines() {
        // Linux 6.18's format, as this development host writes it.
        let proc = TempDir::new("proc618");
        proc.write(
            "ksm_stat",
            "ksm_rmap_items 10\nksm_zero_pages 2\nksm_merging_pages 7\n\
             ksm_process_profit -4096\nksm_merge_any: no\nksm_mergeable: yes\n",
        )
        // Stale on purpose: ksm_stat's own count wins when it has one.
        .write("ksm_merging_pages", "999\n");
        let stats = KsmStats::read_from(Path::new("/nonexistent"), &proc.0).unwrap();
        assert_eq!(
            stats.process,
            KsmProcessStats {
                rmap_items: Some(10),
                merging_pages: Some(7),
                zero_pages: Some(2),
                profit: Some(-4096),
            }
        );
    }

    #[test]
    fn missing_files_are_none() {
        // A kernel without CONFIG_KSM: no /sys/kernel/mm/ksm, no ksm files in /proc.
        let empty = TempDir::new("empty");
        let stats = KsmStats::read_from(&empty.0.join("ksm"), &empty.0).unwrap();
        assert_eq!(stats.host, KsmHostStats::default());
        assert_eq!(stats.process, KsmProcessStats::default());
        // Linux 5.19/6.0: only ksm_merging_pages.
        let proc = TempDir::new("proc519");
        proc.write("ksm_merging_pages", "3\n");
        let stats = KsmStats::read_from(&empty.0, &proc.0).unwrap();
        assert_eq!(stats.process.merging_pages, Some(3));
        assert_eq!(stats.process.rmap_items, None);
        // Some host files but not others.
        let sys = TempDir::new("partial");
        sys.write("run", "0\n");
        let stats = KsmStats::read_from(&sys.0, &empty.0).unwrap();
        assert_eq!(stats.host.run, Some(0));
        assert_eq!(stats.host.pages_sharing, None);
    }

    #[test]
    fn malformed_files_name_the_file() {
        let sys = sys_sample();
        sys.write("pages_sharing", "lots\n");
        let err = KsmStats::read_from(&sys.0, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, KsmError::Malformed { path, .. } if path.ends_with("pages_sharing")),
            "{err}"
        );
        let proc = TempDir::new("badstat");
        proc.write("ksm_stat", "ksm_rmap_items many\n");
        let err = KsmStats::read_from(Path::new("/nonexistent"), &proc.0).unwrap_err();
        assert!(
            matches!(&err, KsmError::Malformed { found, .. } if found == "ksm_rmap_items many"),
            "{err}"
        );
    }

    #[test]
    fn einval_from_madvise_means_no_ksm() {
        let e = KsmError::from_madvise(4096, io::Error::from_raw_os_error(libc::EINVAL));
        assert!(matches!(e, KsmError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("CONFIG_KSM"), "{e}");
        let e = KsmError::from_madvise(4096, io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(matches!(e, KsmError::Madvise { len: 4096, .. }), "{e}");
    }

    #[test]
    fn this_host_reads_without_error() {
        // Whatever this kernel has: the real files parse.
        let stats = KsmStats::read().unwrap();
        if Path::new(SYS_KSM_DIR).exists() {
            assert!(stats.host.run.is_some(), "{stats:?}");
        }
    }

    #[test]
    fn serializes_in_camel_case_with_nulls() {
        let stats = KsmStats {
            page_size: 4096,
            host: KsmHostStats {
                pages_sharing: Some(2),
                ..Default::default()
            },
            process: KsmProcessStats::default(),
        };
        let json = serde_json::to_string(&stats).unwrap();
        assert!(json.contains(r#""pageSize":4096"#), "{json}");
        assert!(json.contains(r#""pagesSharing":2"#), "{json}");
        assert!(json.contains(r#""mergingPages":null"#), "{json}");
    }
}
