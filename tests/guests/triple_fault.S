/*
 * triple_fault.S: executes ud2. The VMM installs no IDT, so the #UD escalates to a
 * double fault and then a triple fault, which KVM reports as a shutdown and the
 * VMM as a guest crash. Entry mode: long or user (64-bit); flat or ELF at 0x100000.
 */
	.text
	.globl _start
_start:
	ud2
