//! The migration socket, made and used by the core: TypeScript holds its fd
//! and passes it to each call. TCP (with `TCP_NODELAY`: the control frames
//! are small and the downtime waits on them) or a Unix stream socket.

use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::MigrationError;

/// Where a socket goes: `tcp` (`host:port`) or `unix` (a path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `HOST:PORT`.
    Tcp,
    /// A filesystem path.
    Unix,
}

impl Transport {
    /// The transport of an ABI value (0 TCP, 1 Unix).
    pub fn of(value: u32) -> Result<Transport, MigrationError> {
        match value {
            0 => Ok(Transport::Tcp),
            1 => Ok(Transport::Unix),
            _ => Err(MigrationError::Address(format!(
                "unknown transport {value}"
            ))),
        }
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    super::wire::io(op)
}

fn tcp_addrs(target: &str) -> Result<Vec<std::net::SocketAddr>, MigrationError> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| MigrationError::Address(format!("cannot resolve {target}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(MigrationError::Address(format!(
            "{target} resolves to nothing"
        )));
    }
    Ok(addrs)
}

/// Connects to `target`; returns the new socket's fd (the caller closes it
/// with [`close`]).
pub fn connect(
    transport: Transport,
    target: &str,
    timeout: Option<Duration>,
) -> Result<RawFd, MigrationError> {
    match transport {
        Transport::Tcp => {
            let mut last = None;
            for addr in tcp_addrs(target)? {
                let stream = match timeout {
                    Some(t) => TcpStream::connect_timeout(&addr, t),
                    None => TcpStream::connect(addr),
                };
                match stream {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
                        return Ok(s.into_raw_fd());
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(MigrationError::Io {
                op: "connecting",
                source: last.unwrap_or_else(|| std::io::Error::other("no address")),
            })
        }
        Transport::Unix => Ok(UnixStream::connect(target)
            .map_err(io("connecting"))?
            .into_raw_fd()),
    }
}

/// Listens on `target`; returns the listener's fd and its port (0 for Unix).
pub fn listen(transport: Transport, target: &str) -> Result<(RawFd, u16), MigrationError> {
    match transport {
        Transport::Tcp => {
            let l = TcpListener::bind(&tcp_addrs(target)?[..]).map_err(io("listening"))?;
            let port = l.local_addr().map_err(io("listening"))?.port();
            Ok((l.into_raw_fd(), port))
        }
        Transport::Unix => Ok((
            UnixListener::bind(target)
                .map_err(io("listening"))?
                .into_raw_fd(),
            0,
        )),
    }
}

/// Waits for one connection on a listener (at most `timeout`; `None`:
/// forever); returns its fd.
pub fn accept(listener: RawFd, timeout: Option<Duration>) -> Result<RawFd, MigrationError> {
    check_socket(listener)?;
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut pfd = libc::pollfd {
        fd: listener,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            break;
        }
        if n == 0 {
            return Err(MigrationError::TimedOut("waiting for the source"));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io("waiting for the source")(e));
        }
    }
    // SAFETY: accept4 on a listening socket with null address pointers
    // (the peer's address is not wanted).
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io("accepting the source")(std::io::Error::last_os_error()));
    }
    let one: libc::c_int = 1;
    // SAFETY: fd is the socket just accepted; the option value is a c_int
    // of the length given. On a Unix socket this fails harmlessly.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// Closes a socket made here.
pub fn close(fd: RawFd) -> Result<(), MigrationError> {
    check_socket(fd)?;
    // SAFETY: fd is an open socket (checked) the caller owns and gives up.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(())
}

fn check_socket(fd: RawFd) -> Result<(), MigrationError> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 0 {
        return Err(MigrationError::NotASocket(fd));
    }
    // SAFETY: fstat writes one stat into `st`; any fd value is safe to ask about.
    let status = unsafe { libc::fstat(fd, &mut st) };
    if status != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(MigrationError::NotASocket(fd));
    }
    Ok(())
}

/// A connected socket the caller owns, borrowed for one call: reads and
/// writes time out after `timeout`; it is not closed when dropped.
pub struct Borrowed(ManuallyDrop<UnixStream>);

impl Borrowed {
    /// Borrows `fd` (checked to be a socket).
    pub fn new(fd: RawFd, timeout: Option<Duration>) -> Result<Borrowed, MigrationError> {
        check_socket(fd)?;
        // SAFETY: fd is an open socket (checked) that the caller keeps open for
        // this borrow; ManuallyDrop never closes it. Reads, writes and
        // SO_RCVTIMEO/SO_SNDTIMEO are the same calls on TCP and Unix sockets.
        let s = ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
        s.set_read_timeout(timeout)
            .map_err(io("setting a timeout"))?;
        s.set_write_timeout(timeout)
            .map_err(io("setting a timeout"))?;
        Ok(Borrowed(s))
    }
}

impl Read for Borrowed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for Borrowed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{read_header, write_frame, FrameKind};

    #[test]
    fn frames_cross_a_loopback_connection_and_a_silent_peer_times_out() {
        let (l, port) = listen(Transport::Tcp, "127.0.0.1:0").unwrap();
        let c = connect(
            Transport::Tcp,
            &format!("127.0.0.1:{port}"),
            Some(Duration::from_secs(5)),
        )
        .unwrap();
        let a = accept(l, Some(Duration::from_secs(5))).unwrap();
        let mut tx = Borrowed::new(c, None).unwrap();
        write_frame(&mut tx, FrameKind::Ready, b"{}").unwrap();
        let mut rx = Borrowed::new(a, Some(Duration::from_millis(100))).unwrap();
        assert_eq!(read_header(&mut rx).unwrap().kind, FrameKind::Ready);
        let mut two = [0u8; 2];
        rx.read_exact(&mut two).unwrap();
        assert!(matches!(
            read_header(&mut rx),
            Err(MigrationError::TimedOut(_))
        ));
        assert!(matches!(
            accept(l, Some(Duration::from_millis(10))),
            Err(MigrationError::TimedOut(_))
        ));
        for fd in [a, c, l] {
            close(fd).unwrap();
        }
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert!(
            matches!(Borrowed::new(fd, None).map(|_| ()), Err(MigrationError::NotASocket(n)) if n == fd)
        );
    }
}
