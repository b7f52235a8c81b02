//! virtio-rng: an entropy source fed from the host's `getrandom(2)`, so the
//! guest's `/dev/hwrng` (and its CRNG at boot) has real entropy.
//!
//! One queue of device-writable buffers; each request is filled up to
//! [`MAX_REQUEST`] bytes, so a guest asking for a huge buffer gets a bounded
//! answer instead of stalling the worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::worker::Worker;
use super::{device_type, drain_queue, Activation, Interrupt, VirtioDevice, VirtioError};
use crate::memory::GuestRam;

/// The queue's size.
const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets.
pub const MAX_REQUEST: usize = 64 << 10;

/// Counters a listing shows.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
    stats: Arc<Stats>,
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the valid,
        // exclusively borrowed buffer tail it is given.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

/// Serves every available request; false when the queue is broken.
fn serve(queue: &mut Queue, mem: &GuestRam, interrupt: &Interrupt, stats: &Stats) -> bool {
    let m = mem.mmap();
    let mut scratch = vec![0u8; MAX_REQUEST];
    drain_queue(queue, m, interrupt, 0, |chain| {
        let mut written = 0usize;
        let mut ended = true;
        for desc in chain {
            // virtio-queue stops a chain that loops or whose `next` is
            // past the queue after `size` descriptors: the last one it
            // yields then still says NEXT. That chain is a driver bug.
            ended = !desc.has_next();
            if !desc.is_write_only() {
                continue;
            }
            let len = (desc.len() as usize).min(MAX_REQUEST - written);
            if len == 0 {
                continue;
            }
            if !fill_random(&mut scratch[..len])
                || m.write_slice(&scratch[..len], desc.addr()).is_err()
            {
                return None;
            }
            written += len;
        }
        if !ended {
            return None;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(written as u64, Ordering::Relaxed);
        Some(written as u32)
    })
}

/// Serves every available request of `queue` over `mem` on the calling
/// thread (the fuzz targets' entry point). False when the queue is broken.
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub fn serve_for_fuzz(queue: &mut Queue, mem: &GuestRam, interrupt: &Interrupt) -> bool {
    serve(queue, mem, interrupt, &Stats::default())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        device_type::RNG
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let stats = self.stats.clone();
        self.worker = Some(Worker::one_queue(
            "virtio-rng",
            a,
            move |queue, mem, interrupt| serve(queue, mem, interrupt, &stats),
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "rng",
            "requests": self.stats.requests.load(Ordering::Relaxed),
            "bytes": self.stats.bytes.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::status;
    use crate::virtio::test_driver::{used_idx, Buf, TestDriver, BUFFERS};

    #[test]
    fn fills_requests_with_random_bytes_and_interrupts() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        let s = d.start(0);
        assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "status {s:#x}");
        let head = d.post(
            0,
            &[
                Buf::writable(BUFFERS, 64),
                Buf::writable(BUFFERS + 0x1000, 64),
            ],
        );
        assert_eq!(d.wait_used(0), Some((head as u32, 128)));
        let mut a = [0u8; 64];
        d.mem.read(BUFFERS, &mut a).unwrap();
        assert_ne!(a, [0u8; 64]);
        // Vector 0 fired (MSI-X routes were programmed for it).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.irqs.fired.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(d.irqs.fired.lock().unwrap()[0], 0);
        // A huge request is bounded.
        let head = d.post(0, &[Buf::writable(BUFFERS, 1 << 20)]);
        assert_eq!(d.wait_used(0), Some((head as u32, MAX_REQUEST as u32)));
    }

    #[test]
    fn a_chain_that_does_not_end_stops_the_device_with_needs_reset() {
        // 0 -> 1 -> 0: a loop; then a `next` past the queue's size.
        for (first_next, second_next) in [(1u16, 0u16), (QUEUE_SIZE, 0)] {
            let mut d = TestDriver::new(Box::new(Rng::default()));
            d.start(0);
            d.set_desc(0, 0, BUFFERS, 16, 1 | 2, first_next);
            d.set_desc(0, 1, BUFFERS + 16, 16, 1 | 2, second_next);
            d.publish(0, 0);
            assert!(d.wait_needs_reset(), "next {first_next}");
            assert_eq!(d.wait_used(0), None, "no used element for a broken chain");
            // A reset brings it back.
            d.start(0);
            let head = d.post(0, &[Buf::writable(BUFFERS, 8)]);
            assert_eq!(d.wait_used(0), Some((head as u32, 8)));
        }
    }

    #[test]
    fn an_avail_index_more_than_a_queue_ahead_stops_the_device_instead_of_spinning() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.set_desc(0, 0, BUFFERS, 16, 2, 0);
        // The ring's index claims QUEUE_SIZE + 5 new entries.
        d.mem
            .write(
                0x10_0000 + 16 * QUEUE_SIZE as u64 + 2,
                &(QUEUE_SIZE + 5).to_le_bytes(),
            )
            .unwrap();
        d.write(0x3000, &0u16.to_le_bytes());
        assert!(d.wait_needs_reset());
    }

    #[test]
    fn a_driver_posting_while_the_device_drains_never_stops_it() {
        // A wake whose requests an earlier pass already served finds the
        // ring empty; a request published right then is more work, not a
        // broken ring. One thread publishes requests as fast as it can while
        // this one kicks, so the device keeps waking to a ring that is empty
        // just as a request arrives.
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        // The avail ring (see test_driver's layout).
        let avail = 0x10_0000 + 16 * QUEUE_SIZE as u64;
        let read_used = |mem: &GuestRam| used_idx(mem, 0);
        // Every request is descriptor 0, one byte.
        d.set_desc(0, 0, BUFFERS, 1, 2, 0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mem = d.mem.clone();
        let poster = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut posted = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    if posted.wrapping_sub(read_used(&mem)) >= QUEUE_SIZE / 2 {
                        std::hint::spin_loop();
                        continue;
                    }
                    let slot = (posted % QUEUE_SIZE) as u64;
                    mem.write(avail + 4 + 2 * slot, &0u16.to_le_bytes())
                        .unwrap();
                    posted = posted.wrapping_add(1);
                    mem.write(avail + 2, &posted.to_le_bytes()).unwrap();
                    // A pause of varying length, so the device often empties
                    // the ring while this thread is running.
                    for _ in 0..(posted % 64) * 16 {
                        std::hint::spin_loop();
                    }
                }
                posted
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut broken = false;
        while std::time::Instant::now() < deadline && !broken {
            d.write(0x3000, &0u16.to_le_bytes());
            broken = d.read8(0x14) & status::NEEDS_RESET != 0;
        }
        stop.store(true, Ordering::Relaxed);
        let posted = poster.join().unwrap();
        assert!(
            !broken,
            "NEEDS_RESET with {posted} posted, {} used",
            read_used(&d.mem)
        );
        // The last ones are served on the last kick.
        d.write(0x3000, &0u16.to_le_bytes());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read_used(&d.mem) != posted && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(read_used(&d.mem), posted, "every request is served");
    }

    #[test]
    fn a_buffer_outside_guest_ram_stops_the_device_with_needs_reset() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        d.post(0, &[Buf::writable((16 << 20) - 8, 64)]);
        assert!(d.wait_needs_reset());
        // A reset brings it back.
        let s = d.start(0);
        assert_eq!(s & status::NEEDS_RESET, 0, "status {s:#x}");
        let head = d.post(0, &[Buf::writable(BUFFERS, 8)]);
        assert_eq!(d.wait_used(0), Some((head as u32, 8)));
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(5);

    fn wait_still(d: &TestDriver) -> (u16, Vec<u8>) {
        let mut buffers = vec![0u8; 64 * 64];
        d.mem.read(BUFFERS, &mut buffers).unwrap();
        (used_idx(&d.mem, 0), buffers)
    }

    #[test]
    fn requests_posted_while_paused_are_served_only_after_resume() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        let head = d.post(0, &[Buf::writable(BUFFERS, 8)]);
        assert_eq!(d.wait_used(0), Some((head as u32, 8)));
        d.dev.pause(LONG).unwrap();
        let head = d.post(0, &[Buf::writable(BUFFERS + 0x1000, 64)]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(used_idx(&d.mem, 0), 1, "a paused device served a request");
        let mut a = [0u8; 64];
        d.mem.read(BUFFERS + 0x1000, &mut a).unwrap();
        assert_eq!(a, [0u8; 64], "a paused device wrote guest memory");
        d.dev.resume();
        assert_eq!(d.wait_used(0), Some((head as u32, 64)));
    }

    #[test]
    fn a_pause_leaves_ring_and_buffers_still_and_resume_serves_the_rest() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        // Requests the device is serving when the pause comes.
        for i in 0..64u64 {
            d.post(0, &[Buf::writable(BUFFERS + 64 * i, 64)]);
        }
        d.dev.pause(LONG).unwrap();
        let before = wait_still(&d);
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(
            wait_still(&d),
            before,
            "the ring or a buffer moved while paused"
        );
        // Whatever was answered is whole: every used buffer is filled.
        for i in 0..u64::from(before.0) {
            let at = (64 * i) as usize;
            assert_ne!(&before.1[at..at + 64], &[0u8; 64][..], "request {i}");
        }
        d.dev.resume();
        let deadline = std::time::Instant::now() + LONG;
        while used_idx(&d.mem, 0) != 64 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(used_idx(&d.mem, 0), 64, "resume serves what waited");
    }

    #[test]
    fn buffers_the_device_fills_are_dirty_pages() {
        let mut d = TestDriver::new(Box::new(Rng::default()));
        d.start(0);
        let dirty = d.mem.dirty_pages().clone();
        dirty.set_tracking(true);
        let _ = dirty.take(); // the driver's own set-up writes
                              // Device-writable buffers on pages the driver never writes.
        let (a, b) = (BUFFERS + 0x5000, BUFFERS + 0x9ff0);
        d.set_desc(0, 0, a, 64, 1 | 2, 1);
        d.set_desc(0, 1, b, 32, 2, 0);
        d.publish(0, 0);
        d.write(0x3000, &0u16.to_le_bytes());
        assert_eq!(d.wait_used(0).map(|u| u.1), Some(96));
        let taken = dirty.take();
        for addr in [a, b, b + 31] {
            let page = taken.index_of(addr).unwrap();
            assert!(taken.is_set(page), "page of {addr:#x} is not dirty");
        }
        let used_page = taken.index_of(0x10_8000).unwrap();
        assert!(taken.is_set(used_page), "the used ring is not dirty");
        assert!(!taken.is_set(taken.index_of(BUFFERS + 0x7000).unwrap()));
        assert!(dirty.take().is_empty(), "a take clears");
        dirty.set_tracking(false);
        let head = d.post(0, &[Buf::writable(a, 8)]);
        assert_eq!(d.wait_used(0), Some((head as u32, 8)));
        assert!(
            dirty.take().is_empty(),
            "nothing is recorded when tracking is off"
        );
    }
}
