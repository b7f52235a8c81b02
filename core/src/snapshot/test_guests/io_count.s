# io_count.s: a 64-bit CPL0 guest (flat, loaded at 0x100000) for the snapshot
# tests: writes COUNT characters to COM1, one `out` (one VM exit) each, cycling
# through '0'..'o', then writes 5 to port 0xf4. A pause taken right after an
# exit must leave the `out` finished (RIP past it): a restore that runs it again
# prints one character twice.
	.code64
	.equ	COUNT, 4000
	xor	%ecx, %ecx
	mov	$0x3f8, %dx
1:	mov	%ecx, %eax
	and	$63, %eax
	add	$'0', %eax
	out	%al, %dx
	inc	%ecx
	cmp	$COUNT, %ecx
	jb	1b
	mov	$5, %al
	out	%al, $0xf4
	hlt
