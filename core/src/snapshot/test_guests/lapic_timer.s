# lapic_timer.s: a 64-bit CPL0 guest (flat, loaded at 0x100000) for the
# snapshot tests, on 2 vCPUs with the in-kernel irqchip. Each vCPU programs its
# own local APIC timer (periodic, 1 ms, vector 0x40) and halts; each tick adds
# one to the vCPU's counter at offset 8 + 8 * APIC id (`ticks`). vCPU 0 prints
# "ok" on COM1 and writes 5 to port 0xf4 once both counters reach TARGET. If a
# restore loses a local APIC or a vCPU's MP state, ticks stop and the guest
# never finishes. vCPU 0 also masks both 8259s, points IOAPIC pin 2 at vector
# 0x41 and starts PIT channel 0 (rate generator, count 1193), for the test to
# find that state in the restored VM's irqchip (the PIT's interrupts are not
# taken: nothing waits for them).
	.code64
	.equ	TARGET, 400
	.equ	LAPIC, 0xfee00000
	.equ	TIMER_VECTOR, 0x40
	.equ	IOAPIC_PIN2_VECTOR, 0x41
	.equ	IOAPIC, 0xfec00000
_start:
	jmp	main
	.balign	8
ticks:
	.quad	0, 0
idtr:
	.word	256 * 16 - 1
	.quad	0
main:
	mov	$LAPIC, %r15d
	mov	0x20(%r15), %r14d
	shr	$24, %r14d		# this vCPU's APIC id
	# The IDT's gate for the timer vector (both vCPUs write the same bytes).
	lea	tick(%rip), %rax
	lea	idt + TIMER_VECTOR * 16(%rip), %rdi
	mov	%ax, (%rdi)
	mov	%cs, %dx
	mov	%dx, 2(%rdi)
	movw	$0x8e00, 4(%rdi)	# present, DPL 0, 64-bit interrupt gate
	shr	$16, %rax
	mov	%ax, 6(%rdi)
	shr	$16, %rax
	mov	%eax, 8(%rdi)
	movl	$0, 12(%rdi)
	lea	idt(%rip), %rax
	mov	%rax, idtr + 2(%rip)
	lidt	idtr(%rip)
	movl	$0x1ff, 0xf0(%r15)	# software-enable, spurious vector 0xff
	movl	$0xb, 0x3e0(%r15)	# divide by 1
	movl	$0x20000 | TIMER_VECTOR, 0x320(%r15)	# periodic
	movl	$1000000, 0x380(%r15)	# 1 ms at KVM's 1 GHz APIC bus
	movl	$0x10000, 0x350(%r15)	# LINT0 masked: no ExtINT from the PICs
	test	%r14d, %r14d
	jnz	ap_start
	mov	$0xff, %al		# both 8259s masked
	out	%al, $0x21
	out	%al, $0xa1
	mov	$IOAPIC, %eax		# IOAPIC pin 2 (the PIT): vector 0x41, masked
	movl	$0x14, (%rax)
	movl	$IOAPIC_PIN2_VECTOR | 0x10000, 0x10(%rax)	# masked
	movl	$0x15, (%rax)
	movl	$0, 0x10(%rax)
	mov	$0x34, %al		# PIT channel 0, rate generator, 1193 ticks
	out	%al, $0x43
	mov	$1193 & 0xff, %al
	out	%al, $0x40
	mov	$1193 >> 8, %al
	out	%al, $0x40
	sti
bsp:	hlt
	cmpq	$TARGET, ticks(%rip)
	jb	bsp
	cmpq	$TARGET, ticks + 8(%rip)
	jb	bsp
	cli
	mov	$0x3f8, %dx
	mov	$'o', %al
	out	%al, %dx
	mov	$'k', %al
	out	%al, %dx
	mov	$10, %al
	out	%al, %dx
	mov	$5, %al
	out	%al, $0xf4
	hlt
ap_start:
	sti
ap:	hlt
	jmp	ap

tick:
	push	%rax
	push	%rdx
	mov	$LAPIC + 0x20, %eax
	mov	(%rax), %edx
	shr	$24, %edx
	and	$1, %edx
	lea	ticks(%rip), %rax
	lock incq (%rax,%rdx,8)
	mov	$LAPIC + 0xb0, %eax
	movl	$0, (%rax)		# EOI
	pop	%rdx
	pop	%rax
	iretq

	.balign	16
idt:
	.fill	256 * 16, 1, 0
