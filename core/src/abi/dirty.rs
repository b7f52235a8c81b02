//! The ABI of dirty-page tracking (see [`crate::dirty`]): on, off, and the
//! pages written since the last take.

use super::guarded;
use crate::error::Error;
use crate::handles;

/// Turns dirty-page tracking of the VM's RAM on (`enable` != 0: a new, empty
/// set) or off.
#[no_mangle]
pub extern "C" fn dv_vm_dirty_log(vm: u32, enable: u32) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if enable != 0 {
            vm.start_dirty_log()
        } else {
            vm.stop_dirty_log()
        }
    })
}

/// Takes the pages written since tracking started or since the last take
/// (by the guest or by the VMM) and clears them: one bit per 4 KiB page in
/// RAM order, as little-endian 64-bit words, into `buf`. `*out_len` is the
/// bitmap's size in bytes; when `cap` is smaller the call fails with
/// `BufferTooSmall` and takes nothing. Fails with `InvalidArgument` while
/// tracking is off.
///
/// # Safety
/// `buf` must be valid for `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_vm_take_dirty(
    vm: u32,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    guarded(|| {
        let vm = handles::vm(vm)?;
        if out_len.is_null() {
            return Err(Error::arg("out_len must not be null"));
        }
        let pages = vm.ram().size() / crate::dirty::PAGE_SIZE;
        let need = usize::try_from(pages.div_ceil(64) * 8)
            .map_err(|_| Error::arg("the dirty bitmap does not fit in memory"))?;
        // SAFETY: out_len is non-null and writable per this function's contract.
        unsafe { *out_len = need };
        if cap < need {
            return Err(Error::BufferTooSmall { need, got: cap });
        }
        if buf.is_null() && need > 0 {
            return Err(Error::arg("buf must not be null"));
        }
        let bytes = vm.take_dirty_pages()?.to_le_bytes();
        let n = bytes.len().min(cap);
        if n > 0 {
            // SAFETY: buf is non-null and valid for cap >= n bytes per this
            // function's contract; `bytes` is a separate allocation.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, n) };
        }
        // SAFETY: as above.
        unsafe { *out_len = n };
        Ok(())
    })
}
