//! The Linux boot functions of the C ABI (see the contract in `abi/mod.rs`):
//! loading a kernel by the 64-bit boot protocol, pointing a vCPU at it, and
//! describing an image without loading it.

use super::{bytes, guarded, guarded_into, json};
use crate::boot::linux;
use crate::handles;
use crate::memory::GuestRam;

/// Loads a Linux kernel (bzImage or `vmlinux` ELF), an optional initrd
/// (`initrd_len` 0: none) and a command line (not NUL-terminated; `cmdline_len`
/// bytes) into the VM's RAM, with the zero page, the boot GDT, the VMM's page
/// tables, the ACPI and MP tables for the VM's vCPUs, and attaches the ACPI PM
/// device the tables point at. On success `buf` holds the layout as JSON (entry, zero page, where each
/// piece went, the e820 map); on error the message. Nothing is written to guest
/// RAM unless everything fits.
///
/// # Safety
/// `kernel`, `initrd` and `cmdline` must be valid for their lengths; `buf` for
/// `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dv_vm_load_linux(
    vm: u32,
    kernel: *const u8,
    kernel_len: usize,
    initrd: *const u8,
    initrd_len: usize,
    cmdline: *const u8,
    cmdline_len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            let vm = handles::vm(vm)?;
            let kernel = bytes(kernel, kernel_len)?;
            let initrd = bytes(initrd, initrd_len)?;
            let cmdline = bytes(cmdline, cmdline_len)?;
            // A VM loaded before its vCPUs exist gets tables for one.
            let cpus = vm.vcpu_count().max(1) as u32;
            let layout = linux::load(vm.ram(), kernel, initrd, cmdline, cpus)?;
            vm.attach_acpi_pm()?;
            json(&layout)
        })
    }
}

/// Makes every check of [`dv_vm_load_linux`] without a VM (and so without
/// `/dev/kvm`): the kernel, the initrd's format, the command line's length and
/// whether everything fits in `ram_size` bytes of guest RAM. On success `buf`
/// holds the layout a load would produce, as JSON; on error the message, with a
/// status per problem (`Image`, `Initrd`, `CmdlineTooLong`, `DoesNotFit`).
///
/// # Safety
/// `kernel`, `initrd` and `cmdline` must be valid for their lengths; `buf` for
/// `cap` writable bytes; `out_len` for a `usize` write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn dv_linux_check(
    kernel: *const u8,
    kernel_len: usize,
    initrd: *const u8,
    initrd_len: usize,
    cmdline: *const u8,
    cmdline_len: usize,
    ram_size: u64,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            GuestRam::check_size(ram_size)?;
            let kernel = bytes(kernel, kernel_len)?;
            let initrd = bytes(initrd, initrd_len)?;
            let cmdline = bytes(cmdline, cmdline_len)?;
            let (_, layout) = linux::check(kernel, ram_size, initrd, cmdline)?;
            json(&layout)
        })
    }
}

/// Points a vCPU at a loaded kernel's 64-bit entry: long mode with the VMM's page
/// tables, CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18) from the boot
/// GDT, interrupts off, RIP = `entry`, RSI = `zero_page`. Call after
/// [`dv_vm_load_linux`], which writes the GDT and page tables.
#[no_mangle]
pub extern "C" fn dv_vcpu_setup_linux_entry(vcpu: u32, entry: u64, zero_page: u64) -> i32 {
    guarded(|| {
        let vcpu = handles::vcpu(vcpu)?;
        let sregs = vcpu.get_sregs()?;
        vcpu.set_sregs(&linux::linux_sregs(sregs))?;
        Ok(vcpu.set_regs(&linux::linux_regs(entry, zero_page))?)
    })
}

/// Describes an image as the loaders see it, as JSON in `buf`: its format, the
/// bzImage setup header or ELF segments, where it would go, the RAM it needs,
/// and why it would be refused. Never fails on a malformed image (the problem is
/// part of the result).
///
/// # Safety
/// `data` must be valid for `len` bytes; `buf` for `cap` writable bytes;
/// `out_len` for a `usize` write.
#[no_mangle]
pub unsafe extern "C" fn dv_inspect_image(
    data: *const u8,
    len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: per this function's contract.
    unsafe {
        guarded_into(buf, cap, out_len, || {
            json(&linux::inspect(bytes(data, len)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    #[test]
    fn inspect_reports_json_and_refuses_nulls() {
        let mut buf = vec![0u8; 4096];
        let mut n = 0usize;
        // SAFETY: valid buffers of their lengths.
        let status =
            unsafe { dv_inspect_image(b"junk".as_ptr(), 4, buf.as_mut_ptr(), buf.len(), &mut n) };
        assert_eq!(status, 0);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.contains("\"format\":\"unknown\""), "{text}");
        // SAFETY: a null pointer with a length is refused, not read.
        let status =
            unsafe { dv_inspect_image(std::ptr::null(), 4, buf.as_mut_ptr(), buf.len(), &mut n) };
        assert_eq!(status, Status::InvalidArgument as i32);
    }

    #[test]
    fn check_classifies_each_problem_without_a_vm() {
        let kernel = crate::boot::bzimage::tests::tiny_bzimage(&[0xf4; 0x400]);
        let cpio = crate::boot::initrd::tests::tiny_cpio();
        let mut buf = vec![0u8; 4096];
        let mut n = 0usize;
        let mut status = |k: &[u8], i: &[u8], c: &[u8], ram: u64| {
            // SAFETY: valid buffers of their lengths.
            unsafe {
                dv_linux_check(
                    k.as_ptr(),
                    k.len(),
                    i.as_ptr(),
                    i.len(),
                    c.as_ptr(),
                    c.len(),
                    ram,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut n,
                )
            }
        };
        assert_eq!(status(&kernel, &cpio, b"console=ttyS0", 64 << 20), 0);
        assert_eq!(
            status(b"root:x:0:0", &[], b"", 64 << 20),
            Status::Image as i32
        );
        assert_eq!(
            status(&kernel, b"junk", b"", 64 << 20),
            Status::Initrd as i32
        );
        assert_eq!(
            status(&kernel, &[], &[b'x'; 300], 64 << 20),
            Status::CmdlineTooLong as i32
        );
        assert_eq!(
            status(&kernel, &[], b"", 1 << 20),
            Status::DoesNotFit as i32
        );
        assert_eq!(
            status(&kernel, &[], b"", 4095),
            Status::InvalidArgument as i32
        );
    }

    #[test]
    fn bad_handles_are_errors() {
        let mut buf = vec![0u8; 256];
        let mut n = 0usize;
        // SAFETY: valid buffers; empty inputs.
        let status = unsafe {
            dv_vm_load_linux(
                0xdead,
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                buf.as_mut_ptr(),
                buf.len(),
                &mut n,
            )
        };
        assert_eq!(status, Status::InvalidHandle as i32);
        assert_eq!(
            dv_vcpu_setup_linux_entry(0xdead, 0, 0),
            Status::InvalidHandle as i32
        );
    }
}
