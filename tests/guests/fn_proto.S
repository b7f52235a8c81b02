/*
 * fn_proto.S: a function guest that speaks the function ABI's mailbox
 * protocol itself (core/src/function/abi.rs), for the reset/invoke tests and
 * the bench. Entry mode: long (CPL0); ELF at 0x100000; at least 2 MiB of RAM.
 *
 * Init: fills the mailbox at 0x20000 (input 4 KiB at 0x30000, stdout 64 KiB at
 * 0x40000, stderr 4 KiB at 0x60000), sets READY and EXITs. Each request
 * increments a static counter and a counter in a far page (0x150000), then by
 * its input:
 *   "count"  stdout = the two counters as digits ("11" when no state leaks)
 *   "loop"   loops forever (the host's time limit kicks it out)
 *   "flood"  fills the whole stdout buffer (64 KiB of 'x')
 *   "crash"  ud2 without an IDT: a triple fault
 *   "lie"    claims a stdout length beyond the buffer's capacity
 *   "fail"   writes "bad\n" to stderr, exit status 3
 *   other    stdout = the input uppercased, exit status 0
 * then sets DONE (outcome EXITED) and EXITs.
 */
#include "hypercall.inc"

#define MB          0x20000
#define MB_MAGIC    0
#define MB_VERSION  4
#define MB_STATE    8
#define MB_OUTCOME  12
#define MB_IN_ADDR  16
#define MB_IN_CAP   24
#define MB_IN_LEN   32
#define MB_OUT_ADDR 40
#define MB_OUT_CAP  48
#define MB_OUT_LEN  56
#define MB_ERR_ADDR 64
#define MB_ERR_CAP  72
#define MB_ERR_LEN  80
#define MB_STATUS   88
#define MB_SYSCALLS 168
#define INBUF       0x30000
#define INCAP       0x1000
#define OUTBUF      0x40000
#define OUTCAP      0x10000
#define ERRBUF      0x60000
#define ERRCAP      0x1000
#define FAR         0x150000

	.text
	.globl _start
_start:
	mov	$MB, %rbx
	movl	$0x4e465644, MB_MAGIC(%rbx)
	movl	$1, MB_VERSION(%rbx)
	movq	$INBUF, MB_IN_ADDR(%rbx)
	movq	$INCAP, MB_IN_CAP(%rbx)
	movq	$OUTBUF, MB_OUT_ADDR(%rbx)
	movq	$OUTCAP, MB_OUT_CAP(%rbx)
	movq	$ERRBUF, MB_ERR_ADDR(%rbx)
	movq	$ERRCAP, MB_ERR_CAP(%rbx)
	movl	$1, MB_STATE(%rbx)
	hc_exit 0

	/* A request. */
	mov	$MB, %rbx
	incq	counter(%rip)
	incq	FAR
	movq	$0, MB_OUT_LEN(%rbx)
	movq	$0, MB_ERR_LEN(%rbx)
	movq	$0, MB_STATUS(%rbx)
	movq	$1, MB_SYSCALLS(%rbx)
	mov	MB_IN_LEN(%rbx), %rcx
	mov	$INBUF, %rsi
	mov	$OUTBUF, %rdi

	cmp	$5, %rcx
	jne	1f
	cmpl	$0x6e756f63, (%rsi)	/* "coun" */
	jne	2f
	cmpb	$'t', 4(%rsi)
	jne	2f
	mov	counter(%rip), %rax
	add	$'0', %al
	mov	%al, (%rdi)
	mov	FAR, %rax
	add	$'0', %al
	mov	%al, 1(%rdi)
	movq	$2, MB_OUT_LEN(%rbx)
	jmp	done
2:	cmpl	$0x6f6f6c66, (%rsi)	/* "floo" */
	jne	3f
	cmpb	$'d', 4(%rsi)
	jne	3f
	mov	$OUTCAP, %rcx
	mov	$'x', %al
	rep stosb
	movq	$OUTCAP, MB_OUT_LEN(%rbx)
	jmp	done
3:	cmpl	$0x68736172, 1(%rsi)	/* "crash" = "c" "rash" */
	jne	echo
	cmpb	$'c', (%rsi)
	jne	echo
	ud2
1:	cmp	$4, %rcx
	jne	6f
	cmpl	$0x706f6f6c, (%rsi)	/* "loop" */
	jne	4f
5:	jmp	5b
4:	cmpl	$0x6c696166, (%rsi)	/* "fail" */
	jne	echo
	movl	$0x0a646162, ERRBUF	/* "bad\n" */
	movq	$4, MB_ERR_LEN(%rbx)
	movq	$3, MB_STATUS(%rbx)
	jmp	done
6:	cmp	$3, %rcx
	jne	echo
	cmpw	$0x696c, (%rsi)		/* "lie" */
	jne	echo
	cmpb	$'e', 2(%rsi)
	jne	echo
	movq	$OUTCAP + 1, MB_OUT_LEN(%rbx)
	jmp	done

echo:	/* stdout = input uppercased */
	mov	%rcx, MB_OUT_LEN(%rbx)
7:	test	%rcx, %rcx
	jz	done
	lodsb
	cmp	$'a', %al
	jb	8f
	cmp	$'z', %al
	ja	8f
	sub	$0x20, %al
8:	stosb
	dec	%rcx
	jmp	7b

done:
	movl	$0, MB_OUTCOME(%rbx)
	movl	$2, MB_STATE(%rbx)
	hc_exit 0
9:	jmp	9b

	.data
	.balign	8
counter: .quad	0
block:	.space	48
