//! A device's worker thread: waits (epoll) on the queues' kick eventfds and
//! any other file descriptors the device serves (a TAP device, sockets), and
//! calls the device's handler for each, off the vCPU threads. Dropping the
//! [`Worker`] stops the thread and joins it.
//!
//! A [`PauseGate`] (one per device, owned by its transport) holds the worker
//! still while the VM is paused: the worker passes the gate before it serves
//! each wake, and [`PauseGate::pause`] returns only once no wake is being
//! served, so a paused device has answered every request it popped and pops
//! no other one until [`PauseGate::resume`]. Host input (a TAP's frames, a
//! socket's bytes) waits in the kernel meanwhile: the worker reads it only
//! while serving a wake.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_queue::Queue;

use super::{Activation, Interrupt, VirtioError};
use crate::memory::GuestRam;
use crate::seccomp::ThreadKind;

/// What woke the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The driver kicked queue `n`.
    Kick(usize),
    /// Extra descriptor `n` (in the order given to [`Worker::spawn`]) is ready.
    Fd(usize, EventSet),
}

/// Whether a device's workers may serve, and how many are serving now.
#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    serving: usize,
}

/// The pause switch of one device's worker threads (see the module doc).
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Two plain counters: a poisoned lock still holds consistent values.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate and waits up to `timeout` for every wake being served
    /// to finish. False if one is still being served then (the gate stays
    /// closed: the worker stops at its next wake; [`PauseGate::resume`]
    /// reopens it).
    pub fn pause(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.paused = true;
        while state.serving > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Opens the gate: held workers go on with the wakes they were given.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Waits until the gate is open, then counts one wake being served.
    /// False (nothing counted) if `stopped` is set first.
    fn enter(&self, stopped: &AtomicBool) -> bool {
        let mut state = self.lock();
        while state.paused && !stopped.load(Ordering::Acquire) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if stopped.load(Ordering::Acquire) {
            return false;
        }
        state.serving += 1;
        true
    }

    /// Counts one wake served.
    fn leave(&self) {
        let mut state = self.lock();
        state.serving = state.serving.saturating_sub(1);
        drop(state);
        self.changed.notify_all();
    }

    /// Wakes workers held at the gate (one of them is stopping).
    fn wake_all(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }
}

/// One wake being served: counted out of the gate when dropped, even by a
/// handler's panic (a pause must not wait for a thread that is gone).
struct Serving<'a>(&'a PauseGate);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What a worker shares with the transport that started its device: the
/// pause gate and the record of pages the device writes.
#[derive(Clone, Debug, Default)]
pub struct WorkerLink {
    /// The device's pause switch.
    pub gate: Arc<PauseGate>,
    /// Where the pages the device writes are recorded while dirty-page
    /// tracking is on (see [`crate::dirty`]).
    pub dirty: Option<Arc<crate::dirty::DirtyPages>>,
}

/// A running worker thread.
pub struct Worker {
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
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
        let link = a.link.clone();
        Worker::spawn(name, link, kicks, vec![], move |wake| {
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
    /// `link` holds it while the device is paused and records what it writes.
    pub fn spawn<F>(
        name: &str,
        link: WorkerLink,
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
        let stopped = Arc::new(AtomicBool::new(false));
        let (gate, thread_stopped) = (link.gate.clone(), stopped.clone());
        let kind = ThreadKind::for_worker(name);
        let thread = crate::seccomp::spawn(format!("dv-{name}"), kind, move || {
            let _stop = stop_fd;
            crate::dirty::set_thread_log(link.dirty.clone());
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for event in &events[..n] {
                    if event.data() == STOP_TOKEN || !link.gate.enter(&thread_stopped) {
                        return;
                    }
                    let wake = match event.data() {
                        t if t >= FD_BASE => Wake::Fd((t - FD_BASE) as usize, event.event_set()),
                        t => {
                            if let Some(kick) = kicks.get(t as usize) {
                                // Clear the counter: one pass serves every kick so far.
                                let _ = kick.read();
                            }
                            Wake::Kick(t as usize)
                        }
                    };
                    let serving = Serving(&link.gate);
                    let go_on = handle(wake);
                    drop(serving);
                    if !go_on {
                        return;
                    }
                }
            }
        })
        .map_err(io("spawning a device worker thread"))?;
        Ok(Worker {
            stop,
            stopped,
            gate,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        self.gate.wake_all();
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
        let worker = Worker::spawn("test", WorkerLink::default(), kicks, vec![], move |wake| {
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

    fn one_kick_worker(
        handle: impl FnMut(Wake) -> bool + Send + 'static,
    ) -> (Worker, EventFd, Arc<PauseGate>) {
        let kicks = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let kick = kicks[0].try_clone().unwrap();
        let link = WorkerLink::default();
        let gate = link.gate.clone();
        let worker = Worker::spawn("test", link, kicks, vec![], handle).unwrap();
        (worker, kick, gate)
    }

    const LONG: Duration = Duration::from_secs(5);

    #[test]
    fn a_wake_being_served_finishes_before_pause_returns() {
        let (started_tx, started) = mpsc::channel();
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let (_worker, kick, gate) = one_kick_worker(move |_| {
            started_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            done.store(true, Ordering::Release);
            true
        });
        kick.write(1).unwrap();
        started.recv_timeout(LONG).unwrap();
        assert!(gate.pause(LONG));
        assert!(
            finished.load(Ordering::Acquire),
            "pause returned while the handler was still serving"
        );
    }

    #[test]
    fn kicks_while_paused_wait_for_resume() {
        let (tx, rx) = mpsc::channel();
        let (_worker, kick, gate) = one_kick_worker(move |wake| {
            tx.send(wake).unwrap();
            true
        });
        assert!(gate.pause(LONG));
        kick.write(1).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a paused worker served a kick"
        );
        gate.resume();
        assert_eq!(rx.recv_timeout(LONG).unwrap(), Wake::Kick(0));
    }

    #[test]
    fn a_worker_that_does_not_finish_makes_pause_time_out() {
        let (started_tx, started) = mpsc::channel();
        let (release_tx, release) = mpsc::channel::<()>();
        let (_worker, kick, gate) = one_kick_worker(move |_| {
            started_tx.send(()).unwrap();
            let _ = release.recv_timeout(Duration::from_secs(30));
            true
        });
        kick.write(1).unwrap();
        started.recv_timeout(LONG).unwrap();
        let t = Instant::now();
        assert!(!gate.pause(Duration::from_millis(100)));
        assert!(t.elapsed() < Duration::from_secs(2), "the wait is bounded");
        release_tx.send(()).unwrap();
        assert!(gate.pause(LONG), "once released the worker stops");
        gate.resume();
    }

    #[test]
    fn a_paused_worker_is_dropped_without_waiting_for_resume() {
        let (_tx, rx) = mpsc::channel::<Wake>();
        let (worker, kick, gate) = one_kick_worker(move |_| {
            let _keep = &rx;
            true
        });
        assert!(gate.pause(LONG));
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(worker);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
