//! virtio-net: transmit chains (virtio-net header + frame gathered from
//! guest buffers) and receive of a frame the input gives into the guest's
//! buffers (mergeable or not), over an arbitrary guest RAM image and queue
//! state. The backend is a datagram socket pair standing in for the TAP.
#![no_main]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use denovisor_core::virtio::net::{NetQueues, NetStats};
use denovisor_core::virtio::worker::Wake;
use denovisor_fuzz::{acceptable, fuzz_target, load_image, queue, ram, Input, QUEUE_HEADER};
use vmm_sys_util::epoll::EventSet;

/// (device end, peer end), both nonblocking.
fn sockets() -> &'static (OwnedFd, OwnedFd) {
    static PAIR: OnceLock<(OwnedFd, OwnedFd)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("a socket pair");
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a.into(), b.into())
    })
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 1 << 16];
    // SAFETY: `buf` is writable for its length; a nonblocking recv.
    while unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {}
}

fuzz_target!(|data| {
    let (dev, peer) = sockets();
    drain(dev);
    drain(peer);
    let mut input = Input::new(data);
    let features = input.u64();
    let mut header = Input::new(input.bytes(2 * QUEUE_HEADER));
    let frame_len = input.u16() as usize % 2048;
    let frame = input.bytes(frame_len);
    let mem = ram();
    load_image(&mem, input.rest());
    let (Some(rx), Some(tx)) = (queue(&mut header, 0, 256), queue(&mut header, 1, 256)) else {
        return;
    };
    if !acceptable(&[&rx, &tx]) {
        return;
    }
    if !frame.is_empty() {
        // SAFETY: `frame` is readable for its length.
        unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }
    let stats = Arc::new(NetStats::default());
    let mut queues = NetQueues::new(mem.mmap().clone(), rx, tx, dev.as_raw_fd(), features, stats);
    let mut notify = |_q: usize| {};
    if queues.handle(Wake::Kick(1), &mut notify).is_ok() {
        let _ = queues.handle(Wake::Fd(0, EventSet::IN), &mut notify);
    }
});
