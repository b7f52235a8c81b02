//! The vsock device driven through its real queues (the unit-test virtio-pci
//! driver) against real Unix sockets, and its queue handling fuzzed with
//! random descriptor tables.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::muxer::{ConnKey, Phase, CONN_BUF};
use super::packet::{op, Header, HDR_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::test_rng::XorShift;
use crate::virtio::status;
use crate::virtio::test_driver::{Buf, TestDriver, BUFFERS};

const GUEST_CID: u64 = 3;
/// Receive buffers: one descriptor each, at `RX_BUFS + head * RX_STRIDE`.
const RX_BUFS: u64 = BUFFERS;
const RX_STRIDE: u64 = 0x2000;
const RX_LEN: u32 = (HDR_SIZE + 4096) as u32;
/// The one transmit packet in flight: header, then payload.
const TX_HDR: u64 = 0x80_0000;
const TX_DATA: u64 = 0x80_1000;

/// A scratch directory for one test's sockets.
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dv-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `v.sock` in a scratch directory of its own.
fn socket_path(name: &str) -> String {
    scratch_dir(name)
        .join("v.sock")
        .to_str()
        .unwrap()
        .to_string()
}

/// A guest driver of the vsock device.
struct Guest {
    d: TestDriver,
    rx_posted: u64,
    engine: Arc<Mutex<Option<Engine>>>,
}

impl Guest {
    fn new(path: &str) -> Guest {
        let dev = Vsock::new(GUEST_CID, path).unwrap();
        let engine = dev.engine.clone();
        let mut d = TestDriver::new(Box::new(dev));
        let s = d.start(0);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
        let mut g = Guest {
            d,
            rx_posted: 0,
            engine,
        };
        for _ in 0..16 {
            g.post_rx();
        }
        g
    }

    fn post_rx(&mut self) {
        let slot = self.rx_posted % u64::from(QUEUE_SIZE);
        let head = self
            .d
            .post(RX, &[Buf::writable(RX_BUFS + slot * RX_STRIDE, RX_LEN)]);
        assert_eq!(u64::from(head), slot);
        self.rx_posted += 1;
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 << 10,
            fwd_cnt: 0,
        }
    }

    /// Sends one packet and waits for the device to take it.
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        h.len = payload.len() as u32;
        self.d.mem.write(TX_HDR, &h.to_bytes()).unwrap();
        let mut bufs = vec![Buf::readable(TX_HDR, HDR_SIZE as u32)];
        if !payload.is_empty() {
            self.d.mem.write(TX_DATA, payload).unwrap();
            bufs.push(Buf::readable(TX_DATA, payload.len() as u32));
        }
        let head = self.d.post(TX, &bufs);
        assert_eq!(self.d.wait_used(TX), Some((u32::from(head), 0)));
    }

    /// The next packet the device put in rx (and a fresh buffer for it).
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (id, len) = self.d.wait_used(RX).expect("an rx packet");
        let at = RX_BUFS + u64::from(id) * RX_STRIDE;
        let mut raw = [0u8; HDR_SIZE];
        self.d.mem.read(at, &mut raw).unwrap();
        let h = Header::from_bytes(&raw);
        assert_eq!(len as usize, HDR_SIZE + h.len as usize, "{h:?}");
        let mut payload = vec![0u8; h.len as usize];
        self.d.mem.read(at + HDR_SIZE as u64, &mut payload).unwrap();
        self.post_rx();
        (h, payload)
    }

    /// No rx packet arrives within `ms`.
    fn quiet(&mut self, ms: u64) -> bool {
        std::thread::sleep(Duration::from_millis(ms));
        u64::from(self.d.used_idx(RX)) + 16 == self.rx_posted
    }

    fn state(&self) -> Vec<super::muxer::ConnectionState> {
        let e = self.engine.lock().unwrap();
        e.as_ref().map(|e| e.muxer.state()).unwrap_or_default()
    }

    fn buffered(&self) -> usize {
        let e = self.engine.lock().unwrap();
        e.as_ref().map(|e| e.muxer.buffered()).unwrap_or(0)
    }
}

fn read_line(s: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn the_guest_reaches_a_host_listener_on_path_port_and_bytes_flow_both_ways() {
    let path = socket_path("g2h");
    let host = UnixListener::bind(format!("{path}_1234")).unwrap();
    let mut g = Guest::new(&path);

    g.send(g.hdr(op::REQUEST, 5000, 1234), &[]);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (op::RESPONSE, HOST_CID, GUEST_CID, 1234, 5000)
    );
    assert_eq!(h.buf_alloc, CONN_BUF);
    let (mut s, _) = host.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send(g.hdr(op::RW, 5000, 1234), b"hello");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    s.write_all(b"world").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, 1234, 5000));
    assert_eq!(data, b"world");
    assert_eq!(h.fwd_cnt, 5, "the guest learns the host took its 5 bytes");
    let st = g.state();
    assert_eq!(st.len(), 1);
    assert_eq!(
        (st[0].phase, st[0].rx_cnt, st[0].tx_cnt),
        (Phase::Established, 5, 5)
    );

    // The host closes: the guest hears SHUTDOWN(SEND); the guest closes:
    // its close completes with RST and the connection is gone.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    let mut close = g.hdr(op::SHUTDOWN, 5000, 1234);
    close.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(close, &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 1234, 5000));
    assert!(g.state().is_empty());
}

#[test]
fn a_request_to_a_port_nobody_listens_on_is_reset() {
    let path = socket_path("refused");
    let mut g = Guest::new(&path);
    g.send(g.hdr(op::REQUEST, 7, 99), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 99, 7));
    // Data for a connection that does not exist is reset too.
    g.send(g.hdr(op::RW, 7, 99), b"x");
    assert_eq!(g.recv().0.op, op::RST);
    assert!(g.state().is_empty());
}

#[test]
fn a_host_program_connects_with_connect_p_and_reads_ok_and_its_port() {
    let path = socket_path("h2g");
    let mut g = Guest::new(&path);

    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The data right behind the line is not taken as part of it.
    s.write_all(b"CONNECT 52\nping").unwrap();
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.dst_port),
        (op::REQUEST, HOST_CID, GUEST_CID, 52)
    );
    let local = h.src_port;
    assert!((1 << 30..1 << 31).contains(&local), "host port {local}");
    assert!(g.quiet(50), "no data before the guest accepts");

    g.send(g.hdr(op::RESPONSE, 52, local), &[]);
    assert_eq!(read_line(&s), format!("OK {local}\n"));
    let (h, data) = g.recv();
    assert_eq!(
        (h.op, h.dst_port, data.as_slice()),
        (op::RW, 52, &b"ping"[..])
    );
    g.send(g.hdr(op::RW, 52, local), b"pong");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    // A second host connection gets the next port; a guest that refuses it
    // (RST) closes the host stream without an OK.
    let mut s2 = UnixStream::connect(&path).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s2.write_all(b"connect 53\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port, h.src_port), (op::REQUEST, 53, local + 1));
    g.send(g.hdr(op::RST, 53, local + 1), &[]);
    let mut rest = Vec::new();
    s2.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");

    // A malformed line is dropped without a word to the guest.
    let mut s3 = UnixStream::connect(&path).unwrap();
    s3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s3.write_all(b"OPEN 52\n").unwrap();
    s3.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(g.quiet(50));
    assert_eq!(g.state().len(), 1);
}

#[test]
fn a_request_the_guest_never_answers_and_a_silent_host_stream_are_given_up() {
    let path = socket_path("timeout");
    let mut g = Guest::new(&path);
    let start = std::time::Instant::now();
    let mut silent = UnixStream::connect(&path).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, op::REQUEST);
    // The guest never answers: after REQUEST_TIMEOUT it is told RST and the
    // host stream ends without an OK.
    let (r, _) = g.recv();
    assert_eq!(
        (r.op, r.src_port, r.dst_port),
        (op::RST, h.src_port, h.dst_port)
    );
    assert!(start.elapsed() >= super::muxer::REQUEST_TIMEOUT);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    silent.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(g.state().is_empty());
}

#[test]
fn a_slow_host_reader_bounds_what_the_vmm_holds_and_an_overrun_is_reset() {
    let path = socket_path("credit-in");
    let host = UnixListener::bind(format!("{path}_80")).unwrap();
    let mut g = Guest::new(&path);
    g.send(g.hdr(op::REQUEST, 9, 80), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let (s, _) = host.accept().unwrap();

    // The host reads nothing; the guest ignores its credit and keeps
    // sending. The socket fills, the VMM holds at most CONN_BUF, and the
    // packet that would pass it resets the connection.
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0usize;
    while !g.state().is_empty() {
        assert!(sent < 64 << 20, "never reset");
        let held = g.buffered();
        assert!(held <= CONN_BUF as usize, "the VMM holds {held} bytes");
        g.send(g.hdr(op::RW, 9, 80), &chunk);
        sent += chunk.len();
    }
    assert!(sent > CONN_BUF as usize, "reset after {sent} bytes");
    assert_eq!(g.buffered(), 0);
    loop {
        let (h, _) = g.recv();
        if h.op == op::RST {
            assert_eq!((h.src_port, h.dst_port), (80, 9));
            break;
        }
        // Credit updates for what the socket took come first.
        assert_eq!(h.op, op::CREDIT_UPDATE);
    }
    drop(s);
}

#[test]
fn host_bytes_stop_at_the_guests_credit_until_it_updates() {
    let path = socket_path("credit-out");
    let host = UnixListener::bind(format!("{path}_80")).unwrap();
    let mut g = Guest::new(&path);
    let mut req = g.hdr(op::REQUEST, 9, 80);
    req.buf_alloc = 6000;
    g.send(req, &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let (mut s, _) = host.accept().unwrap();
    s.write_all(&[7u8; 10000]).unwrap();

    let mut got = 0usize;
    let mut asked = false;
    while !asked {
        let (h, data) = g.recv();
        match h.op {
            op::RW => got += data.len(),
            op::CREDIT_REQUEST => asked = true,
            other => panic!("op {other}"),
        }
    }
    assert_eq!(got, 6000, "exactly the guest's buffer");
    assert!(g.quiet(100), "nothing past the credit");

    let mut update = g.hdr(op::CREDIT_UPDATE, 9, 80);
    update.buf_alloc = 6000;
    update.fwd_cnt = 6000;
    g.send(update, &[]);
    while got < 10000 {
        let (h, data) = g.recv();
        assert_eq!(h.op, op::RW);
        got += data.len();
    }
    assert_eq!(got, 10000);
}

#[test]
fn a_guest_credit_request_gets_a_credit_update() {
    let path = socket_path("credit-req");
    let _host = UnixListener::bind(format!("{path}_80")).unwrap();
    let mut g = Guest::new(&path);
    g.send(g.hdr(op::REQUEST, 9, 80), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    g.send(g.hdr(op::CREDIT_REQUEST, 9, 80), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.buf_alloc), (op::CREDIT_UPDATE, CONN_BUF));
}

/// Posts one raw tx chain whose descriptors are `descs` (addr, len, flags,
/// next), at table indices 0.., and waits for NEEDS_RESET.
/// Where the tests' event buffers go.
const EVENTS: u64 = 0x90_0000;

/// Posts a 4-byte event buffer (filled with 0xff) at `EVENTS + 16 * n`.
fn post_event(g: &mut Guest, n: u64) -> u16 {
    g.d.mem.write(EVENTS + 16 * n, &[0xff; 4]).unwrap();
    g.d.post(EVENT, &[Buf::writable(EVENTS + 16 * n, 4)])
}

fn transport_reset(g: &mut Guest) -> serde_json::Value {
    g.d.dev
        .control(&serde_json::json!({"op": "transport_reset"}))
        .unwrap()
}

#[test]
fn a_transport_reset_closes_every_host_stream_and_tells_the_guest_on_the_event_queue() {
    let path = socket_path("reset");
    let host = UnixListener::bind(format!("{path}_1234")).unwrap();
    let mut g = Guest::new(&path);
    // One connection the guest made, one a host program made, one host
    // stream that has not sent its CONNECT line yet.
    g.send(g.hdr(op::REQUEST, 5000, 1234), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let (mut s1, _) = host.accept().unwrap();
    let mut s2 = UnixStream::connect(&path).unwrap();
    s2.write_all(b"CONNECT 52\n").unwrap();
    let (h, _) = g.recv();
    g.send(g.hdr(op::RESPONSE, 52, h.src_port), &[]);
    assert_eq!(read_line(&s2), format!("OK {}\n", h.src_port));
    let mut s3 = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let fired_before = g.d.irqs.fired.lock().unwrap().len();

    // No event buffer yet: the event waits for one.
    let r = transport_reset(&mut g);
    assert_eq!(r["event"], "pending", "{r}");
    assert!(r["closed"].as_u64().unwrap() >= 2, "{r}");
    assert!(g.state().is_empty());
    for s in [&mut s1, &mut s2, &mut s3] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
    // Nothing more for the old connections in rx (no RST, no data).
    assert!(g.quiet(50));

    let head = post_event(&mut g, 0);
    assert_eq!(g.d.wait_used(EVENT), Some((u32::from(head), 4)));
    let mut id = [0u8; 4];
    g.d.mem.read(EVENTS, &mut id).unwrap();
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(g.d.irqs.fired.lock().unwrap()[fired_before..].contains(&(EVENT as u16)));

    // With a buffer there (Linux keeps eight) the event goes at once, and
    // once only.
    let head = post_event(&mut g, 1);
    post_event(&mut g, 2);
    assert!(g.quiet(20));
    let r = transport_reset(&mut g);
    assert_eq!(
        (r["closed"].as_u64(), r["event"].as_str()),
        (Some(0), Some("posted"))
    );
    assert_eq!(g.d.wait_used(EVENT), Some((u32::from(head), 4)));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.d.used_idx(EVENT), 2, "one event per reset");

    // The guest connects again as before.
    g.send(g.hdr(op::REQUEST, 5001, 1234), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let (mut s4, _) = host.accept().unwrap();
    g.send(g.hdr(op::RW, 5001, 1234), b"again");
    let mut got = [0u8; 5];
    s4.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
}

#[test]
fn transport_reset_requests_before_the_driver_and_bad_event_buffers() {
    let path = socket_path("reset-bad");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let r = dev
        .control(&serde_json::json!({"op": "transport_reset"}))
        .unwrap();
    assert_eq!(r, serde_json::json!({"closed": 0, "event": "none"}));
    assert!(matches!(
        dev.control(&serde_json::json!({"op": "reset"})),
        Err(VirtioError::Unsupported(_))
    ));
    drop(dev);
    // A device-readable event buffer, then one too short for an event.
    for (len, write) in [(4, false), (2, true)] {
        let mut g = Guest::new(&path);
        g.d.post(
            EVENT,
            &[Buf {
                addr: EVENTS,
                len,
                write,
            }],
        );
        assert!(g.quiet(20));
        assert!(g
            .d
            .dev
            .control(&serde_json::json!({"op": "transport_reset"}))
            .is_err());
        assert!(g.d.wait_needs_reset(), "len {len} write {write}");
        // The device comes back after a reset.
        let s = g.d.start(0);
        assert_eq!(s & status::NEEDS_RESET, 0);
        drop(g);
    }
}

fn broken_tx_resets(name: &str, setup: impl FnOnce(&mut TestDriver)) {
    let path = socket_path(name);
    let mut g = Guest::new(&path);
    setup(&mut g.d);
    assert!(g.d.wait_needs_reset(), "{name}: NEEDS_RESET");
    // The device comes back after a reset.
    let s = g.d.start(0);
    assert_eq!(s & status::NEEDS_RESET, 0, "{name}: status {s:#x}");
}

#[test]
fn broken_chains_stop_the_device_with_needs_reset() {
    let good = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        kind: TYPE_STREAM,
        op: op::REQUEST,
        ..Header::default()
    };
    let write_hdr = |d: &mut TestDriver, h: Header| d.mem.write(TX_HDR, &h.to_bytes()).unwrap();
    broken_tx_resets("writable-tx", |d| {
        write_hdr(d, good);
        d.post(TX, &[Buf::writable(TX_HDR, 44)]);
    });
    broken_tx_resets("short-header", |d| {
        d.post(TX, &[Buf::readable(TX_HDR, 20)]);
    });
    broken_tx_resets("oversized", |d| {
        let mut h = good;
        h.op = op::RW;
        h.len = 1 << 20;
        write_hdr(d, h);
        d.post(
            TX,
            &[Buf::readable(TX_HDR, 44), Buf::readable(TX_DATA, 1 << 20)],
        );
    });
    broken_tx_resets("truncated", |d| {
        let mut h = good;
        h.op = op::RW;
        h.len = 100;
        write_hdr(d, h);
        d.post(TX, &[Buf::readable(TX_HDR, 44 + 50)]);
    });
    broken_tx_resets("outside-ram", |d| {
        d.post(TX, &[Buf::readable((16 << 20) - 8, 44)]);
    });
    broken_tx_resets("loop", |d| {
        write_hdr(d, good);
        // Descriptor 0 → 1 → 0 → ...
        d.set_desc(TX, 0, TX_HDR, 44, 1, 1);
        d.set_desc(TX, 1, TX_DATA, 8, 1, 0);
        d.publish(TX, 0);
    });
    broken_tx_resets("next-outside-queue", |d| {
        write_hdr(d, good);
        d.set_desc(TX, 0, TX_HDR, 44, 1, 999);
        d.publish(TX, 0);
    });
    // An rx buffer too small for a header, when there is a packet to give.
    broken_tx_resets("short-rx", |d| {
        let mut h = Header {
            dst_port: 4,
            src_port: 5,
            ..good
        };
        h.op = op::RW; // to no connection: answered with RST
        write_hdr(d, h);
        d.post(RX, &[Buf::writable(RX_BUFS, 16)]);
        // The driver's first 16 rx buffers are fine; exhaust them first.
        for _ in 0..16 {
            d.post(TX, &[Buf::readable(TX_HDR, 44)]);
            std::thread::sleep(Duration::from_millis(2));
        }
        d.post(TX, &[Buf::readable(TX_HDR, 44)]);
    });
}

#[test]
fn a_bad_host_side_is_a_one_line_error_before_anything_runs() {
    let dir = scratch_dir("bad");
    let missing = dir.join("nope/v.sock").to_str().unwrap().to_string();
    let e = Vsock::new(3, &missing).err().unwrap();
    assert!(matches!(e, VsockError::MissingDirectory(_)), "{e}");
    assert_eq!(
        e.to_string(),
        format!("vsock path {missing}: its directory does not exist")
    );
    let taken = dir.join("taken").to_str().unwrap().to_string();
    std::fs::write(&taken, b"").unwrap();
    assert!(matches!(
        Vsock::new(3, &taken),
        Err(VsockError::PathExists(_))
    ));
    let ok = dir.join("v.sock").to_str().unwrap().to_string();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(Vsock::new(cid, &ok), Err(VsockError::BadCid(c)) if c == cid));
    }
    assert!(matches!(Vsock::new(3, ""), Err(VsockError::EmptyPath)));
    let long = format!("/tmp/{}", "x".repeat(100));
    assert!(matches!(
        Vsock::new(3, &long),
        Err(VsockError::PathTooLong(_))
    ));
    for e in [
        Vsock::new(3, &missing).err().unwrap(),
        Vsock::new(2, &ok).err().unwrap(),
        Vsock::new(3, &long).err().unwrap(),
    ] {
        assert!(!e.to_string().contains('\n'));
    }
    // A good one listens at once and removes its socket when dropped.
    let dev = Vsock::new(3, &ok).unwrap();
    assert!(UnixStream::connect(&ok).is_ok());
    drop(dev);
    assert!(!std::path::Path::new(&ok).exists());
}

#[test]
fn the_device_state_is_plain_data_that_round_trips() {
    let path = socket_path("state");
    let _host = UnixListener::bind(format!("{path}_80")).unwrap();
    let dev = Vsock::new(GUEST_CID, &path).unwrap();
    let engine = dev.engine.clone();
    let mut d = TestDriver::new(Box::new(dev));
    d.start(0);
    let mut g = Guest {
        d,
        rx_posted: 0,
        engine,
    };
    g.post_rx();
    g.send(g.hdr(op::REQUEST, 9, 80), &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let state = VsockState {
        cid: GUEST_CID,
        path: path.clone(),
        connections: g.state(),
    };
    assert_eq!(state.connections.len(), 1);
    assert_eq!(
        state.connections[0].key,
        ConnKey {
            local_port: 80,
            peer_port: 9
        }
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    assert!(json.contains("\"localPort\":80"), "{json}");
}

/// The fuzz cases: `DENOVISOR_FUZZ_CASES` (default 2,000).
fn fuzz_cases() -> u64 {
    std::env::var("DENOVISOR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

const FUZZ_RAM: u64 = 1 << 20;
const CANARY: u64 = 0xa_0000;
const CANARY_LEN: usize = 0x1_0000;

/// A queue of size 16 with its rings at `base`.
fn fuzz_queue(base: u64) -> Queue {
    let mut q = Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(base)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(base + 0x100))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(base + 0x200))
        .unwrap();
    q.set_ready(true);
    q
}

/// Random descriptors, headers and avail entries for the queue at `base`.
fn fuzz_fill(rng: &mut XorShift, mem: &GuestRam, base: u64) {
    for i in 0..16u64 {
        let addr = match rng.next_u64() % 16 {
            0 => FUZZ_RAM - (rng.next_u64() % 64),
            1 => rng.next_u64(),
            _ => 0x1000 + rng.next_u64() % 0x7_0000,
        };
        let len = match rng.next_u64() % 8 {
            0 => rng.next_u64() as u32,
            1 => (rng.next_u64() % 0x1_0000) as u32,
            2 => HDR_SIZE as u32,
            _ => (rng.next_u64() % 200) as u32,
        };
        let flags = match rng.next_u64() % 10 {
            0 => rng.next_u64() as u16,
            1..=4 => 1,
            5 | 6 => 2,
            7 => 3,
            _ => 0,
        };
        let next = (rng.next_u64() % 20) as u16;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(base + 16 * i, &d).unwrap();
        if addr + 64 < FUZZ_RAM && !(CANARY..CANARY + CANARY_LEN as u64).contains(&addr) {
            let h = Header {
                src_cid: if rng.next_u64().is_multiple_of(8) {
                    7
                } else {
                    GUEST_CID
                },
                dst_cid: if rng.next_u64().is_multiple_of(8) {
                    9
                } else {
                    HOST_CID
                },
                src_port: (rng.next_u64() % 4) as u32,
                dst_port: (rng.next_u64() % 4) as u32,
                len: match rng.next_u64() % 4 {
                    0 => rng.next_u64() as u32,
                    _ => (rng.next_u64() % 300) as u32,
                },
                kind: if rng.next_u64().is_multiple_of(8) {
                    2
                } else {
                    TYPE_STREAM
                },
                op: (rng.next_u64() % 9) as u16,
                flags: (rng.next_u64() % 4) as u32,
                buf_alloc: rng.next_u64() as u32,
                fwd_cnt: rng.next_u64() as u32,
            };
            let _ = mem.write(addr, &h.to_bytes());
        }
    }
    let count = match rng.next_u64() % 8 {
        0 => rng.next_u64() as u16,
        _ => (rng.next_u64() % 8) as u16,
    };
    for slot in 0..16u64 {
        let head = (rng.next_u64() % 18) as u16;
        mem.write(base + 0x100 + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
    }
    mem.write(base + 0x100 + 2, &count.to_le_bytes()).unwrap();
}

#[test]
fn random_descriptor_tables_never_crash_or_write_outside_their_buffers() {
    let path = socket_path("fuzz");
    // Ports 1 and 3 have host listeners (never read: credit must hold).
    let _l1 = UnixListener::bind(format!("{path}_1")).unwrap();
    let _l3 = UnixListener::bind(format!("{path}_3")).unwrap();
    let dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mut rng = XorShift::new(0x5eed_f00d_50c4);
    let (mut ok, mut failed) = (0u64, 0u64);
    for case in 0..fuzz_cases() {
        let mem = GuestRam::new(FUZZ_RAM).unwrap();
        mem.mmap()
            .write_slice(&[0xcc; CANARY_LEN], GuestAddress(CANARY))
            .unwrap();
        let muxer = Muxer::new(
            GUEST_CID,
            path.clone(),
            dev.listener.try_clone().unwrap(),
            dev.stats.clone(),
        )
        .unwrap();
        let mut e = Engine::new(
            mem.clone(),
            fuzz_queue(0x8_0000),
            fuzz_queue(0x9_0000),
            Some(fuzz_queue(0xc_0000)),
            muxer,
        );
        let mut result = Ok(());
        for round in 0..3 {
            fuzz_fill(&mut rng, &mem, 0x8_0000);
            fuzz_fill(&mut rng, &mem, 0x9_0000);
            fuzz_fill(&mut rng, &mem, 0xc_0000);
            let wake = if round % 2 == 0 {
                Wake::Kick(TX)
            } else {
                Wake::Kick(RX)
            };
            result = e.handle(wake, &mut |_| {});
            if result.is_ok() && round == 1 {
                result = e.transport_reset(&mut |_| {}).map(|_| ());
            }
            assert!(e.muxer.buffered() <= e.muxer.state().len() * CONN_BUF as usize);
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
        let mut canary = vec![0u8; CANARY_LEN];
        mem.mmap()
            .read_slice(&mut canary, GuestAddress(CANARY))
            .unwrap();
        assert!(
            canary.iter().all(|&b| b == 0xcc),
            "case {case}: a write outside every buffer"
        );
        // Every used element's length fits a packet.
        let mut used = [0u8; 4 + 8 * 16];
        mem.read(0x8_0200, &mut used).unwrap();
        for el in used[4..].chunks(8) {
            let len = u32::from_le_bytes(el[4..8].try_into().unwrap());
            assert!(len as usize <= HDR_SIZE + MAX_PAYLOAD, "case {case}: {len}");
        }
        // An event is 4 bytes.
        mem.read(0xc_0200, &mut used).unwrap();
        for el in used[4..].chunks(8) {
            let len = u32::from_le_bytes(el[4..8].try_into().unwrap());
            assert!(len == 0 || len == EVENT_LEN, "case {case}: event {len}");
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
}

#[test]
fn host_bytes_sent_while_paused_wait_in_the_socket_until_resume() {
    let path = socket_path("pause");
    let host = UnixListener::bind(format!("{path}_1234")).unwrap();
    let mut g = Guest::new(&path);
    g.send(g.hdr(op::REQUEST, 5000, 1234), &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, op::RESPONSE);
    let (mut s, _) = host.accept().unwrap();

    g.d.dev.pause(Duration::from_secs(5)).unwrap();
    let mut rx = vec![0u8; 16 * RX_STRIDE as usize];
    g.d.mem.read(RX_BUFS, &mut rx).unwrap();
    s.write_all(b"while paused").unwrap();
    assert!(g.quiet(300), "a paused device delivered host bytes");
    let mut still = vec![0u8; rx.len()];
    g.d.mem.read(RX_BUFS, &mut still).unwrap();
    assert!(rx == still, "a paused device wrote its rx buffers");
    assert!(
        matches!(transport_reset_result(&mut g), Err(VirtioError::Paused)),
        "a runtime request that writes guest memory is refused while paused"
    );

    g.d.dev.resume();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"while paused"[..]));
}

fn transport_reset_result(g: &mut Guest) -> Result<serde_json::Value, VirtioError> {
    g.d.dev
        .control(&serde_json::json!({"op": "transport_reset"}))
}

#[test]
fn a_socket_path_is_handed_over_between_two_devices_and_never_held_by_both() {
    let path = socket_path("handover");
    let mut source = Vsock::new(3, &path).unwrap();
    // The target builds while the source holds the path; it cannot take it yet.
    let mut target = Vsock::new_unclaimed(3, &path).unwrap();
    let Err(VirtioError::Malformed(m)) = target.take_over() else {
        panic!("the target took a path the source holds");
    };
    assert!(m.contains("held by another process"), "{m}");
    UnixStream::connect(&path).unwrap();
    source.listener.set_nonblocking(true).unwrap();
    assert!(
        source.listener.accept().is_ok(),
        "the source still answers on the path"
    );

    source.hand_over().unwrap();
    source.hand_over().unwrap();
    assert!(
        UnixStream::connect(&path).is_err(),
        "nothing at the path between the two"
    );
    target.take_over().unwrap();
    target.take_over().unwrap();
    UnixStream::connect(&path).unwrap();
    target.listener.set_nonblocking(true).unwrap();
    assert!(
        target.listener.accept().is_ok(),
        "the path reaches the target now"
    );
    // A failed migration's source cannot take it back from the target.
    assert!(source.take_over().is_err());
    drop(source);
    assert!(
        Path::new(&path).exists(),
        "the source removed the target's socket"
    );
    drop(target);
    assert!(!Path::new(&path).exists());
}

#[test]
fn a_source_takes_its_path_back_when_the_target_never_did() {
    let path = socket_path("takeback");
    let mut source = Vsock::new(3, &path).unwrap();
    source.hand_over().unwrap();
    source.take_over().unwrap();
    UnixStream::connect(&path).unwrap();
    drop(source);
    assert!(!Path::new(&path).exists());
}
