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

/// Registers an object and returns its new handle (never 0, never reused).
pub fn insert(object: Object) -> Result<u32> {
    let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
    if handle == 0 || handle == u32::MAX {
        return Err(Error::arg("the handle space is exhausted"));
    }
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
