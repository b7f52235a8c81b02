//! Where the VMM puts its boot structures in guest-physical memory for the 64-bit
//! entry modes. Images must not overlap `[0, RESERVED_END)` in those modes; real
//! mode reserves nothing.
//!
//! ```text
//! 0x0500  GDT (8 slots: null, kcode64, kdata, ucode32, udata, ucode64, TSS x2)
//! 0x1000  PML4
//! 0x2000  PDPT
//! 0x3000  4 page directories: identity map of the first 4 GiB with 2 MiB pages
//! 0x7000  TSS (104 bytes; rsp0 = BOOT_KERNEL_STACK_TOP), then its I/O permission
//!         bitmap (8 KiB of zeros = every port allowed, and the closing 0xff byte)
//! 0xa000  .. 0x10000: the kernel stack used on exceptions taken from CPL3
//! ```
//!
//! A Linux guest (`boot::linux`) also gets, above the reserved region (e820 marks
//! it usable RAM, like Firecracker's zero page; the kernel copies what it needs
//! before it allocates memory):
//!
//! ```text
//! 0x10000  zero page (struct boot_params, 4 KiB); RSP starts just below it
//! 0x11000  the boot GDT of the 64-bit boot protocol (__BOOT_CS 0x10, __BOOT_DS 0x18)
//! 0x20000  .. 0x30000: the kernel command line, NUL-terminated
//! 0x9fc00  .. 0x100000: legacy EBDA/VGA/ROM area, reserved in the e820 map:
//!          0x9fc00 the MP table (`boot::mptable`, 1 KiB),
//!          0xe0000 the ACPI tables (`boot::acpi`: RSDP, XSDT, FADT, DSDT, MADT),
//!          0xffff0 the reset vector's code (writes the ACPI reset register)
//! 0x100000 and up: the kernel (a bzImage at pref_address when relocatable),
//!          the initrd at the top of RAM below initrd_addr_max and the MMIO gap
//! ```
//!
//! Why the TSS carries a full I/O bitmap although user mode also gets IOPL=3: on
//! hardware VT-x/AMD-V, IOPL=3 alone lets CPL3 code use `in`/`out`; software KVM
//! backends that run guest user mode as host user mode (PVM) cannot grant the host
//! IOPL and check the TSS bitmap instead. With both, port I/O from CPL3 works on
//! either kind of host.

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x7000;
/// Size of the 64-bit TSS proper (the I/O bitmap follows it).
pub const TSS_SIZE: u64 = 104;
/// Size of the I/O permission bitmap: one bit per port, plus the closing 0xff byte.
pub const IO_BITMAP_SIZE: u64 = 65536 / 8 + 1;
/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the first page directory.
pub const PD_ADDR: u64 = 0x3000;
/// How many page directories (1 GiB each) the identity map uses.
pub const PD_COUNT: u64 = 4;
/// Top of the stack the CPU switches to on an exception taken from CPL3.
pub const BOOT_KERNEL_STACK_TOP: u64 = 0x10000;
/// Bottom of that stack (the end of the TSS and its bitmap is below it).
pub const BOOT_KERNEL_STACK_BOTTOM: u64 = 0xa000;
/// End of the reserved low region.
pub const RESERVED_END: u64 = 0x10000;
/// Bytes covered by the VMM's identity map.
pub const IDENTITY_MAP_BYTES: u64 = PD_COUNT << 30;

/// GDT selectors. The user selectors are ordered for SYSCALL/SYSRET:
/// STAR[47:32] = KERNEL_CS, STAR[63:48] = USER_CS32 (SYSRET then uses +8 for SS
/// and +16 for the 64-bit CS).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data/stack selector.
pub const KERNEL_DS: u16 = 0x10;
/// 32-bit user code selector (present only for the SYSRET layout).
pub const USER_CS32: u16 = 0x18;
/// User data/stack selector (RPL 3).
pub const USER_DS: u16 = 0x20 | 3;
/// 64-bit user code selector (RPL 3).
pub const USER_CS: u16 = 0x28 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x30;

/// Default load address of flat images in real mode (the classic boot-sector spot).
pub const DEFAULT_REAL_LOAD_ADDR: u64 = 0x7c00;
/// Default load address of flat images in the 64-bit modes (1 MiB, above the
/// reserved region and legacy holes).
pub const DEFAULT_LONG_LOAD_ADDR: u64 = 0x10_0000;

/// Guest-physical address of a Linux guest's zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x1_0000;
/// Guest-physical address of a Linux guest's boot GDT.
pub const LINUX_GDT_ADDR: u64 = 0x1_1000;
/// Guest-physical address of a Linux guest's command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Bytes reserved for the command line, including its NUL.
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Linux kernels load at or above 1 MiB (below it: boot data and the legacy area).
pub const LINUX_KERNEL_MIN_ADDR: u64 = 0x10_0000;
