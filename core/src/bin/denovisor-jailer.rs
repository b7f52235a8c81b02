//! `denovisor-jailer`: runs one program (the denovisor VMM: Deno running
//! `main.ts`) confined, in the shape of Firecracker's jailer.
//!
//! The TypeScript side (`src/jail/`) decides the policy — which files the jail
//! holds, the limits, the user — and passes it as arguments; this program only
//! applies it, in an order where each step still has the privilege it needs:
//!
//! 1. validate the arguments (nothing is touched before they all parse);
//! 2. cgroup v2: create the leaf `<cgroup2 mount>/denovisor/<id>` and write the
//!    limits, where the host delegates the controllers (else "cgroups not
//!    delegated": fatal only when a limit was asked);
//! 3. `unshare(CLONE_NEWPID)` and fork: the child is PID 1 of a new PID
//!    namespace; the parent puts it in the cgroup, forwards termination
//!    signals (as SIGKILL: a namespace's init ignores signals it has no handler
//!    for), waits, removes the cgroup leaf and exits with the child's status;
//! 4. the child unshares mount, IPC, UTS (and network, unless asked to keep
//!    it, for a VM with a TAP), makes every mount private, mounts a tmpfs on
//!    the jail folder (nothing the jail creates reaches the host's disk),
//!    bind-mounts the allowed files read-only (or writable where asked),
//!    creates the device nodes on a small `/dev` tmpfs, mounts `/proc` and the
//!    tmpfs folders, `pivot_root`s into the jail, detaches the old root and
//!    makes the jail's root read-only;
//! 5. sets the rlimits, drops the capability bounding set and the ambient
//!    set, changes to the user and group (no supplementary groups), clears
//!    every capability, sets `PR_SET_NO_NEW_PRIVS`, closes every fd above 2
//!    and `execve`s the program with only the given environment.
//!
//! Exit status: the program's (128 + N when killed by signal N); 125 when
//! the jail could not be set up (the reason on stderr).

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The exit status when the jail could not be set up.
const SETUP_FAILED: i32 = 125;
/// The parent folder of every jail's cgroup, under the cgroup2 mount.
const CGROUP_PARENT: &str = "denovisor";
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A malformed command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ArgError {
    /// {0} needs a value
    #[error("{0} needs a value")]
    MissingValue(String),
    /// unknown option {0}
    #[error("unknown option {0}")]
    UnknownOption(String),
    /// a required option is missing
    #[error("{0} is required")]
    Required(&'static str),
    /// a value is malformed
    #[error("{option}: {why}, got {value:?}")]
    Invalid {
        option: &'static str,
        value: String,
        why: &'static str,
    },
    /// nothing to run
    #[error("no program after --")]
    NoProgram,
}

/// A failure while setting up the jail.
#[derive(Debug, thiserror::Error)]
enum JailError {
    /// The arguments.
    #[error("bad arguments: {0}")]
    Args(#[from] ArgError),
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        call: String,
        #[source]
        source: io::Error,
    },
    /// The host does not delegate the cgroup controllers a limit needs.
    #[error("cgroups not delegated: {0}")]
    CgroupsNotDelegated(String),
    /// A cgroup file could not be written or created.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Wraps the last OS error of `call`.
fn sys(call: impl fmt::Display) -> JailError {
    JailError::Sys {
        call: call.to_string(),
        source: io::Error::last_os_error(),
    }
}

/// Checks a libc return value (`-1` is failure).
fn check(result: libc::c_int, call: impl fmt::Display) -> Result<(), JailError> {
    if result == -1 {
        Err(sys(call))
    } else {
        Ok(())
    }
}

/// A device node the jail may hold, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Device {
    name: &'static str,
    /// Where it goes, relative to the jail's `/dev`.
    path: &'static str,
    major: u32,
    minor: u32,
    /// Owned by the jail's user with mode 0600 (else root's, 0666).
    private: bool,
}

/// Every device a jail can ask for: KVM and TUN are the jailed user's alone.
const DEVICES: [Device; 5] = [
    Device {
        name: "kvm",
        path: "kvm",
        major: 10,
        minor: 232,
        private: true,
    },
    Device {
        name: "net-tun",
        path: "net/tun",
        major: 10,
        minor: 200,
        private: true,
    },
    Device {
        name: "null",
        path: "null",
        major: 1,
        minor: 3,
        private: false,
    },
    Device {
        name: "zero",
        path: "zero",
        major: 1,
        minor: 5,
        private: false,
    },
    Device {
        name: "urandom",
        path: "urandom",
        major: 1,
        minor: 9,
        private: false,
    },
];

/// A cgroup v2 file a jail may write, and the controller it belongs to.
const CGROUP_KEYS: [(&str, &str); 6] = [
    ("cpu.max", "cpu"),
    ("cpu.weight", "cpu"),
    ("memory.max", "memory"),
    ("memory.high", "memory"),
    ("memory.swap.max", "memory"),
    ("pids.max", "pids"),
];

/// The rlimits a jail may set, by name.
const RLIMITS: [(&str, libc::__rlimit_resource_t); 3] = [
    ("nofile", libc::RLIMIT_NOFILE),
    ("fsize", libc::RLIMIT_FSIZE),
    ("nproc", libc::RLIMIT_NPROC),
];

/// A host file or folder mounted into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bind {
    source: PathBuf,
    /// Absolute inside the jail.
    target: PathBuf,
    writable: bool,
}

/// Everything the jail is made of, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    root: PathBuf,
    id: String,
    uid: Option<u32>,
    gid: Option<u32>,
    cgroups: Vec<(String, String)>,
    binds: Vec<Bind>,
    devices: Vec<Device>,
    /// tmpfs folders inside the jail and their sizes in MiB.
    tmpfs: Vec<(PathBuf, u64)>,
    new_netns: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    chdir: PathBuf,
    env: Vec<CString>,
    program: CString,
    args: Vec<CString>,
}

/// An absolute path without `.`, `..` or empty components (and not `/`
/// itself when `allow_root` is false).
fn clean_absolute(
    option: &'static str,
    value: &str,
    allow_root: bool,
) -> Result<PathBuf, ArgError> {
    let invalid = |why| ArgError::Invalid {
        option,
        value: value.to_string(),
        why,
    };
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(invalid("not an absolute path"));
    }
    if value.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let mut normal = 0;
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            _ => return Err(invalid("has . or .. components")),
        }
    }
    if value
        .split('/')
        .skip(1)
        .any(|part| part == "." || part == "..")
    {
        return Err(invalid("has . or .. components"));
    }
    if normal == 0 && !allow_root {
        return Err(invalid("must not be /"));
    }
    Ok(path.to_path_buf())
}

fn parse_number(option: &'static str, value: &str, max: u64) -> Result<u64, ArgError> {
    let invalid = |why| ArgError::Invalid {
        option,
        value: value.to_string(),
        why,
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("not a decimal integer"));
    }
    let n: u64 = value.parse().map_err(|_| invalid("out of range"))?;
    if n > max {
        return Err(invalid("out of range"));
    }
    Ok(n)
}

fn cstring(option: &'static str, value: &str) -> Result<CString, ArgError> {
    CString::new(value).map_err(|_| ArgError::Invalid {
        option,
        value: value.to_string(),
        why: "contains a NUL byte",
    })
}

/// Parses the jailer's arguments (without the program name).
fn parse_args(args: &[String]) -> Result<Config, ArgError> {
    let mut root = None;
    let mut id = None;
    let mut uid = None;
    let mut gid = None;
    let mut cgroups = Vec::new();
    let mut binds = Vec::new();
    let mut devices: Vec<Device> = Vec::new();
    let mut tmpfs = Vec::new();
    let mut new_netns = true;
    let mut rlimits = Vec::new();
    let mut chdir = PathBuf::from("/");
    let mut env = Vec::new();
    let mut i = 0;
    let value = |i: usize, option: &str| -> Result<String, ArgError> {
        args.get(i + 1)
            .cloned()
            .ok_or_else(|| ArgError::MissingValue(option.to_string()))
    };
    while i < args.len() {
        let option = args[i].as_str();
        match option {
            "--" => {
                i += 1;
                break;
            }
            "--root" => root = Some(clean_absolute("--root", &value(i, option)?, false)?),
            "--id" => {
                let v = value(i, option)?;
                let ok = !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(ArgError::Invalid {
                        option: "--id",
                        value: v,
                        why: "1 to 64 of A-Z a-z 0-9 - _",
                    });
                }
                id = Some(v);
            }
            // u32::MAX is (uid_t)-1, "unchanged" to setresuid: not a user.
            "--uid" => {
                uid =
                    Some(parse_number("--uid", &value(i, option)?, u64::from(u32::MAX - 1))? as u32)
            }
            "--gid" => {
                gid =
                    Some(parse_number("--gid", &value(i, option)?, u64::from(u32::MAX - 1))? as u32)
            }
            "--cgroup" => {
                let v = value(i, option)?;
                let invalid = |why| ArgError::Invalid {
                    option: "--cgroup",
                    value: v.clone(),
                    why,
                };
                let (key, setting) = v.split_once('=').ok_or_else(|| invalid("not KEY=VALUE"))?;
                if !CGROUP_KEYS.iter().any(|(k, _)| *k == key) {
                    return Err(invalid("unknown key (cpu.max, cpu.weight, memory.max, memory.high, memory.swap.max, pids.max)"));
                }
                let ok = !setting.is_empty()
                    && setting.len() <= 64
                    && setting
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b' ');
                if !ok {
                    return Err(invalid(
                        "the value must be 1 to 64 of A-Z a-z 0-9 and spaces",
                    ));
                }
                cgroups.push((key.to_string(), setting.to_string()));
            }
            "--ro" | "--rw" => {
                let name = if option == "--ro" { "--ro" } else { "--rw" };
                let source = clean_absolute(name, &value(i, option)?, false)?;
                let target = clean_absolute(
                    name,
                    &args
                        .get(i + 2)
                        .cloned()
                        .ok_or_else(|| ArgError::MissingValue(option.to_string()))?,
                    false,
                )?;
                binds.push(Bind {
                    source,
                    target,
                    writable: option == "--rw",
                });
                i += 1;
            }
            "--dev" => {
                let v = value(i, option)?;
                let device =
                    DEVICES
                        .iter()
                        .find(|d| d.name == v)
                        .ok_or_else(|| ArgError::Invalid {
                            option: "--dev",
                            value: v.clone(),
                            why: "unknown device (kvm, net-tun, null, zero, urandom)",
                        })?;
                if !devices.contains(device) {
                    devices.push(*device);
                }
            }
            "--tmpfs" => {
                let target = clean_absolute("--tmpfs", &value(i, option)?, false)?;
                let size = args
                    .get(i + 2)
                    .ok_or_else(|| ArgError::MissingValue(option.to_string()))?;
                tmpfs.push((target, parse_number("--tmpfs", size, 1 << 20)?.max(1)));
                i += 1;
            }
            "--netns" => {
                let v = value(i, option)?;
                new_netns = match v.as_str() {
                    "new" => true,
                    "keep" => false,
                    _ => {
                        return Err(ArgError::Invalid {
                            option: "--netns",
                            value: v,
                            why: "new or keep",
                        })
                    }
                };
            }
            "--rlimit" => {
                let v = value(i, option)?;
                let invalid = |why| ArgError::Invalid {
                    option: "--rlimit",
                    value: v.clone(),
                    why,
                };
                let (name, limit) = v.split_once('=').ok_or_else(|| invalid("not NAME=N"))?;
                let resource = RLIMITS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| invalid("unknown limit (nofile, fsize, nproc)"))?
                    .1;
                rlimits.push((resource, parse_number("--rlimit", limit, u64::MAX - 1)?));
            }
            "--chdir" => chdir = clean_absolute("--chdir", &value(i, option)?, true)?,
            "--env" => {
                let v = value(i, option)?;
                if !v.contains('=') || v.starts_with('=') {
                    return Err(ArgError::Invalid {
                        option: "--env",
                        value: v,
                        why: "not NAME=VALUE",
                    });
                }
                env.push(cstring("--env", &v)?);
            }
            other => return Err(ArgError::UnknownOption(other.to_string())),
        }
        i += 2;
    }
    let program_text = args.get(i).ok_or(ArgError::NoProgram)?;
    let program = clean_absolute("program", program_text, false)?;
    let program = cstring("program", &program.to_string_lossy())?;
    let rest = args[i..]
        .iter()
        .map(|a| cstring("argument", a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        root: root.ok_or(ArgError::Required("--root"))?,
        id: id.ok_or(ArgError::Required("--id"))?,
        uid,
        gid,
        cgroups,
        binds,
        devices,
        tmpfs,
        new_netns,
        rlimits,
        chdir,
        env,
        program,
        args: rest,
    })
}

/// The cgroup2 mount point, from `/proc/self/mountinfo` (field 5 is the mount
/// point; the file system type follows the ` - ` separator).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

/// The jail's cgroup leaf, removed when dropped.
struct CgroupLeaf {
    path: PathBuf,
}

impl CgroupLeaf {
    /// Creates the leaf and writes the limits, or says why the host does not
    /// delegate what is asked (`Ok(None)` when nothing was asked and the host
    /// cannot: the jail then runs without a cgroup).
    fn create(config: &Config) -> Result<Option<CgroupLeaf>, JailError> {
        let needed: Vec<&str> = {
            let mut wanted: Vec<&str> = config
                .cgroups
                .iter()
                .filter_map(|(key, _)| CGROUP_KEYS.iter().find(|(k, _)| k == key).map(|(_, c)| *c))
                .collect();
            if wanted.is_empty() {
                // Without limits the leaf still accounts the jail's usage.
                wanted = vec!["cpu", "memory", "pids"];
            }
            wanted.sort_unstable();
            wanted.dedup();
            wanted
        };
        let problem = match cgroup2_mount() {
            None => Some("no cgroup2 file system is mounted".to_string()),
            Some(mount) => {
                let control = mount.join("cgroup.subtree_control");
                match fs::read_to_string(&control) {
                    Err(e) => Some(format!("cannot read {}: {e}", control.display())),
                    Ok(enabled) => {
                        let enabled: Vec<&str> = enabled.split_whitespace().collect();
                        let missing: Vec<&str> = needed
                            .iter()
                            .copied()
                            .filter(|c| !enabled.contains(c))
                            .collect();
                        if missing.is_empty() {
                            return Self::make(&mount, &needed, config).map(Some);
                        }
                        Some(format!(
                            "the controllers {} are not enabled in {}",
                            missing.join(", "),
                            control.display()
                        ))
                    }
                }
            }
        };
        let problem = problem.unwrap_or_default();
        if config.cgroups.is_empty() {
            eprintln!(
                "denovisor-jailer: cgroups not delegated ({problem}); running without a cgroup"
            );
            return Ok(None);
        }
        Err(JailError::CgroupsNotDelegated(problem))
    }

    fn make(mount: &Path, controllers: &[&str], config: &Config) -> Result<CgroupLeaf, JailError> {
        let failed = |path: &Path| {
            let path = path.display().to_string();
            move |source| JailError::Cgroup { path, source }
        };
        let parent = mount.join(CGROUP_PARENT);
        match fs::create_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(failed(&parent)(e)),
            _ => {}
        }
        let control = parent.join("cgroup.subtree_control");
        let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
        fs::write(&control, enable.join(" ")).map_err(failed(&control))?;
        let path = parent.join(&config.id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            // A leaf left by a jail that was killed: reused when empty.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let procs = path.join("cgroup.procs");
                let members = fs::read_to_string(&procs).map_err(failed(&procs))?;
                if !members.trim().is_empty() {
                    return Err(JailError::Cgroup {
                        path: path.display().to_string(),
                        source: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a live jail uses this id",
                        ),
                    });
                }
            }
            Err(e) => return Err(failed(&path)(e)),
        }
        let leaf = CgroupLeaf { path };
        for (key, value) in &config.cgroups {
            let file = leaf.path.join(key);
            fs::write(&file, value).map_err(failed(&file))?;
        }
        Ok(leaf)
    }

    fn add(&self, pid: libc::pid_t) -> Result<(), JailError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|source| JailError::Cgroup {
            path: procs.display().to_string(),
            source,
        })
    }
}

impl Drop for CgroupLeaf {
    fn drop(&mut self) {
        // The namespace's other processes may still be exiting after its init
        // was reaped: the leaf is busy until they are gone.
        for _ in 0..200 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        eprintln!(
            "denovisor-jailer: could not remove the cgroup {}",
            self.path.display()
        );
    }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Sys {
        call: format!("path {}", path.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// `mount(2)` with optional source, type and data.
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), JailError> {
    let source_c = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // outlives the call; mount(2) only reads them.
    let result = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(result, format_args!("mount {}", target.display()))
}

/// The jail-side path of an absolute path inside the jail.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn create_dirs(path: &Path) -> Result<(), JailError> {
    fs::create_dir_all(path).map_err(|source| JailError::Sys {
        call: format!("mkdir {}", path.display()),
        source,
    })
}

/// Bind-mounts `bind.source` at its target, read-only unless writable; never
/// set-user-ID, never devices.
fn bind_mount(root: &Path, bind: &Bind) -> Result<(), JailError> {
    let target = inside(root, &bind.target);
    if let Some(parent) = target.parent() {
        create_dirs(parent)?;
    }
    let is_dir = fs::metadata(&bind.source)
        .map_err(|source| JailError::Sys {
            call: format!("stat {}", bind.source.display()),
            source,
        })?
        .is_dir();
    if is_dir {
        create_dirs(&target)?;
    } else if !target.exists() {
        fs::File::create(&target).map_err(|source| JailError::Sys {
            call: format!("create {}", target.display()),
            source,
        })?;
    }
    // Not MS_REC: mounts below the source stay out of the jail.
    mount(Some(&bind.source), &target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if !bind.writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &target, None, flags, None)
}

/// Mounts a tmpfs of `size_mib` at `target` (mode 1777: any jailed user writes).
fn mount_tmpfs(
    target: &Path,
    size_mib: u64,
    mode: &str,
    flags: libc::c_ulong,
) -> Result<(), JailError> {
    create_dirs(target)?;
    let data =
        CString::new(format!("size={size_mib}m,mode={mode}")).map_err(|_| JailError::Sys {
            call: "tmpfs options".into(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    mount(
        Some(Path::new("tmpfs")),
        target,
        Some(c"tmpfs"),
        flags,
        Some(&data),
    )
}

/// Creates the device nodes on a fresh tmpfs at the jail's `/dev`.
fn make_devices(root: &Path, config: &Config) -> Result<(), JailError> {
    let dev = inside(root, Path::new("/dev"));
    mount_tmpfs(&dev, 1, "0755", libc::MS_NOSUID | libc::MS_NOEXEC)?;
    let uid = config.uid.unwrap_or(0);
    let gid = config.gid.unwrap_or(0);
    for device in &config.devices {
        let path = dev.join(device.path);
        if let Some(parent) = path.parent() {
            create_dirs(parent)?;
        }
        let c = c_path(&path)?;
        let mode = if device.private { 0o600 } else { 0o666 };
        // SAFETY: `c` is a NUL-terminated path; mknod(2) only reads it.
        let made = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | mode,
                libc::makedev(device.major, device.minor),
            )
        };
        check(made, format_args!("mknod {}", path.display()))?;
        // mknod's mode is filtered by the umask; the node must have exactly `mode`.
        // SAFETY: as above, for chmod(2).
        let rc = unsafe { libc::chmod(c.as_ptr(), mode) };
        check(rc, format_args!("chmod {}", path.display()))?;
        if device.private {
            // SAFETY: as above, for chown(2).
            let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
            check(rc, format_args!("chown {}", path.display()))?;
        }
    }
    Ok(())
}

/// Builds the jail's file system and enters it (in the child, as PID 1).
fn build_root(config: &Config) -> Result<(), JailError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if config.new_netns {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare(2) takes flags only.
    check(unsafe { libc::unshare(flags) }, "unshare")?;
    let hostname = b"denovisor-jail";
    // SAFETY: the pointer and length describe `hostname`, which sethostname(2) only reads.
    let rc = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    check(rc, "sethostname")?;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &config.root;
    // The jail's root is a tmpfs: its mount points and device nodes never
    // reach the host's disk, and vanish with the mount namespace.
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"size=1m,mode=0755"),
    )?;
    for bind in &config.binds {
        bind_mount(root, bind)?;
    }
    make_devices(root, config)?;
    let proc = inside(root, Path::new("/proc"));
    create_dirs(&proc)?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for (target, size) in &config.tmpfs {
        mount_tmpfs(
            &inside(root, target),
            *size,
            "1777",
            libc::MS_NOSUID | libc::MS_NODEV,
        )?;
    }
    let root_c = c_path(root)?;
    // SAFETY: `root_c` is a NUL-terminated path.
    check(unsafe { libc::chdir(root_c.as_ptr()) }, "chdir to the jail")?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one; both
    // arguments are NUL-terminated strings.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int;
    check(rc, "pivot_root")?;
    // SAFETY: detaches the old root, now mounted over "."; a string argument.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, "detach the old root")?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    let chdir = c_path(&config.chdir)?;
    // SAFETY: a NUL-terminated path.
    check(
        unsafe { libc::chdir(chdir.as_ptr()) },
        format_args!("chdir {}", config.chdir.display()),
    )
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the limits, gives up every privilege and becomes the jailed user.
fn drop_privileges(config: &Config) -> Result<(), JailError> {
    for (resource, limit) in &config.rlimits {
        let value = libc::rlimit {
            rlim_cur: *limit,
            rlim_max: *limit,
        };
        // SAFETY: `value` is a valid rlimit the call only reads.
        let rc = unsafe { libc::setrlimit(*resource, &value) };
        check(rc, format_args!("setrlimit {resource}"))?;
    }
    let last_cap: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let dropped =
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        // EINVAL: a capability this kernel does not know.
        if dropped == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(sys(format_args!(
                "drop capability {cap} from the bounding set"
            )));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(cleared, "clear the ambient capabilities")?;
    // SAFETY: no groups: a null list of length 0.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;
    if let Some(gid) = config.gid {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    }
    if let Some(uid) = config.uid {
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 reads a header and two data words, both valid here.
    let set = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(set as libc::c_int, "capset")?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "PR_SET_NO_NEW_PRIVS")?;
    // Set after the credential change, which clears it: the VMM dies with the jailer.
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )
}

/// Closes every descriptor above stderr.
fn close_inherited_fds() -> Result<(), JailError> {
    // SAFETY: close_range(2) takes integers only.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } == 0 {
        return Ok(());
    }
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(|source| JailError::Sys {
            call: "list /proc/self/fd".into(),
            source,
        })?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor this single-threaded process no longer
        // uses (the listing's own one may already be gone: EBADF is harmless).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The child: waits to be placed in the cgroup, builds the jail, and execs.
fn child(config: &Config, ready: libc::c_int) -> JailError {
    // Until the credentials change (which clears it; set again then): the
    // child must not outlive a jailer killed while it sets up.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut byte = 0u8;
    // SAFETY: reads one byte into `byte`.
    let n = unsafe { libc::read(ready, (&mut byte as *mut u8).cast(), 1) };
    if n != 1 {
        return sys("wait for the cgroup");
    }
    // SAFETY: the descriptor is ours and no longer used.
    unsafe { libc::close(ready) };
    if let Err(e) = build_root(config)
        .and_then(|()| drop_privileges(config))
        .and_then(|()| close_inherited_fds())
    {
        return e;
    }
    let mut argv: Vec<*const libc::c_char> = config.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = config.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: the program, argv and envp are NUL-terminated strings in
    // null-terminated arrays that live until execve replaces the process.
    unsafe { libc::execve(config.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    sys(format_args!("execve {}", config.program.to_string_lossy()))
}

static CHILD: AtomicI32 = AtomicI32::new(0);
/// A termination signal arrived (perhaps before the child existed).
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn forward_signal(_signal: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; integers only.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The parent: unshares the PID namespace, forks, manages the cgroup and
/// returns the child's status.
fn run(config: &Config) -> Result<i32, JailError> {
    let root_info = fs::metadata(&config.root).map_err(|source| JailError::Sys {
        call: format!("stat {}", config.root.display()),
        source,
    })?;
    if !root_info.is_dir() {
        return Err(JailError::Sys {
            call: format!("--root {}", config.root.display()),
            source: io::Error::from(io::ErrorKind::NotADirectory),
        });
    }
    for bind in &config.binds {
        if let Err(source) = fs::metadata(&bind.source) {
            return Err(JailError::Sys {
                call: format!("stat {}", bind.source.display()),
                source,
            });
        }
    }
    let cgroup = CgroupLeaf::create(config)?;
    // SAFETY: unshare(2) with a flag: only this process's future children
    // enter the new PID namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    check(rc, "unshare(CLONE_NEWPID)")?;
    // Installed before fork: a signal in between still stops the child.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: the handler only stores atomics and calls kill(2), all
        // async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "pipe")?;
    let _ = io::stderr().flush();
    // SAFETY: this process is single-threaded, so the child may keep running
    // ordinary Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(sys("fork"));
    }
    if pid == 0 {
        // SAFETY: the write end belongs to the parent.
        unsafe { libc::close(pipe[1]) };
        let error = child(config, pipe[0]);
        eprintln!("denovisor-jailer: cannot set up the jail: {error}");
        // SAFETY: leaves at once, without running the parent's destructors
        // (the cgroup leaf belongs to the parent).
        unsafe { libc::_exit(SETUP_FAILED) };
    }
    CHILD.store(pid, Ordering::SeqCst);
    if TERMINATE.load(Ordering::SeqCst) {
        // Asked to stop before the child existed: it never runs the VMM.
        // SAFETY: integers only.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: the read end belongs to the child.
    unsafe { libc::close(pipe[0]) };
    let placed = cgroup.as_ref().map_or(Ok(()), |leaf| leaf.add(pid));
    if placed.is_ok() && !TERMINATE.load(Ordering::SeqCst) {
        let go = 1u8;
        // SAFETY: writes one byte from `go`.
        unsafe { libc::write(pipe[1], (&go as *const u8).cast(), 1) };
    } else {
        // SAFETY: integers only: the child must not run outside its cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: the descriptor is ours.
    unsafe { libc::close(pipe[1]) };
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for waitpid(2) to fill.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(sys("waitpid"));
        }
    }
    placed?;
    drop(cgroup);
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        SETUP_FAILED
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_args(&args)
        .map_err(JailError::from)
        .and_then(|config| run(&config));
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("denovisor-jailer: {error}");
            std::process::exit(SETUP_FAILED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_full_command_line_parses() {
        let config = parse_args(&strings(&[
            "--root",
            "/srv/jail",
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid",
            "100",
            "--cgroup",
            "memory.max=268435456",
            "--cgroup",
            "cpu.max=50000 100000",
            "--ro",
            "/usr/bin/deno",
            "/deno/deno",
            "--rw",
            "/var/disk.img",
            "/vm/disk0",
            "--dev",
            "kvm",
            "--dev",
            "null",
            "--dev",
            "kvm",
            "--tmpfs",
            "/tmp",
            "16",
            "--netns",
            "keep",
            "--rlimit",
            "nofile=1024",
            "--chdir",
            "/denovisor",
            "--env",
            "DENO_DIR=/deno-dir",
            "--",
            "/deno/deno",
            "run",
            "-A",
            "main.ts",
        ]))
        .unwrap();
        assert_eq!(config.root, PathBuf::from("/srv/jail"));
        assert_eq!((config.uid, config.gid), (Some(1000), Some(100)));
        assert_eq!(config.cgroups.len(), 2);
        assert_eq!(
            config.binds[1],
            Bind {
                source: "/var/disk.img".into(),
                target: "/vm/disk0".into(),
                writable: true
            }
        );
        assert_eq!(config.devices.len(), 2, "a repeated device counts once");
        assert_eq!(config.tmpfs, vec![(PathBuf::from("/tmp"), 16)]);
        assert!(!config.new_netns);
        assert_eq!(config.rlimits, vec![(libc::RLIMIT_NOFILE, 1024)]);
        assert_eq!(config.program.to_str().unwrap(), "/deno/deno");
        assert_eq!(config.args.len(), 4, "argv[0] is the program");
    }

    #[test]
    fn bad_input_is_refused_with_the_option_named() {
        let base = ["--root", "/j", "--id", "x"];
        let run = |extra: &[&str]| {
            let mut all: Vec<&str> = base.to_vec();
            all.extend_from_slice(extra);
            parse_args(&strings(&all))
        };
        assert!(run(&["--", "/bin/true"]).is_ok());
        assert_eq!(run(&[]).unwrap_err(), ArgError::NoProgram);
        assert!(matches!(
            run(&["--uid", "-1", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--uid",
                ..
            })
        ));
        assert!(matches!(
            run(&["--uid", "4294967295", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--uid",
                ..
            })
        ));
        assert!(matches!(
            run(&["--cgroup", "devices.allow=a", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--cgroup",
                ..
            })
        ));
        assert!(matches!(
            run(&["--cgroup", "memory.max=1\nx", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--cgroup",
                ..
            })
        ));
        assert!(matches!(
            run(&["--ro", "relative", "/x", "--", "/p"]),
            Err(ArgError::Invalid { option: "--ro", .. })
        ));
        assert!(matches!(
            run(&["--ro", "/a", "/b/../../etc", "--", "/p"]),
            Err(ArgError::Invalid { option: "--ro", .. })
        ));
        assert!(matches!(
            run(&["--dev", "sda", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--dev",
                ..
            })
        ));
        assert!(matches!(
            run(&["--rlimit", "core=0", "--", "/p"]),
            Err(ArgError::Invalid {
                option: "--rlimit",
                ..
            })
        ));
        assert_eq!(
            run(&["--bogus", "1", "--", "/p"]).unwrap_err(),
            ArgError::UnknownOption("--bogus".into())
        );
        assert_eq!(
            run(&["--uid"]).unwrap_err(),
            ArgError::MissingValue("--uid".into())
        );
        assert!(matches!(
            run(&["--", "relative"]),
            Err(ArgError::Invalid {
                option: "program",
                ..
            })
        ));
        assert_eq!(
            parse_args(&strings(&["--id", "x", "--", "/p"])).unwrap_err(),
            ArgError::Required("--root")
        );
        assert!(matches!(
            parse_args(&strings(&["--root", "/", "--id", "x", "--", "/p"])),
            Err(ArgError::Invalid {
                option: "--root",
                ..
            })
        ));
        assert!(matches!(
            parse_args(&strings(&["--root", "/j", "--id", "../x", "--", "/p"])),
            Err(ArgError::Invalid { option: "--id", .. })
        ));
    }

    #[test]
    fn inside_maps_an_absolute_path_under_the_root() {
        assert_eq!(
            inside(Path::new("/j"), Path::new("/a/b")),
            PathBuf::from("/j/a/b")
        );
    }
}
