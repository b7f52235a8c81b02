//! The host side of virtio-net: a TAP device opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame read or written
//! carries the 12-byte `virtio_net_hdr_v1` the guest's driver uses, and
//! checksum and segmentation offloads pass through untouched.
//!
//! Two ways to get one:
//! - [`Tap::open_existing`]: attach an existing TAP in this network namespace
//!   (`--net tap=NAME`). A name that does not exist is refused: `TUNSETIFF`
//!   would otherwise create a new device.
//! - [`Tap::create_in_netns`]: create a TAP inside a network namespace the
//!   user names (`/run/netns/NS`, as `ip netns add` makes), bring it up and
//!   optionally give it an IPv4 address (`--net netns=NS,host=10.0.2.1/24`).
//!   The device is not persistent: it disappears when the VM closes its fd.
//!
//! The fd is nonblocking: the device's worker waits for it with epoll.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use thiserror::Error;

/// The virtio-net header size for VIRTIO 1.x (`virtio_net_hdr_v1`, with
/// `num_buffers`), set on the TAP with `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 12;

/// Linux's interface name limit (including the NUL).
const IFNAMSIZ: usize = 16;

/// Why a TAP cannot be had.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, too long, or has characters Linux refuses.
    #[error("invalid interface name {0:?} (1 to 15 characters, no '/', ':' or whitespace)")]
    BadName(String),
    /// No interface by that name in this network namespace.
    #[error("TAP device {0} does not exist (create it with `ip tuntap add dev {0} mode tap`)")]
    NoSuchTap(String),
    /// The interface exists but is not a TAP (or is a TUN, or multi-queue).
    #[error("{0} is not a single-queue TAP device")]
    NotATap(String),
    /// The TAP is attached to another process already.
    #[error("TAP device {0} is busy (another process has it open)")]
    Busy(String),
    /// No such network namespace.
    #[error("network namespace {0} does not exist (no {1}; create it with `ip netns add {0}`)")]
    NoSuchNetns(String, String),
    /// The IPv4 address for the host side does not parse.
    #[error(
        "invalid host address {0:?} (expected an IPv4 address with a prefix, like 10.0.2.1/24)"
    )]
    BadAddress(String),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> TapError {
    let op = op.into();
    move |source| TapError::Io { op, source }
}

fn last_err(op: impl Into<String>) -> TapError {
    io_err(op)(std::io::Error::last_os_error())
}

/// Checks an interface name as Linux's `dev_valid_name` does.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Parses `A.B.C.D/N` (N in 0..=32).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), TapError> {
    let bad = || TapError::BadAddress(s.to_string());
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// The path of a named network namespace (a name with a '/' is a path).
pub fn netns_path(ns: &str) -> String {
    if ns.contains('/') {
        ns.to_string()
    } else {
        format!("/run/netns/{ns}")
    }
}

/// `struct ifreq`: the name and a 24-byte union (flags, sockaddr...).
#[repr(C)]
struct Ifreq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl Ifreq {
    fn new(name: &str) -> Ifreq {
        let mut r = Ifreq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn with_flags(name: &str, flags: i16) -> Ifreq {
        let mut r = Ifreq::new(name);
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        r
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn with_inet(name: &str, addr: Ipv4Addr) -> Ifreq {
        let mut r = Ifreq::new(name);
        // struct sockaddr_in: family, port, address.
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&addr.octets());
        r
    }

    fn with_hwaddr(name: &str, mac: [u8; 6]) -> Ifreq {
        let mut r = Ifreq::new(name);
        // struct sockaddr: family (ARPHRD_ETHER), then the address.
        r.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        r.data[2..8].copy_from_slice(&mac);
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The host side's MAC for a TAP denovisor creates for a guest whose MAC is
/// `guest`: the same on every restore of that guest (a random one would
/// leave the guest's ARP entry for the host stale after a restore, and its
/// packets dropped for minutes), never the guest's own (bit 2 of the first
/// byte flipped), unicast and locally administered.
pub fn host_mac_for(guest: [u8; 6]) -> [u8; 6] {
    let mut m = guest;
    m[0] = ((m[0] ^ 0x04) & 0xfe) | 0x02;
    m
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Whether an interface of that name exists in this network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn ioctl_ifreq(fd: RawFd, request: libc::Ioctl, req: &mut Ifreq) -> std::io::Result<()> {
    // SAFETY: `req` is a valid, writable `struct ifreq` (40 bytes) that the
    // TUN/socket ioctls read and write in place.
    let r = unsafe { libc::ioctl(fd, request, req as *mut Ifreq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens `/dev/net/tun` and attaches `name` (a pattern such as `dv%d`
    /// lets the kernel choose) as a TAP with the virtio-net header.
    fn attach(name: &str, exclusive: bool) -> Result<Tap, TapError> {
        check_name(name)?;
        // SAFETY: a NUL-terminated path literal; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(last_err("opening /dev/net/tun"));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if exclusive {
            flags |= libc::IFF_TUN_EXCL;
        }
        let mut req = Ifreq::with_flags(name, flags as i16);
        if let Err(e) = ioctl_ifreq(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) {
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                _ => TapError::Io {
                    op: format!("attaching TAP {name} (TUNSETIFF)"),
                    source: e,
                },
            });
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the valid pointer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(last_err("setting the TAP's vnet header size"));
        }
        let tap = Tap {
            fd,
            name: req.name(),
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Attaches the existing TAP `name` in this network namespace.
    pub fn open_existing(name: &str) -> Result<Tap, TapError> {
        Self::check_existing(name)?;
        Self::attach(name, false)
    }

    /// The checks [`Tap::open_existing`] makes before opening anything.
    pub fn check_existing(name: &str) -> Result<(), TapError> {
        check_name(name)?;
        if !interface_exists(name) {
            return Err(TapError::NoSuchTap(name.to_string()));
        }
        Ok(())
    }

    /// The checks [`Tap::create_in_netns`] makes before opening anything.
    pub fn check_netns(ns: &str, name: Option<&str>, host: Option<&str>) -> Result<(), TapError> {
        if ns.is_empty() {
            return Err(TapError::NoSuchNetns(ns.to_string(), netns_path(ns)));
        }
        let path = netns_path(ns);
        if !Path::new(&path).exists() {
            return Err(TapError::NoSuchNetns(ns.to_string(), path));
        }
        if let Some(name) = name {
            check_name(name)?;
        }
        if let Some(host) = host {
            parse_cidr(host)?;
        }
        Ok(())
    }

    /// Creates a TAP (`name`, default `dv%d`) inside network namespace `ns`
    /// (a name under `/run/netns/`, or a path), sets it up and, with `host`
    /// (`A.B.C.D/N`), gives the host side that address, and with `mac` that
    /// hardware address. The calling thread's namespace does not change: a
    /// short-lived thread enters `ns`.
    pub fn create_in_netns(
        ns: &str,
        name: Option<&str>,
        host: Option<&str>,
        mac: Option<[u8; 6]>,
    ) -> Result<Tap, TapError> {
        Self::check_netns(ns, name, host)?;
        let path = netns_path(ns);
        let host = host.map(parse_cidr).transpose()?;
        let ns_file = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TapError::NoSuchNetns(ns.to_string(), path.clone()),
            _ => TapError::Io {
                op: format!("opening {path}"),
                source: e,
            },
        })?;
        let (name, exclusive) = match name {
            Some(n) => (n.to_string(), true),
            None => ("dv%d".to_string(), false),
        };
        std::thread::Builder::new()
            .name("dv-netns".into())
            .spawn(move || -> Result<Tap, TapError> {
                // SAFETY: setns on a valid namespace fd; it changes only this
                // short-lived thread's network namespace.
                if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(last_err(format!("entering network namespace {path}")));
                }
                let tap = Tap::attach(&name, exclusive)?;
                tap.configure(host, mac)?;
                Ok(tap)
            })
            .map_err(io_err("spawning a thread to enter the namespace"))?
            .join()
            .map_err(|_| TapError::Io {
                op: "entering the network namespace".into(),
                source: std::io::Error::other("the thread panicked"),
            })?
    }

    /// Brings the interface up and sets its IPv4 address and MAC (run in the
    /// TAP's network namespace).
    fn configure(
        &self,
        host: Option<(Ipv4Addr, u8)>,
        mac: Option<[u8; 6]>,
    ) -> Result<(), TapError> {
        // SAFETY: plain socket creation; the result is checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(last_err("creating a configuration socket"));
        }
        // SAFETY: `s` was just created and is owned by nothing else.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let name = &self.name;
        if let Some((addr, prefix)) = host {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let mut req = Ifreq::with_inet(name, addr);
            ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFADDR, &mut req)
                .map_err(io_err(format!("setting {name}'s address")))?;
            let mut req = Ifreq::with_inet(name, Ipv4Addr::from(mask));
            ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req)
                .map_err(io_err(format!("setting {name}'s netmask")))?;
        }
        if let Some(mac) = mac {
            let mut req = Ifreq::with_hwaddr(name, mac);
            ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFHWADDR, &mut req)
                .map_err(io_err(format!("setting {name}'s MAC")))?;
        }
        let mut req = Ifreq::new(name);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)
            .map_err(io_err(format!("reading {name}'s flags")))?;
        let mut up = Ifreq::with_flags(name, req.flags() | libc::IFF_UP as i16);
        ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut up)
            .map_err(io_err(format!("bringing {name} up")))?;
        Ok(())
    }

    /// Tells the TAP which offloads the guest accepts on receive
    /// (`TUN_F_CSUM`, `TUN_F_TSO4`, `TUN_F_TSO6`): frames it hands us may
    /// then carry partial checksums and GSO.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags as the argument value itself.
        // SAFETY: an ioctl with an integer argument on our own TAP fd.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(last_err(format!("setting {}'s offloads", self.name)));
        }
        Ok(())
    }

    /// The interface name (the kernel's choice for a pattern).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's file descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f` on a thread inside a fresh network namespace (root only);
    /// also returns the namespace's path while the thread lives.
    pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce(&str) -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: unshare of the network namespace affects only this thread.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            f(&format!("/proc/self/task/{tid}/ns/net"))
        })
        .join()
        .unwrap()
    }

    #[test]
    fn names_and_addresses_are_checked() {
        assert!(check_name("tap0").is_ok());
        for bad in ["", "a/b", "a b", "x:1", "0123456789abcdef", ".."] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_cidr("10.0.2.1/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 1), 24)
        );
        for bad in ["10.0.2.1", "10.0.2.1/33", "x/1", "10.0.2/8"] {
            assert!(
                matches!(parse_cidr(bad), Err(TapError::BadAddress(_))),
                "{bad}"
            );
        }
        assert_eq!(netns_path("ns1"), "/run/netns/ns1");
        assert_eq!(netns_path("/proc/1/ns/net"), "/proc/1/ns/net");
    }

    #[test]
    fn a_missing_tap_or_namespace_is_refused_without_creating_anything() {
        in_new_netns(|_| {
            let e = Tap::open_existing("dvnothere0").unwrap_err();
            assert!(matches!(e, TapError::NoSuchTap(_)), "{e}");
            assert!(!interface_exists("dvnothere0"), "nothing was created");
            let e = Tap::open_existing("lo").unwrap_err();
            assert!(matches!(e, TapError::NotATap(_)), "{e}");
        });
        let e = Tap::create_in_netns("dv-no-such-ns", None, None, None).unwrap_err();
        assert!(matches!(e, TapError::NoSuchNetns(..)), "{e}");
        assert_eq!(
            e.to_string(),
            "network namespace dv-no-such-ns does not exist (no /run/netns/dv-no-such-ns; create it with `ip netns add dv-no-such-ns`)"
        );
    }

    #[test]
    fn a_host_mac_is_stable_unicast_local_and_never_the_guests() {
        for g in [
            [0x52, 0x54, 0, 1, 2, 3],
            [0x56, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0xff],
            [0xfe; 6],
        ] {
            let h = host_mac_for(g);
            assert_ne!(h, g);
            assert_eq!(h, host_mac_for(g));
            assert_eq!(h[0] & 1, 0, "unicast");
            assert_eq!(h[0] & 2, 2, "locally administered");
            assert_eq!(h[1..], g[1..]);
        }
    }

    #[test]
    fn creates_a_tap_in_a_namespace_that_vanishes_with_its_fd() {
        in_new_netns(|ns| {
            // From this (main) namespace's point of view the new one is
            // another: create the TAP there through its path.
            let guest = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
            let tap = Tap::create_in_netns(
                ns,
                Some("dvt0"),
                Some("10.9.8.1/24"),
                Some(host_mac_for(guest)),
            )
            .unwrap();
            assert_eq!(tap.name(), "dvt0");
            assert!(interface_exists("dvt0"));
            // SAFETY: plain socket creation; the result is checked.
            let s =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            assert!(s >= 0);
            // SAFETY: `s` was just created and is owned by nothing else.
            let s = unsafe { OwnedFd::from_raw_fd(s) };
            let mut req = Ifreq::new("dvt0");
            ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req).unwrap();
            assert_eq!(req.data[2..8], [0x56, 0x54, 0, 0x12, 0x34, 0x56], "derived");
            // Attaching it again while we hold it: busy.
            assert!(matches!(Tap::open_existing("dvt0"), Err(TapError::Busy(_))));
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            drop(tap);
            assert!(
                !interface_exists("dvt0"),
                "not persistent: gone with the fd"
            );
            // A pattern lets the kernel choose the name.
            let tap = Tap::create_in_netns(ns, None, None, None).unwrap();
            assert!(tap.name().starts_with("dv"), "{}", tap.name());
        });
    }
}
