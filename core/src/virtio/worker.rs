//! A device's worker thread: waits (epoll) on the queues' kick eventfds and
//! any other file descriptors the device serves (a TAP device, sockets), and
//! calls the device's handler for each, off the vCPU threads. Dropping the
//! [`Worker`] stops the thread and joins it.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_queue::Queue;

use super::{Activation, Interrupt, VirtioError};
use crate::memory::GuestRam;

/// What woke the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The driver kicked queue `n`.
    Kick(usize),
    /// Extra descriptor `n` (in the order given to [`Worker::spawn`]) is ready.
    Fd(usize, EventSet),
}

/// A running worker thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const STOP_TOKEN: u64 = u64::MAX;
const FD_BASE: u64 = 1 << 32;

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> VirtioError {
    move |source| VirtioError::Io { op, source }
}

impl Worker {
    /// Spawns the worker of a one-queue device: `serve` drains queue 0 on
    /// each kick and says false when the driver broke it (the device then
    /// stops with DEVICE_NEEDS_RESET).
    pub fn one_queue<S>(name: &str, mut a: Activation, mut serve: S) -> Result<Worker, VirtioError>
    where
        S: FnMut(&mut Queue, &GuestRam, &Interrupt) -> bool + Send + 'static,
    {
        let mut queue = a.take_queue(0)?;
        let kicks = std::mem::take(&mut a.kicks);
        Worker::spawn(name, kicks, vec![], move |wake| {
            if wake != Wake::Kick(0) {
                return true;
            }
            if serve(&mut queue, &a.mem, &a.interrupt) {
                true
            } else {
                a.fail();
                false
            }
        })
    }

    /// Spawns `name`'s worker: `handle` runs for every wake until it returns
    /// false (the device broke or finished). `extra` are watched for input.
    pub fn spawn<F>(
        name: &str,
        kicks: Vec<EventFd>,
        extra: Vec<(RawFd, EventSet)>,
        mut handle: F,
    ) -> Result<Worker, VirtioError>
    where
        F: FnMut(Wake) -> bool + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io("creating a stop eventfd"))?;
        let epoll = Epoll::new().map_err(io("creating an epoll fd"))?;
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(io("epoll_ctl"))
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP_TOKEN)?;
        for (i, kick) in kicks.iter().enumerate() {
            add(kick.as_raw_fd(), EventSet::IN, i as u64)?;
        }
        for (i, (fd, events)) in extra.iter().enumerate() {
            add(*fd, *events, FD_BASE + i as u64)?;
        }
        let stop_fd = stop
            .try_clone()
            .map_err(io("duplicating the stop eventfd"))?;
        let thread = std::thread::Builder::new()
            .name(format!("dv-{name}"))
            .spawn(move || {
                let _stop = stop_fd;
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for event in &events[..n] {
                        let wake = match event.data() {
                            STOP_TOKEN => return,
                            t if t >= FD_BASE => {
                                Wake::Fd((t - FD_BASE) as usize, event.event_set())
                            }
                            t => {
                                if let Some(kick) = kicks.get(t as usize) {
                                    // Clear the counter: one pass serves every kick so far.
                                    let _ = kick.read();
                                }
                                Wake::Kick(t as usize)
                            }
                        };
                        if !handle(wake) {
                            return;
                        }
                    }
                }
            })
            .map_err(io("spawning a device worker thread"))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            // A worker that panicked has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn kicks_reach_the_handler_and_drop_joins() {
        let kicks = vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let k1 = kicks[1].try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn("test", kicks, vec![], move |wake| {
            tx.send(wake).unwrap();
            true
        })
        .unwrap();
        k1.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            Wake::Kick(1)
        );
        drop(worker);
        assert!(
            rx.recv().is_err(),
            "the thread ended and dropped its sender"
        );
    }
}
