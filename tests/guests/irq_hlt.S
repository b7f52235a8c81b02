/*
 * irq_hlt.S: a bare 64-bit CPL0 guest that enables its local APIC, routes
 * interrupt line 5 to vector 0x25, then sleeps in `sti; hlt` until rdi
 * interrupts have arrived, and exits through the debug-exit port with the count
 * (exit code (count << 1) | 1). With the in-kernel irqchip, KVM keeps the halted
 * vCPU asleep instead of reporting the hlt to the VMM.
 * Entry mode: long. rdi = how many interrupts to wait for (0: forever).
 */
#define LAPIC_SVR	0xfee000f0
#define LAPIC_EOI	0xfee000b0
#define IOAPIC_SEL	0xfec00000
#define VECTOR		0x25

	.text
	.globl _start
_start:
	lidt	idtr(%rip)
	mov	$0xff, %al		/* mask the PIC: only the IOAPIC delivers */
	out	%al, $0x21
	out	%al, $0xa1
	mov	$LAPIC_SVR, %eax
	movl	$0x1ff, (%rax)		/* enable the local APIC, spurious vector 0xff */
	mov	$IOAPIC_SEL, %eax
	movl	$0x1b, (%rax)		/* pin 5, high half: destination APIC 0 */
	movl	$0, 0x10(%rax)
	movl	$0x1a, (%rax)		/* pin 5, low half: vector, edge, unmasked */
	movl	$VECTOR, 0x10(%rax)
1:	cli
	test	%rdi, %rdi
	jz	2f
	cmp	%rdi, count(%rip)
	jae	3f
2:	sti
	hlt
	jmp	1b
3:	mov	count(%rip), %eax
	out	%al, $0xf4
	jmp	.

irq:	incq	count(%rip)
	movabs	%eax, LAPIC_EOI
	iretq

	.data
	.balign	16
idt:
	.skip	VECTOR * 16
	.word	irq - GUEST_LOAD_ADDRESS	/* the image lies in one 64 KiB window */
	.word	0x08
	.byte	0, 0x8e
	.word	GUEST_LOAD_ADDRESS >> 16
	.long	0, 0
idt_end:
	.balign	8
	.word	0, 0, 0
idtr:	.word	idt_end - idt - 1
	.quad	idt
count:	.quad	0
