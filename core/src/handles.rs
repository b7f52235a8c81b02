//! The handle table: how opaque `u32` handles at the C ABI map to live objects.
//!
//! Handles are never reused (a monotonically increasing counter), so a stale handle
//! (one whose object was closed) can never alias a newer object, and a handle of the
//! wrong kind is detected by its entry's kind. Objects are `Arc`s: looking a handle up
//! clones the `Arc` and releases the table lock, so closing a handle while another
//! thread is inside a call on it only drops the table's reference; the object is
//! freed when the last in-flight call returns. Use-after-close is therefore an
//! `InvalidHandle` error, never a use-after-free.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// One live object behind a handle.
#[derive(Clone)]
pub enum Object {
    Vm(Arc<Vm>),
    /// A vCPU and the address of its VM (to invalidate it when the VM closes).
    Vcpu(Arc<Vcpu>, usize),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Vm(_) => "VM",
            Object::Vcpu(..) => "vCPU",
        }
    }
}

struct Table {
    objects: HashMap<u32, Object>,
}

static NEXT_HANDLE: AtomicU32 = AtomicU32::new(1);
static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();

fn table() -> MutexGuard<'static, Table> {
    let mutex = TABLE.get_or_init(|| {
        Mutex::new(Table {
            objects: HashMap::new(),
        })
    });
    // A panic while holding this lock cannot leave the map half-updated (every
    // critical section is a single HashMap call), so a poisoned lock is still sound.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes the next handle from `counter`: 1, 2, ... up to `u32::MAX - 1`, then
/// an error for ever. The counter never moves past `u32::MAX` (a plain
/// `fetch_add` would wrap to 0 and then hand out 1 again: a reused handle).
fn next_handle(counter: &AtomicU32) -> Result<u32> {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < u32::MAX).then_some(n + 1)
        })
        .ok()
        .filter(|&handle| handle != 0 && handle < u32::MAX)
        .ok_or_else(|| {
            Error::arg(
                "the handle space is exhausted (4294967294 handles were created in this process)",
            )
        })
}

/// Registers an object and returns its new handle (never 0, never reused).
pub fn insert(object: Object) -> Result<u32> {
    let handle = next_handle(&NEXT_HANDLE)?;
    table().objects.insert(handle, object);
    Ok(handle)
}

/// Registers a vCPU of `vm`.
pub fn insert_vcpu(vm: &Arc<Vm>, vcpu: Arc<Vcpu>) -> Result<u32> {
    insert(Object::Vcpu(vcpu, Arc::as_ptr(vm) as usize))
}

/// Invalidates the handles of every vCPU of `vm` (when the VM is closed).
pub fn remove_vcpus_of(vm: &Arc<Vm>) {
    let owner = Arc::as_ptr(vm) as usize;
    table()
        .objects
        .retain(|_, object| !matches!(object, Object::Vcpu(_, o) if *o == owner));
}

/// Looks up a VM handle.
pub fn vm(handle: u32) -> Result<Arc<Vm>> {
    match table().objects.get(&handle) {
        Some(Object::Vm(vm)) => Ok(vm.clone()),
        _ => Err(Error::InvalidHandle {
            handle,
            expected: "VM",
        }),
    }
}

/// Looks up a vCPU handle.
pub fn vcpu(handle: u32) -> Result<Arc<Vcpu>> {
    match table().objects.get(&handle) {
        Some(Object::Vcpu(vcpu, _)) => Ok(vcpu.clone()),
        _ => Err(Error::InvalidHandle {
            handle,
            expected: "vCPU",
        }),
    }
}

/// Removes a handle of the expected kind and returns its object.
pub fn remove(handle: u32, expected: &'static str) -> Result<Object> {
    let mut table = table();
    match table.objects.get(&handle) {
        Some(object) if object.kind() == expected => {}
        _ => return Err(Error::InvalidHandle { handle, expected }),
    }
    table
        .objects
        .remove(&handle)
        .ok_or(Error::InvalidHandle { handle, expected })
}

/// How many handles are live (for leak tests).
pub fn live_count() -> usize {
    table().objects.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_count_up_from_one() {
        let counter = AtomicU32::new(1);
        assert_eq!(next_handle(&counter).unwrap(), 1);
        assert_eq!(next_handle(&counter).unwrap(), 2);
    }

    #[test]
    fn an_exhausted_handle_space_is_an_error_for_ever_never_a_wrap() {
        let counter = AtomicU32::new(u32::MAX - 2);
        assert_eq!(next_handle(&counter).unwrap(), u32::MAX - 2);
        assert_eq!(next_handle(&counter).unwrap(), u32::MAX - 1);
        for _ in 0..3 {
            let Err(Error::InvalidArgument(message)) = next_handle(&counter) else {
                panic!("a handle past the end was handed out");
            };
            assert!(message.contains("exhausted"), "{message}");
        }
        assert_eq!(
            counter.load(Ordering::Relaxed),
            u32::MAX,
            "the counter stays at the end"
        );
    }
}
