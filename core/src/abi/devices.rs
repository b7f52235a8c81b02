//! Device functions of the C ABI (see the contract in `abi/mod.rs`): attach a
//! virtio device from its JSON configuration, list a VM's devices, and pass a
//! runtime request to one. They only marshal; `Vm` does the work.

use super::{bytes, guarded, guarded_into, json, text};
use crate::error::Error;
use crate::handles;
use crate::virtio::devices::DeviceConfig;

/// Attaches the device `json` describes (`{"kind": "rng", ...}`) and writes
/// its name into `buf`.
///
/// # Safety
/// `config` must be valid for `len` bytes, `buf` for `cap` writable bytes and
/// `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_add_device(
    vm: u32,
    config: *const u8,
    len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract (the closure reads `config`).
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            let config = DeviceConfig::from_json(bytes(config, len)?)?;
            Ok(vm.add_device(&config)?.into_bytes())
        })
    }
}

vm_reader!(
    /// Writes the VM's devices as JSON into `buf`: the PCI functions (address,
    /// IDs, class, BARs, the device's own details) and each bus's ranges with the
    /// accesses they handled.
    dv_vm_devices,
    |vm| json(&vm.devices())
);

vm_reader!(
    /// Writes the state of every device of the VM as JSON into `buf` (COM1, the
    /// i8042, PM1a, the RTC, debug-exit, ACPI PM, the PCI bus with each virtio
    /// transport): the entry point snapshots read device state from.
    dv_vm_device_state,
    |vm| json(&vm.device_states())
);

/// Passes the JSON request `request` to the device named by the UTF-8 string
/// `name`, and writes its JSON answer into `buf`.
///
/// # Safety
/// `name` must be valid for `name_len` bytes, `request` for `len` bytes, `buf`
/// for `cap` writable bytes and `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_device_control(
    vm: u32,
    name: *const u8,
    name_len: usize,
    request: *const u8,
    len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract (the closure reads `name` and `request`).
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            let name = text(name, name_len, "device name")?;
            let request: serde_json::Value = serde_json::from_slice(bytes(request, len)?)
                .map_err(|e| Error::arg(format!("device request: {e}")))?;
            json(&vm.device_control(name, &request)?)
        })
    }
}

/// A live migration's hand-over of the devices' host resources (disk images'
/// locks): `claim` 0 gives them up (each disk's writes made durable, its lock
/// released; the VM paused or not yet run; devices added later are built
/// without them), non-zero claims them (refused while another process holds
/// one).
#[no_mangle]
pub extern "C" fn dv_vm_devices_claim(vm: u32, claim: u32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if claim != 0 {
            vm.take_over_devices()
        } else {
            vm.hand_over_devices()
        }
    })
}
