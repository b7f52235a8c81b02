/*
 * The real-mode part of the conformance bzImage: a boot sector and one setup
 * sector carrying a boot protocol 2.15 setup header (Documentation/arch/x86/
 * boot.rst), laid out at the offsets the protocol fixes. No real-mode code: a
 * 64-bit loader never runs it.
 *
 * Several fields hold values a loader must change or clear (type_of_loader,
 * CAN_USE_HEAP and QUIET_FLAG in loadflags, heap_end_ptr, the pointers), so the
 * guest's report shows what the loader did to each.
 */

#define LOADED_HIGH	0x01
#define QUIET_FLAG	0x20
#define CAN_USE_HEAP	0x80
#define XLF_KERNEL_64	0x0001
#define XLF_CAN_BE_LOADED_ABOVE_4G 0x0002

	.section .setup, "a"
	.globl	setup_start
setup_start:
	.ascii	"denovisor boot-protocol conformance guest: not bootable by a BIOS\r\n"

	.org	0x1f1
setup_sects:		.byte	1		/* one setup sector: the kernel is at 0x400 */
root_flags:		.word	0
syssize:		.long	_syssize	/* protected-mode size / 16, from the linker */
ram_size:		.word	0
vid_mode:		.word	0xfffd
root_dev:		.word	0x0301
boot_flag:		.word	0xaa55

	.org	0x200
jump:			.byte	0xeb, header_end - 0x202
header:			.ascii	"HdrS"
version:		.word	0x020f
realmode_swtch:		.long	0
start_sys_seg:		.word	0x1000
kernel_version:		.word	version_string - 0x200
type_of_loader:		.byte	0
loadflags:		.byte	LOADED_HIGH | QUIET_FLAG | CAN_USE_HEAP
setup_move_size:	.word	0x8000
code32_start:		.long	0x100000
ramdisk_image:		.long	0
ramdisk_size:		.long	0
bootsect_kludge:	.long	0
heap_end_ptr:		.word	0xfe00
ext_loader_ver:		.byte	0
ext_loader_type:	.byte	0
cmd_line_ptr:		.long	0
initrd_addr_max:	.long	0x037fffff	/* below 56 MiB: a 64 MiB guest shows the cap */
kernel_alignment:	.long	0x200000
relocatable_kernel:	.byte	1
min_alignment:		.byte	21
xloadflags:		.word	XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
cmdline_size:		.long	255
hardware_subarch:	.long	0
hardware_subarch_data:	.quad	0
payload_offset:		.long	_payload_offset
payload_length:		.long	_payload_length
setup_data:		.quad	0
pref_address:		.quad	0x200000
init_size:		.long	0x100000	/* image + bss + stack: 1 MiB from the load address */
handover_offset:	.long	0
kernel_info_offset:	.long	0
header_end:

version_string:
	.asciz	"denovisor-conformance 1.0"
