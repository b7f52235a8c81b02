/*
 * fn_runtime.c: the function runtime's CPL3 part, a small Linux personality.
 *
 * fn_kernel.S enters fn_init at CPL3 with the bundle's address and the RAM size;
 * fn_init checks the bundle, loads the program, fills the mailbox, says READY
 * and makes the EXIT hypercall. When the host resumes the vCPU, a request runs:
 * the program starts at its ELF entry (CPL3, same address space) and every
 * SYSCALL reaches fn_syscall here through fn_kernel.S's 9-instruction CPL0 stub.
 * At exit (or a limit, or a fault) fn_finish fills the mailbox, says DONE and
 * makes the EXIT hypercall, again and again if it is resumed.
 *
 * Everything the guest program controls (pointers, lengths, paths, fds) is
 * checked here; everything the host wrote (the bundle, the per-request fields)
 * is checked too, and the host checks all that the runtime writes.
 *
 * Built with -mgeneral-regs-only: the runtime never touches the program's
 * vector registers, so a system call needs no FPU save.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>

#include "../abi.h"

typedef uint64_t u64;
typedef int64_t i64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;
typedef int32_t i32;

/* ---- Layout ------------------------------------------------------------ */

#define PAGE 4096ull
#define LOW_RESERVED 0x10000ull /* the VMM's low 64 KiB (supervisor-only here) */
#define STACK_BYTES (2ull << 20) /* the program's stack */
#define STDERR_CAP (64ull << 10)
#define IO_CAP_MIN (64ull << 10)
#define IO_CAP_MAX (16ull << 20)
#define ET_DYN_BASE 0x400000ull
#define FN_PID 100
#define FN_UID 1000
#define FD_MAX 64
#define REGION_MAX 1024
#define PATH_MAX_FN 256
#define ARG_MAX_FN 4096 /* argc + envc */
#define FILE_MAX_FN 4096

#define HC_PORT 0x510
#define HC_EXIT 2
#define HC_CLOCK 3

/* errno values */
#define EPERM 1
#define ENOENT 2
#define ESRCH 3
#define EBADF 9
#define EAGAIN 11
#define ENOMEM 12
#define EFAULT 14
#define ENOTDIR 20
#define EISDIR 21
#define EINVAL 22
#define EMFILE 24
#define ENOTTY 25
#define ESPIPE 29
#define EROFS 30
#define ERANGE 34
#define ENAMETOOLONG 36
#define ENOSYS 38

#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((a) - 1))
#define MB(off) ((volatile void *)(uintptr_t)(DV_FN_MAILBOX_ADDR + (off)))
#define MB32(off) (*(volatile u32 *)MB(off))
#define MB64(off) (*(volatile u64 *)MB(off))

extern char __image_end[];
extern u64 fn_pd[2048];
extern volatile u64 fn_fs_base, fn_fs_calls;
void fn_enter_program(u64 entry, u64 sp) __attribute__((noreturn));

/* ---- Freestanding basics ------------------------------------------------ */

void *memset(void *d, int c, size_t n) {
	u8 *p = d;
	while (n--) *p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n) {
	u8 *p = d;
	const u8 *q = s;
	while (n--) *p++ = *q++;
	return d;
}

void *memmove(void *d, const void *s, size_t n) {
	u8 *p = d;
	const u8 *q = s;
	if (p < q) {
		while (n--) *p++ = *q++;
	} else {
		while (n--) p[n] = q[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n) {
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q) return *p - *q;
	return 0;
}

static size_t slen(const char *s) {
	size_t n = 0;
	while (s[n]) n++;
	return n;
}

static int streq(const char *a, const char *b) {
	while (*a && *a == *b) a++, b++;
	return *a == *b;
}

/* A tiny formatter for messages: %s, %d (i64), %x (u64, 0x-prefixed). */
static void vfmt(char *out, size_t cap, const char *f, va_list ap) {
	size_t n = 0;
	char tmp[24];
	for (; *f && n + 1 < cap; f++) {
		if (*f != '%') {
			out[n++] = *f;
			continue;
		}
		f++;
		const char *s = tmp;
		if (*f == 's') {
			s = va_arg(ap, const char *);
		} else if (*f == 'd' || *f == 'x') {
			u64 v;
			int neg = 0, base = *f == 'x' ? 16 : 10, i = 23;
			if (*f == 'd') {
				i64 x = va_arg(ap, i64);
				neg = x < 0;
				v = neg ? -(u64)x : (u64)x;
			} else {
				v = va_arg(ap, u64);
			}
			tmp[i] = 0;
			do {
				tmp[--i] = "0123456789abcdef"[v % base];
				v /= base;
			} while (v);
			if (base == 16) tmp[--i] = 'x', tmp[--i] = '0';
			if (neg) tmp[--i] = '-';
			s = tmp + i;
		} else {
			tmp[0] = *f, tmp[1] = 0;
		}
		while (*s && n + 1 < cap) out[n++] = *s++;
		if (!*f) break;
	}
	out[n] = 0;
}

/* ---- Hypercalls --------------------------------------------------------- */

struct hc {
	u32 nr;
	i32 status;
	u64 arg[4];
	u64 ret;
};

static i64 hypercall(u32 nr, u64 a0) {
	volatile struct hc block = {.nr = nr, .arg = {a0, 0, 0, 0}};
	__asm__ volatile("outl %0, %w1" ::"a"((u32)(uintptr_t)&block), "Nd"(HC_PORT) : "memory");
	return block.status < 0 ? block.status : (i64)block.ret;
}

static inline u64 rdtsc(void) {
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4]) {
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* ---- State -------------------------------------------------------------- */

struct bfile {
	const char *path;
	const u8 *data;
	u64 len;
	u32 mode;
};

enum fd_kind { FD_FREE, FD_STDIN, FD_STDOUT, FD_STDERR, FD_FILE, FD_DIR };
struct fd {
	u8 kind;
	u8 cloexec;
	u32 file;
	u64 off;
	char path[PATH_MAX_FN]; /* FD_DIR: the directory */
};

struct region {
	u64 start, end;
};

static u64 ram;
static u8 *bundle;
static u64 bundle_len;
static struct bfile files[FILE_MAX_FN];
static u32 file_count, exec_index, argc, envc;
static const char *strings[ARG_MAX_FN];

/* The program. */
static u64 prog_entry, prog_phdr, prog_phnum, prog_end;
/* Memory layout (set at init). */
static u64 prog_min, brk_start, mmap_top, stack_top, input_addr, input_cap, stdout_addr,
	stdout_cap, stderr_addr;
static u64 tsc_mul; /* ns = tsc delta * tsc_mul >> 32 */

/* Per request. */
static int running;
static u64 input_len, input_off, stdout_len, stderr_len, output_limit, memory_limit;
static u64 realtime_ns, monotonic_ns, tsc_base;
static u64 brk_cur, brk_hw, clean_hi, mapped, peak, syscalls;
static struct region regions[REGION_MAX];
static u32 region_count;
static struct fd fds[FD_MAX];
static char cwd[PATH_MAX_FN];
static char comm[16];
static u8 sigactions[65][32];
static u64 sigmask, altstack[3];
static u64 rng[4];
static u32 enosys_used;

/* ---- Ending ------------------------------------------------------------- */

static void message(const char *f, ...) {
	va_list ap;
	va_start(ap, f);
	vfmt((char *)MB(DV_FN_MB_MESSAGE), DV_FN_MESSAGE_MAX, f, ap);
	va_end(ap);
}

static void __attribute__((noreturn)) exit_forever(u64 status) {
	for (;;) hypercall(HC_EXIT, status);
}

static void __attribute__((noreturn)) fn_finish(u32 outcome, i64 status) {
	MB64(DV_FN_MB_STDOUT_LEN) = stdout_len;
	MB64(DV_FN_MB_STDERR_LEN) = stderr_len;
	MB64(DV_FN_MB_EXIT_STATUS) = (u64)status;
	MB64(DV_FN_MB_MEMORY_USED) = peak;
	MB64(DV_FN_MB_SYSCALLS) = syscalls + fn_fs_calls;
	MB32(DV_FN_MB_ENOSYS_COUNT) = enosys_used;
	MB32(DV_FN_MB_OUTCOME) = outcome;
	__asm__ volatile("" ::: "memory");
	MB32(DV_FN_MB_STATE) = DV_FN_STATE_DONE;
	running = 0;
	exit_forever((u64)status);
}

static void __attribute__((noreturn)) init_failed(const char *f, ...) {
	va_list ap;
	va_start(ap, f);
	vfmt((char *)MB(DV_FN_MB_MESSAGE), DV_FN_MESSAGE_MAX, f, ap);
	va_end(ap);
	fn_finish(DV_FN_OUTCOME_INIT_FAILED, 0);
}

static const char *signal_name(int sig) {
	switch (sig) {
	case 4: return "SIGILL";
	case 5: return "SIGTRAP";
	case 6: return "SIGABRT";
	case 7: return "SIGBUS";
	case 8: return "SIGFPE";
	case 9: return "SIGKILL";
	case 11: return "SIGSEGV";
	case 15: return "SIGTERM";
	default: return "signal";
	}
}

/* An exception (fn_kernel.S → fn_entry.S). */
void __attribute__((noreturn)) fn_fault(u64 vector, u64 error, u64 addr, u64 rip) {
	int sig;
	switch (vector) {
	case 0: case 16: case 19: sig = 8; break;
	case 1: case 3: sig = 5; break;
	case 6: sig = 4; break;
	case 17: sig = 7; break;
	default: sig = 11; break;
	}
	if (!running) init_failed("the runtime faulted at init: vector %d, error %x, address %x, rip %x",
				  (i64)vector, error, addr, rip);
	if (vector == 14)
		message("%s: page fault at address %x, rip %x (error %x)", signal_name(sig), addr, rip, error);
	else
		message("%s: exception %d at rip %x (error %x)", signal_name(sig), (i64)vector, rip, error);
	fn_finish(DV_FN_OUTCOME_SIGNAL, sig);
}

/* ---- Checks ------------------------------------------------------------- */

/* A program pointer: inside guest RAM, above the VMM's low memory. */
static int user_ok(u64 p, u64 len) {
	return p >= LOW_RESERVED && p <= ram && len <= ram - p;
}

/* Copies a NUL-terminated string from the program; < 0 is an errno. */
static i64 user_string(u64 p, char *out, size_t cap) {
	for (size_t i = 0; i < cap; i++) {
		if (!user_ok(p + i, 1)) return -EFAULT;
		out[i] = ((const char *)(uintptr_t)p)[i];
		if (!out[i]) return (i64)i;
	}
	return -ENAMETOOLONG;
}

/* A bundle range: [off, off + len) inside the bundle. */
static int bundle_ok(u64 off, u64 len) {
	return off <= bundle_len && len <= bundle_len - off;
}

static u64 rd64(const u8 *p) {
	u64 v;
	memcpy(&v, p, 8);
	return v;
}

static u32 rd32(const u8 *p) {
	u32 v;
	memcpy(&v, p, 4);
	return v;
}

static u16 rd16(const u8 *p) {
	u16 v;
	memcpy(&v, p, 2);
	return v;
}

/* A NUL-terminated string at a bundle offset, or NULL. */
static const char *bundle_string(u64 off) {
	if (off >= bundle_len) return NULL;
	for (u64 i = off; i < bundle_len; i++)
		if (!bundle[i]) return (const char *)bundle + off;
	return NULL;
}

/* ---- Init --------------------------------------------------------------- */

static void check_bundle(u64 addr) {
	if (addr < (u64)(uintptr_t)__image_end || addr % 8 || addr >= ram || ram - addr < DV_FN_BN_HEADER_SIZE)
		init_failed("bad bundle address %x (RAM %x)", addr, ram);
	bundle = (u8 *)(uintptr_t)addr;
	if (rd32(bundle + DV_FN_BN_MAGIC) != DV_FN_BUNDLE_MAGIC) init_failed("bad bundle magic");
	if (rd32(bundle + DV_FN_BN_VERSION) != DV_FN_ABI_VERSION)
		init_failed("bundle version %d, runtime speaks %d", (i64)rd32(bundle + DV_FN_BN_VERSION),
			    (i64)DV_FN_ABI_VERSION);
	bundle_len = rd64(bundle + DV_FN_BN_TOTAL_LEN);
	if (bundle_len < DV_FN_BN_HEADER_SIZE || bundle_len > ram - addr)
		init_failed("bundle length %x does not fit RAM", bundle_len);
	argc = rd32(bundle + DV_FN_BN_ARGC);
	envc = rd32(bundle + DV_FN_BN_ENVC);
	file_count = rd32(bundle + DV_FN_BN_FILE_COUNT);
	exec_index = rd32(bundle + DV_FN_BN_EXEC_INDEX);
	if (argc < 1 || argc > ARG_MAX_FN || envc > ARG_MAX_FN - argc)
		init_failed("bad argc/envc %d/%d", (i64)argc, (i64)envc);
	if (file_count < 1 || file_count > FILE_MAX_FN || exec_index >= file_count)
		init_failed("bad file count %d or program index %d", (i64)file_count, (i64)exec_index);
	u64 soff = rd64(bundle + DV_FN_BN_STRINGS_OFF), sl = rd64(bundle + DV_FN_BN_STRINGS_LEN);
	if (!bundle_ok(soff, sl)) init_failed("strings outside the bundle");
	if (sl > STACK_BYTES / 2) init_failed("argv and envp take %x bytes: the stack holds %x", sl, STACK_BYTES / 2);
	u64 p = soff;
	for (u32 i = 0; i < argc + envc; i++) {
		u64 e = p;
		while (e < soff + sl && bundle[e]) e++;
		if (e >= soff + sl) init_failed("argv/envp string %d is not NUL-terminated in the bundle", (i64)i);
		strings[i] = (const char *)bundle + p;
		p = e + 1;
	}
	u64 foff = rd64(bundle + DV_FN_BN_FILES_OFF);
	if (!bundle_ok(foff, (u64)file_count * DV_FN_FILE_SIZE)) init_failed("file table outside the bundle");
	for (u32 i = 0; i < file_count; i++) {
		const u8 *e = bundle + foff + (u64)i * DV_FN_FILE_SIZE;
		const char *path = bundle_string(rd64(e + DV_FN_FILE_PATH_OFF));
		u64 doff = rd64(e + DV_FN_FILE_DATA_OFF), dlen = rd64(e + DV_FN_FILE_DATA_LEN);
		if (!path || path[0] != '/' || slen(path) >= PATH_MAX_FN)
			init_failed("file %d: bad path", (i64)i);
		if (!bundle_ok(doff, dlen)) init_failed("file %d (%s): data outside the bundle", (i64)i, path);
		files[i] = (struct bfile){path, bundle + doff, dlen, rd32(e + DV_FN_FILE_MODE) & 07777};
	}
}

#define PT_LOAD 1
#define PT_INTERP 3
#define PT_PHDR 6

static void load_program(void) {
	const struct bfile *f = &files[exec_index];
	const u8 *e = f->data;
	u64 len = f->len;
	if (len < 64 || e[0] != 0x7f || e[1] != 'E' || e[2] != 'L' || e[3] != 'F')
		init_failed("%s is not an ELF file", f->path);
	if (e[4] != 2 || e[5] != 1 || rd16(e + 18) != 62)
		init_failed("%s is not a little-endian x86-64 ELF64", f->path);
	u16 type = rd16(e + 16);
	if (type != 2 && type != 3) init_failed("%s is not an executable (ELF type %d)", f->path, (i64)type);
	u64 phoff = rd64(e + 32);
	u16 phentsize = rd16(e + 54), phnum = rd16(e + 56);
	if (phentsize != 56 || phnum == 0 || phnum > 64 || phoff > len || (u64)phnum * 56 > len - phoff)
		init_failed("%s: bad program headers", f->path);
	u64 base = type == 3 ? (prog_min > ET_DYN_BASE ? ALIGN_UP(prog_min, 2ull << 20) : ET_DYN_BASE) : 0;
	u64 limit = mmap_top; /* segments must end well below the stack */
	prog_end = 0;
	prog_phdr = 0;
	int loads = 0;
	for (u16 i = 0; i < phnum; i++) {
		const u8 *ph = e + phoff + (u64)i * 56;
		u32 pt = rd32(ph);
		u64 off = rd64(ph + 8), va = rd64(ph + 16), filesz = rd64(ph + 32), memsz = rd64(ph + 40);
		if (pt == PT_INTERP) init_failed("%s is dynamically linked (it names an interpreter)", f->path);
		if (pt == PT_PHDR) prog_phdr = base + va;
		if (pt != PT_LOAD) continue;
		if (filesz > memsz || off > len || filesz > len - off)
			init_failed("%s: segment %d lies outside the file", f->path, (i64)i);
		if (va > limit || base > limit - va || memsz > limit - base - va || base + va < prog_min)
			init_failed("%s: segment %d at %x+%x does not fit guest RAM [%x, %x)", f->path, (i64)i, base + va,
				    memsz, prog_min, limit);
		u8 *dst = (u8 *)(uintptr_t)(base + va);
		memcpy(dst, e + off, filesz);
		memset(dst + filesz, 0, memsz - filesz);
		if (!prog_phdr && phoff >= off && phoff - off < filesz) prog_phdr = base + va + (phoff - off);
		if (base + va + memsz > prog_end) prog_end = base + va + memsz;
		loads++;
	}
	if (!loads) init_failed("%s has no loadable segment", f->path);
	u64 entry = rd64(e + 24);
	prog_entry = base + entry;
	if (prog_entry < prog_min || prog_entry >= prog_end) init_failed("%s: entry %x outside its segments", f->path, prog_entry);
	if (!prog_phdr) init_failed("%s: program headers not in a loaded segment", f->path);
	prog_phnum = phnum;
}

static void calibrate_tsc(void) {
	i64 t0 = hypercall(HC_CLOCK, 0);
	u64 c0 = rdtsc(), c1 = c0;
	i64 t1 = t0;
	for (int i = 0; t0 >= 0 && i < 100000; i++) {
		t1 = hypercall(HC_CLOCK, 0);
		c1 = rdtsc();
		if (t1 < 0 || t1 - t0 >= 5000000) break;
	}
	if (t0 < 0 || t1 <= t0 || c1 <= c0)
		tsc_mul = (1ull << 32) / 3; /* no host clock: assume 3 GHz */
	else
		tsc_mul = (u64)(((unsigned __int128)(u64)(t1 - t0) << 32) / (c1 - c0));
}

void __attribute__((noreturn)) fn_init(u64 bundle_addr, u64 ram_bytes) {
	ram = ram_bytes & ~(PAGE - 1);
	/* Nothing beyond guest RAM is mapped (no MMIO reachable by accident). */
	for (u64 i = ALIGN_UP(ram, 2ull << 20) >> 21; i < 2048; i++) fn_pd[i] = 0;
	__asm__ volatile("" ::: "memory");
	MB32(DV_FN_MB_MAGIC) = DV_FN_MAILBOX_MAGIC;
	MB32(DV_FN_MB_VERSION) = DV_FN_ABI_VERSION;
	MB32(DV_FN_MB_STATE) = DV_FN_STATE_NONE;
	if (ram < (8ull << 20) || ram > (3ull << 30)) init_failed("RAM of %x bytes: 8 MiB to 3 GiB supported", ram);
	check_bundle(bundle_addr);

	/* Buffers and the stack below the bundle, the program and brk above the runtime. */
	u64 top = bundle_addr & ~(PAGE - 1);
	u64 io_cap = (ram / 16) & ~(PAGE - 1);
	if (io_cap < IO_CAP_MIN) io_cap = IO_CAP_MIN;
	if (io_cap > IO_CAP_MAX) io_cap = IO_CAP_MAX;
	prog_min = ALIGN_UP((u64)(uintptr_t)__image_end, PAGE);
	u64 need = STDERR_CAP + 2 * io_cap + STACK_BYTES + PAGE;
	if (top < prog_min + need) init_failed("guest RAM too small for the bundle and the buffers");
	stderr_addr = top - STDERR_CAP;
	stdout_cap = io_cap;
	stdout_addr = stderr_addr - stdout_cap;
	input_cap = io_cap;
	input_addr = stdout_addr - input_cap;
	stack_top = input_addr - PAGE;
	mmap_top = stack_top - STACK_BYTES;
	load_program();
	brk_start = ALIGN_UP(prog_end, PAGE);
	if (brk_start >= mmap_top) init_failed("guest RAM too small: no room left for the heap");
	calibrate_tsc();

	MB64(DV_FN_MB_INPUT_ADDR) = input_addr;
	MB64(DV_FN_MB_INPUT_CAP) = input_cap;
	MB64(DV_FN_MB_STDOUT_ADDR) = stdout_addr;
	MB64(DV_FN_MB_STDOUT_CAP) = stdout_cap;
	MB64(DV_FN_MB_STDERR_ADDR) = stderr_addr;
	MB64(DV_FN_MB_STDERR_CAP) = STDERR_CAP;
	MB32(DV_FN_MB_OUTCOME) = 0;
	((volatile char *)MB(DV_FN_MB_MESSAGE))[0] = 0;
	__asm__ volatile("" ::: "memory");
	MB32(DV_FN_MB_STATE) = DV_FN_STATE_READY;
	hypercall(HC_EXIT, 0);

	/* Resumed: a request, unless this VM already ran one (then only the
	 * checkpoint may resume it). */
	if (MB32(DV_FN_MB_STATE) != DV_FN_STATE_READY) exit_forever(0);
	void fn_request(void) __attribute__((noreturn));
	fn_request();
}

/* ---- Random numbers (xoshiro256**, seeded by the host per request) ----- */

static u64 rotl(u64 x, int k) {
	return (x << k) | (x >> (64 - k));
}

static u64 rng_next(void) {
	u64 r = rotl(rng[1] * 5, 7) * 9, t = rng[1] << 17;
	rng[2] ^= rng[0];
	rng[3] ^= rng[1];
	rng[1] ^= rng[2];
	rng[0] ^= rng[3];
	rng[2] ^= t;
	rng[3] = rotl(rng[3], 45);
	return r;
}

static void rng_fill(u8 *p, u64 n) {
	while (n) {
		u64 v = rng_next();
		for (int i = 0; i < 8 && n; i++, n--) *p++ = (u8)(v >> (8 * i));
	}
}

/* ---- A request ---------------------------------------------------------- */

#define AT_NULL 0
#define AT_PHDR 3
#define AT_PHENT 4
#define AT_PHNUM 5
#define AT_PAGESZ 6
#define AT_BASE 7
#define AT_FLAGS 8
#define AT_ENTRY 9
#define AT_UID 11
#define AT_EUID 12
#define AT_GID 13
#define AT_EGID 14
#define AT_PLATFORM 15
#define AT_HWCAP 16
#define AT_CLKTCK 17
#define AT_SECURE 23
#define AT_RANDOM 25
#define AT_HWCAP2 26
#define AT_EXECFN 31

static u64 push_string(u64 *sp, const char *s) {
	size_t n = slen(s) + 1;
	*sp -= n;
	memcpy((void *)(uintptr_t)*sp, s, n);
	return *sp;
}

void __attribute__((noreturn)) fn_request(void) {
	running = 1;
	input_len = MB64(DV_FN_MB_INPUT_LEN);
	if (input_len > input_cap) input_len = input_cap; /* the host checks this first */
	memory_limit = MB64(DV_FN_MB_MEMORY_LIMIT);
	output_limit = MB64(DV_FN_MB_OUTPUT_LIMIT);
	if (!output_limit || output_limit > stdout_cap + STDERR_CAP) output_limit = stdout_cap + STDERR_CAP;
	realtime_ns = MB64(DV_FN_MB_REALTIME_NS);
	monotonic_ns = MB64(DV_FN_MB_MONOTONIC_NS);
	tsc_base = rdtsc();
	for (int i = 0; i < 4; i++) rng[i] = MB64(DV_FN_MB_SEED + 8 * i);
	if (!(rng[0] | rng[1] | rng[2] | rng[3])) rng[0] = 0x9e3779b97f4a7c15ull;
	((volatile char *)MB(DV_FN_MB_MESSAGE))[0] = 0;
	input_off = stdout_len = stderr_len = 0;
	brk_cur = brk_hw = brk_start;
	clean_hi = mmap_top;
	mapped = peak = syscalls = 0;
	region_count = enosys_used = 0;
	fn_fs_calls = 0;
	for (int i = 0; i < FD_MAX; i++) fds[i].kind = FD_FREE;
	fds[0].kind = FD_STDIN;
	fds[1].kind = FD_STDOUT;
	fds[2].kind = FD_STDERR;
	cwd[0] = '/', cwd[1] = 0;

	/* The initial stack: strings, then the random bytes, then argc, argv, envp, auxv. */
	u64 sp = stack_top;
	u64 ptrs[ARG_MAX_FN];
	for (u32 i = 0; i < argc + envc; i++) ptrs[i] = push_string(&sp, strings[i]);
	u64 execfn = push_string(&sp, files[exec_index].path);
	u64 platform = push_string(&sp, "x86_64");
	sp -= 16;
	rng_fill((u8 *)(uintptr_t)sp, 16);
	u64 random = sp;
	u32 r[4];
	cpuid(1, 0, r);
	u64 hwcap = r[3];
	cpuid(7, 0, r);
	u64 hwcap2 = r[1] & 1 ? 2 : 0; /* HWCAP2_FSGSBASE */
	u64 aux[][2] = {
		{AT_PHDR, prog_phdr},	  {AT_PHENT, 56},	{AT_PHNUM, prog_phnum}, {AT_PAGESZ, PAGE},
		{AT_BASE, 0},		  {AT_FLAGS, 0},	{AT_ENTRY, prog_entry}, {AT_UID, FN_UID},
		{AT_EUID, FN_UID},	  {AT_GID, FN_UID},	{AT_EGID, FN_UID},	{AT_SECURE, 0},
		{AT_RANDOM, random},	  {AT_HWCAP, hwcap},	{AT_HWCAP2, hwcap2},	{AT_CLKTCK, 100},
		{AT_EXECFN, execfn},	  {AT_PLATFORM, platform}, {AT_NULL, 0},
	};
	u64 words = 1 + argc + 1 + envc + 1 + 2 * (sizeof aux / sizeof aux[0]);
	sp = (sp - words * 8) & ~15ull;
	u64 *w = (u64 *)(uintptr_t)sp;
	*w++ = argc;
	for (u32 i = 0; i < argc; i++) *w++ = ptrs[i];
	*w++ = 0;
	for (u32 i = 0; i < envc; i++) *w++ = ptrs[argc + i];
	*w++ = 0;
	memcpy(w, aux, sizeof aux);
	fn_enter_program(prog_entry, sp);
}

/* ---- Memory ------------------------------------------------------------- */

static u64 brk_bytes(void) {
	return ALIGN_UP(brk_cur, PAGE) - brk_start;
}

static void account(void) {
	u64 used = brk_bytes() + mapped;
	if (used > peak) peak = used;
}

/* Kills the program if `extra` more bytes would pass the limit. */
static void check_limit(u64 extra, const char *what) {
	u64 used = brk_bytes() + mapped;
	if (memory_limit && (extra > memory_limit || used > memory_limit - extra)) {
		if (used + extra > peak) peak = used + extra;
		message("%s of %x bytes beyond the memory limit of %x bytes (%x in use)", what, extra, memory_limit, used);
		fn_finish(DV_FN_OUTCOME_MEMORY_LIMIT, 0);
	}
}

static void __attribute__((noreturn)) out_of_ram(const char *what, u64 len) {
	message("%s of %x bytes: guest RAM exhausted (%x in use)", what, len, brk_bytes() + mapped);
	fn_finish(DV_FN_OUTCOME_MEMORY_LIMIT, 0);
}

/* Zeroes [s, e) where it may hold old data (below brk's high-water mark or above
 * the lowest address mmap ever handed out); RAM elsewhere is untouched since READY. */
static void zero_dirty(u64 s, u64 e) {
	if (s >= e) return;
	u64 a = s, b = e < brk_hw ? e : brk_hw;
	if (a < b) memset((void *)(uintptr_t)a, 0, b - a);
	a = s > clean_hi ? s : clean_hi;
	if (a < e) memset((void *)(uintptr_t)a, 0, e - a);
}

static u64 lowest_mapping(void) {
	return region_count ? regions[0].start : mmap_top;
}

static void remove_range(u64 s, u64 e) {
	for (u32 i = 0; i < region_count;) {
		struct region *r = &regions[i];
		if (r->end <= s || r->start >= e) {
			i++;
			continue;
		}
		if (r->start < s && r->end > e) { /* split */
			if (region_count == REGION_MAX) {
				/* keep the tail mapped rather than lose track of it */
				mapped -= r->end - s;
				r->end = s;
				i++;
				continue;
			}
			memmove(&regions[i + 2], &regions[i + 1], (region_count - i - 1) * sizeof *r);
			regions[i + 1] = (struct region){e, r->end};
			r->end = s;
			region_count++;
			mapped -= e - s;
			i += 2;
		} else if (r->start < s) {
			mapped -= r->end - s;
			r->end = s;
			i++;
		} else if (r->end > e) {
			mapped -= e - r->start;
			r->start = e;
			i++;
		} else {
			mapped -= r->end - r->start;
			memmove(r, r + 1, (region_count - i - 1) * sizeof *r);
			region_count--;
		}
	}
}

static int insert_range(u64 s, u64 e) {
	u32 i = 0;
	while (i < region_count && regions[i].start < s) i++;
	if (i > 0 && regions[i - 1].end == s) { /* merge with the one below */
		regions[i - 1].end = e;
		if (i < region_count && regions[i].start == e) {
			regions[i - 1].end = regions[i].end;
			memmove(&regions[i], &regions[i + 1], (region_count - i - 1) * sizeof regions[0]);
			region_count--;
		}
	} else if (i < region_count && regions[i].start == e) {
		regions[i].start = s;
	} else {
		if (region_count == REGION_MAX) return 0;
		memmove(&regions[i + 1], &regions[i], (region_count - i) * sizeof regions[0]);
		regions[i] = (struct region){s, e};
		region_count++;
	}
	mapped += e - s;
	if (s < clean_hi) clean_hi = s;
	account();
	return 1;
}

/* The highest free gap of `len` bytes between brk and mmap_top, or 0. */
static u64 find_gap(u64 len) {
	u64 floor = ALIGN_UP(brk_hw, PAGE);
	for (i64 i = (i64)region_count - 1; i >= -1; i--) {
		u64 hi = i == (i64)region_count - 1 ? mmap_top : regions[i + 1].start;
		u64 lo = i >= 0 ? regions[i].end : floor;
		if (lo < floor) lo = floor;
		if (hi > lo && hi - lo >= len) return hi - len;
	}
	return 0;
}

static i64 sys_brk(u64 want) {
	if (want < brk_start || want > lowest_mapping()) {
		if (want > brk_cur && want >= lowest_mapping() && want < mmap_top) out_of_ram("brk", want - brk_cur);
		return (i64)brk_cur;
	}
	u64 old_pages = ALIGN_UP(brk_cur, PAGE), new_pages = ALIGN_UP(want, PAGE);
	if (new_pages > old_pages) check_limit(new_pages - old_pages, "brk");
	if (want > brk_cur) zero_dirty(brk_cur, want);
	brk_cur = want;
	if (brk_cur > brk_hw) brk_hw = brk_cur;
	account();
	return (i64)brk_cur;
}

#define MAP_SHARED 1
#define MAP_PRIVATE 2
#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20
#define MAP_FIXED_NOREPLACE 0x100000

static i64 sys_mmap(u64 addr, u64 len, u64 prot, u64 flags, i64 fd, u64 off) {
	(void)prot;
	if (!len || len > ram || off % PAGE || !(flags & (MAP_SHARED | MAP_PRIVATE))) return -EINVAL;
	len = ALIGN_UP(len, PAGE);
	const struct bfile *f = NULL;
	if (!(flags & MAP_ANONYMOUS)) {
		if (fd < 0 || fd >= FD_MAX || fds[fd].kind == FD_FREE) return -EBADF;
		if (fds[fd].kind != FD_FILE) return -EINVAL;
		f = &files[fds[fd].file];
	}
	u64 start;
	if (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) {
		if (addr % PAGE || addr < ALIGN_UP(brk_hw, PAGE) || addr > mmap_top || len > mmap_top - addr)
			return -ENOMEM;
		if (flags & MAP_FIXED_NOREPLACE)
			for (u32 i = 0; i < region_count; i++)
				if (regions[i].start < addr + len && regions[i].end > addr) return -17; /* EEXIST */
		u64 was = mapped;
		remove_range(addr, addr + len);
		u64 freed = was - mapped;
		mapped += freed;
		check_limit(len - freed, "mmap");
		mapped -= freed;
		start = addr;
		memset((void *)(uintptr_t)start, 0, len);
	} else {
		check_limit(len, "mmap");
		start = find_gap(len);
		if (!start) out_of_ram("mmap", len);
		zero_dirty(start, start + len);
	}
	if (!insert_range(start, start + len)) return -ENOMEM;
	if (f && off < f->len) {
		u64 n = f->len - off < len ? f->len - off : len;
		memcpy((void *)(uintptr_t)start, f->data + off, n);
	}
	return (i64)start;
}

static i64 sys_munmap(u64 addr, u64 len) {
	if (addr % PAGE || !len || len > ram || addr > ram) return -EINVAL;
	remove_range(addr, addr + ALIGN_UP(len, PAGE));
	return 0;
}

static i64 sys_mremap(u64 old, u64 oldlen, u64 newlen, u64 flags) {
	if (old % PAGE || !newlen || newlen > ram || oldlen > ram || (flags & ~1ull)) return -EINVAL;
	oldlen = ALIGN_UP(oldlen, PAGE);
	newlen = ALIGN_UP(newlen, PAGE);
	int inside = 0;
	for (u32 i = 0; i < region_count; i++)
		if (regions[i].start <= old && regions[i].end >= old + oldlen) inside = 1;
	if (!inside) return -EFAULT;
	if (newlen <= oldlen) {
		remove_range(old + newlen, old + oldlen);
		return (i64)old;
	}
	u64 grow = newlen - oldlen, e = old + oldlen;
	int free_after = e + grow <= mmap_top;
	for (u32 i = 0; free_after && i < region_count; i++)
		if (regions[i].start < e + grow && regions[i].end > e) free_after = 0;
	check_limit(grow, "mremap");
	if (free_after) {
		zero_dirty(e, e + grow);
		if (!insert_range(e, e + grow)) return -ENOMEM;
		return (i64)old;
	}
	if (!(flags & 1)) return -ENOMEM;
	u64 start = find_gap(newlen);
	if (!start) out_of_ram("mremap", newlen);
	zero_dirty(start + oldlen, start + newlen);
	if (!insert_range(start, start + newlen)) return -ENOMEM;
	memmove((void *)(uintptr_t)start, (void *)(uintptr_t)old, oldlen);
	remove_range(old, old + oldlen);
	return (i64)start;
}

/* ---- Files -------------------------------------------------------------- */

/* Normalizes `path` (relative to `base`) into out; < 0 is an errno. */
static i64 resolve(const char *base, const char *path, char *out) {
	char tmp[2 * PATH_MAX_FN + 2];
	size_t n = 0, bl = slen(base), pl = slen(path);
	if (path[0] != '/') {
		memcpy(tmp, base, bl);
		n = bl;
		tmp[n++] = '/';
	}
	if (n + pl + 1 > sizeof tmp) return -ENAMETOOLONG;
	memcpy(tmp + n, path, pl + 1);
	/* Walk components. */
	size_t o = 0;
	const char *p = tmp;
	while (*p) {
		while (*p == '/') p++;
		if (!*p) break;
		const char *c = p;
		while (*p && *p != '/') p++;
		size_t cl = (size_t)(p - c);
		if (cl == 1 && c[0] == '.') continue;
		if (cl == 2 && c[0] == '.' && c[1] == '.') {
			while (o > 0 && out[o - 1] != '/') o--;
			if (o > 0) o--;
			continue;
		}
		if (o + 1 + cl + 1 > PATH_MAX_FN) return -ENAMETOOLONG;
		out[o++] = '/';
		memcpy(out + o, c, cl);
		o += cl;
	}
	if (!o) out[o++] = '/';
	out[o] = 0;
	return 0;
}

/* A file's index, or -1 (a directory is is_dir = 1, index -1). */
static i64 lookup(const char *path, int *is_dir) {
	*is_dir = 0;
	size_t pl = slen(path);
	for (u32 i = 0; i < file_count; i++)
		if (streq(files[i].path, path)) return i;
	if (pl == 1) {
		*is_dir = 1;
		return -1;
	}
	for (u32 i = 0; i < file_count; i++)
		if (!memcmp(files[i].path, path, pl) && files[i].path[pl] == '/') {
			*is_dir = 1;
			return -1;
		}
	return -1;
}

/* The base for a *at call's relative path. */
static i64 at_base(i64 dirfd, const char **base) {
	if (dirfd == -100) {
		*base = cwd;
		return 0;
	}
	if (dirfd < 0 || dirfd >= FD_MAX || fds[dirfd].kind == FD_FREE) return -EBADF;
	if (fds[dirfd].kind != FD_DIR) return -ENOTDIR;
	*base = fds[dirfd].path;
	return 0;
}

static i64 path_at(i64 dirfd, u64 upath, char *out) {
	char p[PATH_MAX_FN];
	i64 r = user_string(upath, p, sizeof p);
	if (r < 0) return r;
	if (r == 0) return -ENOENT;
	const char *base = "/";
	if (p[0] != '/' && (r = at_base(dirfd, &base)) < 0) return r;
	return resolve(base, p, out);
}

static i64 new_fd(i64 from) {
	for (i64 i = from < 0 ? 0 : from; i < FD_MAX; i++)
		if (fds[i].kind == FD_FREE) return i;
	return -EMFILE;
}

#define O_ACCMODE 3
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_DIRECTORY 0200000
#define O_CLOEXEC 02000000

static i64 sys_openat(i64 dirfd, u64 upath, u64 flags) {
	char path[PATH_MAX_FN];
	i64 r = path_at(dirfd, upath, path);
	if (r < 0) return r;
	int dir;
	i64 idx = lookup(path, &dir);
	if ((flags & O_ACCMODE) || (flags & (O_CREAT | O_TRUNC))) return idx < 0 && !dir && !(flags & O_CREAT) ? -ENOENT : -EROFS;
	if (idx < 0 && !dir) return -ENOENT;
	if ((flags & O_DIRECTORY) && !dir) return -ENOTDIR;
	i64 fd = new_fd(0);
	if (fd < 0) return fd;
	fds[fd] = (struct fd){.kind = dir ? FD_DIR : FD_FILE, .cloexec = !!(flags & O_CLOEXEC), .file = dir ? 0 : (u32)idx};
	if (dir) memcpy(fds[fd].path, path, slen(path) + 1);
	return fd;
}

#define S_IFIFO 0010000
#define S_IFDIR 0040000
#define S_IFREG 0100000

static void fill_stat(u64 ust, u32 mode, u64 size, u64 ino) {
	u8 *st = (u8 *)(uintptr_t)ust;
	memset(st, 0, 144);
	u64 dev = 0xd0, nlink = 1, blksize = 4096, blocks = (size + 511) / 512;
	u32 uid = FN_UID;
	memcpy(st + 0, &dev, 8);
	memcpy(st + 8, &ino, 8);
	memcpy(st + 16, &nlink, 8);
	memcpy(st + 24, &mode, 4);
	memcpy(st + 28, &uid, 4);
	memcpy(st + 32, &uid, 4);
	memcpy(st + 48, &size, 8);
	memcpy(st + 56, &blksize, 8);
	memcpy(st + 64, &blocks, 8);
}

static u64 path_ino(const char *p) {
	u64 h = 1469598103934665603ull;
	while (*p) h = (h ^ (u8)*p++) * 1099511628211ull;
	return h | 1ull << 40;
}

static i64 stat_fd(i64 fd, u64 ust) {
	if (fd < 0 || fd >= FD_MAX || fds[fd].kind == FD_FREE) return -EBADF;
	if (!user_ok(ust, 144)) return -EFAULT;
	struct fd *f = &fds[fd];
	if (f->kind == FD_FILE)
		fill_stat(ust, S_IFREG | files[f->file].mode, files[f->file].len, f->file + 2);
	else if (f->kind == FD_DIR)
		fill_stat(ust, S_IFDIR | 0755, 4096, path_ino(f->path));
	else
		fill_stat(ust, S_IFIFO | 0600, 0, 3 + f->kind);
	return 0;
}

#define AT_EMPTY_PATH 0x1000

static i64 sys_fstatat(i64 dirfd, u64 upath, u64 ust, u64 flags) {
	char p[PATH_MAX_FN], path[PATH_MAX_FN];
	i64 r = user_string(upath, p, sizeof p);
	if (r < 0) return r;
	if (r == 0 && (flags & AT_EMPTY_PATH)) return dirfd == -100 ? -EBADF : stat_fd(dirfd, ust);
	if ((r = path_at(dirfd, upath, path)) < 0) return r;
	if (!user_ok(ust, 144)) return -EFAULT;
	int dir;
	i64 idx = lookup(path, &dir);
	if (dir) fill_stat(ust, S_IFDIR | 0755, 4096, path_ino(path));
	else if (idx >= 0) fill_stat(ust, S_IFREG | files[idx].mode, files[idx].len, (u64)idx + 2);
	else return -ENOENT;
	return 0;
}

static i64 file_fd(i64 fd, struct fd **out) {
	if (fd < 0 || fd >= FD_MAX || fds[fd].kind == FD_FREE) return -EBADF;
	*out = &fds[fd];
	return 0;
}

static i64 sys_read(i64 fd, u64 buf, u64 len, i64 pos) {
	struct fd *f;
	i64 r = file_fd(fd, &f);
	if (r < 0) return r;
	if (!user_ok(buf, len)) return -EFAULT;
	const u8 *src;
	u64 size, *off, at;
	if (f->kind == FD_STDIN) {
		if (pos >= 0) return -ESPIPE;
		src = (const u8 *)(uintptr_t)input_addr, size = input_len, off = &input_off;
	} else if (f->kind == FD_FILE) {
		src = files[f->file].data, size = files[f->file].len, off = &f->off;
	} else if (f->kind == FD_DIR) {
		return -EISDIR;
	} else {
		return -EBADF;
	}
	at = pos >= 0 ? (u64)pos : *off;
	if (at >= size) return 0;
	u64 n = size - at < len ? size - at : len;
	memcpy((void *)(uintptr_t)buf, src + at, n);
	if (pos < 0) *off = at + n;
	return (i64)n;
}

static i64 sys_write(i64 fd, u64 buf, u64 len) {
	struct fd *f;
	i64 r = file_fd(fd, &f);
	if (r < 0) return r;
	if (f->kind != FD_STDOUT && f->kind != FD_STDERR) return -EBADF;
	if (!user_ok(buf, len)) return -EFAULT;
	u64 *used = f->kind == FD_STDOUT ? &stdout_len : &stderr_len;
	u64 cap = f->kind == FD_STDOUT ? stdout_cap : STDERR_CAP;
	u8 *dst = (u8 *)(uintptr_t)(f->kind == FD_STDOUT ? stdout_addr : stderr_addr);
	u64 total = stdout_len + stderr_len;
	u64 room = output_limit - total < cap - *used ? output_limit - total : cap - *used;
	u64 n = len < room ? len : room;
	memcpy(dst + *used, (const void *)(uintptr_t)buf, n);
	*used += n;
	if (n < len) {
		message("output beyond the limit of %x bytes (stdout %x, stderr %x)", output_limit, stdout_len, stderr_len);
		fn_finish(DV_FN_OUTCOME_OUTPUT_LIMIT, 0);
	}
	return (i64)n;
}

/* sendfile: from the input or a file of the set straight into stdout/stderr. */
static i64 sys_sendfile(i64 out, i64 in, u64 offp, u64 count) {
	struct fd *f, *o;
	i64 r = file_fd(in, &f);
	if (r < 0 || (r = file_fd(out, &o)) < 0) return r;
	if (o->kind != FD_STDOUT && o->kind != FD_STDERR) return -EINVAL;
	const u8 *src;
	u64 size, *off, at;
	if (f->kind == FD_STDIN) {
		if (offp) return -ESPIPE;
		src = (const u8 *)(uintptr_t)input_addr, size = input_len, off = &input_off;
	} else if (f->kind == FD_FILE) {
		src = files[f->file].data, size = files[f->file].len, off = &f->off;
	} else {
		return -EINVAL;
	}
	if (offp && !user_ok(offp, 8)) return -EFAULT;
	at = offp ? *(u64 *)(uintptr_t)offp : *off;
	if (at >= size) return 0;
	u64 n = size - at < count ? size - at : count;
	r = sys_write(out, (u64)(uintptr_t)(src + at), n);
	if (r < 0) return r;
	if (offp) *(u64 *)(uintptr_t)offp = at + (u64)r;
	else *off = at + (u64)r;
	return r;
}

static i64 sys_iov(i64 fd, u64 iov, u64 cnt, int writing) {
	if (cnt > 1024) return -EINVAL;
	if (!user_ok(iov, cnt * 16)) return -EFAULT;
	i64 total = 0;
	for (u64 i = 0; i < cnt; i++) {
		u64 base = ((u64 *)(uintptr_t)iov)[2 * i], len = ((u64 *)(uintptr_t)iov)[2 * i + 1];
		if (!len) continue;
		i64 r = writing ? sys_write(fd, base, len) : sys_read(fd, base, len, -1);
		if (r < 0) return total ? total : r;
		total += r;
		if ((u64)r < len) break;
	}
	return total;
}

static i64 sys_lseek(i64 fd, i64 off, u64 whence) {
	struct fd *f;
	i64 r = file_fd(fd, &f);
	if (r < 0) return r;
	if (f->kind == FD_DIR) {
		if (whence == 0 && off == 0) return f->off = 0;
		return -EINVAL;
	}
	if (f->kind != FD_FILE) return -ESPIPE;
	i64 base = whence == 0 ? 0 : whence == 1 ? (i64)f->off : whence == 2 ? (i64)files[f->file].len : -1;
	if (base < 0 || whence > 2) return -EINVAL;
	if (base + off < 0) return -EINVAL;
	f->off = (u64)(base + off);
	return (i64)f->off;
}

/* The name of `path`'s child under `dir` (prefix of length dl), its length, and
 * whether it is a directory. */
static size_t child(const char *path, size_t dl, int *is_dir) {
	const char *c = path + dl;
	size_t n = 0;
	while (c[n] && c[n] != '/') n++;
	*is_dir = c[n] == '/';
	return n;
}

static i64 sys_getdents64(i64 fd, u64 buf, u64 len) {
	struct fd *f;
	i64 r = file_fd(fd, &f);
	if (r < 0) return r;
	if (f->kind != FD_DIR) return -ENOTDIR;
	if (!user_ok(buf, len)) return -EFAULT;
	size_t dl = slen(f->path);
	if (dl == 1) dl = 0; /* "/": children follow the root's "/" */
	u64 pos = 0;
	u8 *out = (u8 *)(uintptr_t)buf;
	for (u64 i = f->off; i < file_count; i++) {
		const char *p = files[i].path;
		if (memcmp(p, f->path, dl) || p[dl] != '/') continue;
		int isdir;
		size_t n = child(p, dl + 1, &isdir);
		int dup = 0;
		for (u64 j = 0; j < i && !dup; j++) {
			const char *q = files[j].path;
			int d2;
			if (!memcmp(q, f->path, dl) && q[dl] == '/' && child(q, dl + 1, &d2) == n &&
			    !memcmp(q + dl + 1, p + dl + 1, n))
				dup = 1;
		}
		if (dup) continue;
		u64 reclen = ALIGN_UP(19 + n + 1, 8ull);
		if (pos + reclen > len) {
			if (!pos) return -EINVAL;
			break;
		}
		u64 ino = isdir ? (u64)i + (1ull << 40) : (u64)i + 2, next = i + 1;
		u16 rl = (u16)reclen;
		memset(out + pos, 0, reclen);
		memcpy(out + pos, &ino, 8);
		memcpy(out + pos + 8, &next, 8);
		memcpy(out + pos + 16, &rl, 2);
		out[pos + 18] = isdir ? 4 : 8;
		memcpy(out + pos + 19, p + dl + 1, n);
		pos += reclen;
		f->off = i + 1;
	}
	if (f->off < file_count && !pos) f->off = file_count;
	return (i64)pos;
}

static i64 sys_dup(i64 fd, i64 to, int exact, u64 flags) {
	struct fd *f;
	i64 r = file_fd(fd, &f);
	if (r < 0) return r;
	if (exact) {
		if (to < 0 || to >= FD_MAX) return -EBADF;
		if (to == fd) return to;
	} else {
		to = new_fd(to);
		if (to < 0) return to;
	}
	fds[to] = *f;
	fds[to].cloexec = !!(flags & O_CLOEXEC);
	return to;
}

static i64 sys_readlinkat(i64 dirfd, u64 upath, u64 buf, u64 len) {
	char path[PATH_MAX_FN];
	i64 r = path_at(dirfd, upath, path);
	if (r < 0) return r;
	if (!user_ok(buf, len)) return -EFAULT;
	if (streq(path, "/proc/self/exe")) {
		const char *exe = files[exec_index].path;
		u64 n = slen(exe);
		if (n > len) n = len;
		memcpy((void *)(uintptr_t)buf, exe, n);
		return (i64)n;
	}
	int dir;
	return lookup(path, &dir) >= 0 || dir ? -EINVAL : -ENOENT;
}

static i64 sys_faccessat(i64 dirfd, u64 upath, u64 mode) {
	char path[PATH_MAX_FN];
	i64 r = path_at(dirfd, upath, path);
	if (r < 0) return r;
	int dir;
	i64 idx = lookup(path, &dir);
	if (idx < 0 && !dir) return -ENOENT;
	if (mode & 2) return -EROFS;
	if ((mode & 1) && idx >= 0 && !(files[idx].mode & 0111)) return -13; /* EACCES */
	return 0;
}

/* ---- Time, identity, signals -------------------------------------------- */

static u64 elapsed_ns(void) {
	return (u64)(((unsigned __int128)(rdtsc() - tsc_base) * tsc_mul) >> 32);
}

static i64 sys_clock_gettime(u64 clk, u64 ts) {
	if (clk > 11) return -EINVAL;
	if (!user_ok(ts, 16)) return -EFAULT;
	u64 d = elapsed_ns();
	u64 t = clk == 0 || clk == 5 || clk == 8 || clk == 11 ? realtime_ns + d : clk == 2 || clk == 3 ? d : monotonic_ns + d;
	u64 *p = (u64 *)(uintptr_t)ts;
	p[0] = t / 1000000000ull;
	p[1] = t % 1000000000ull;
	return 0;
}

static void record_enosys(u64 nr) {
	volatile u32 *t = (volatile u32 *)MB(DV_FN_MB_ENOSYS);
	for (u32 i = 0; i < enosys_used; i++)
		if (t[2 * i] == nr) {
			t[2 * i + 1]++;
			return;
		}
	if (enosys_used < DV_FN_ENOSYS_MAX) {
		t[2 * enosys_used] = (u32)nr;
		t[2 * enosys_used + 1] = 1;
		enosys_used++;
	}
}

static int signal_ignored(u64 sig) {
	u64 handler;
	memcpy(&handler, sigactions[sig], 8);
	if (handler == 1) return 1; /* SIG_IGN */
	/* Default: ignore for SIGCHLD, SIGCONT, SIGURG, SIGWINCH. */
	return handler == 0 && (sig == 17 || sig == 18 || sig == 23 || sig == 28);
}

static i64 raise_self(u64 sig) {
	if (sig > 64) return -EINVAL;
	if (sig == 0 || signal_ignored(sig)) return 0;
	message("%s raised by the program itself (signal %d)", signal_name((int)sig), (i64)sig);
	fn_finish(DV_FN_OUTCOME_SIGNAL, (i64)sig);
}

static void put_field(char *uts, int i, const char *s) {
	memcpy(uts + 65 * i, s, slen(s) + 1);
}

/* ---- The dispatcher ----------------------------------------------------- */

i64 fn_syscall(u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5, u64 nr) {
	syscalls++;
	switch (nr) {
	case 0: return sys_read((i64)a0, a1, a2, -1);
	case 1: return sys_write((i64)a0, a1, a2);
	case 2: return sys_openat(-100, a0, a1);
	case 3: /* close */
		if ((i64)a0 < 0 || a0 >= FD_MAX || fds[a0].kind == FD_FREE) return -EBADF;
		fds[a0].kind = FD_FREE;
		return 0;
	case 4: return sys_fstatat(-100, a0, a1, 0);  /* stat */
	case 5: return stat_fd((i64)a0, a1);           /* fstat */
	case 6: return sys_fstatat(-100, a0, a1, 0);  /* lstat */
	case 7: { /* poll */
		if (a1 > FD_MAX) return -EINVAL;
		if (!user_ok(a0, a1 * 8)) return -EFAULT;
		i64 ready = 0;
		for (u64 i = 0; i < a1; i++) {
			u8 *p = (u8 *)(uintptr_t)(a0 + 8 * i);
			i32 fd;
			u16 ev, rev = 0;
			memcpy(&fd, p, 4);
			memcpy(&ev, p + 4, 2);
			if (fd >= 0 && fd < FD_MAX && fds[fd].kind != FD_FREE)
				rev = ev & (fds[fd].kind == FD_STDOUT || fds[fd].kind == FD_STDERR ? 4 : 1);
			else if (fd >= 0)
				rev = 0x20; /* POLLNVAL */
			memcpy(p + 6, &rev, 2);
			ready += rev != 0;
		}
		return ready;
	}
	case 8: return sys_lseek((i64)a0, (i64)a1, a2);
	case 9: return sys_mmap(a0, a1, a2, a3, (i64)a4, a5);
	case 10: return a0 % PAGE ? -EINVAL : 0; /* mprotect: no protection to change */
	case 11: return sys_munmap(a0, a1);
	case 12: return sys_brk(a0);
	case 13: /* rt_sigaction */
		if (!a0 || a0 > 64 || a3 != 8 || ((a0 == 9 || a0 == 19) && a1)) return -EINVAL;
		if ((a2 && !user_ok(a2, 32)) || (a1 && !user_ok(a1, 32))) return -EFAULT;
		if (a2) memcpy((void *)(uintptr_t)a2, sigactions[a0], 32);
		if (a1) memcpy(sigactions[a0], (void *)(uintptr_t)a1, 32);
		return 0;
	case 14: /* rt_sigprocmask */
		if (a3 != 8 || a0 > 2) return -EINVAL;
		if ((a2 && !user_ok(a2, 8)) || (a1 && !user_ok(a1, 8))) return -EFAULT;
		if (a2) *(u64 *)(uintptr_t)a2 = sigmask;
		if (a1) {
			u64 set = *(u64 *)(uintptr_t)a1;
			sigmask = a0 == 0 ? sigmask | set : a0 == 1 ? sigmask & ~set : set;
		}
		return 0;
	case 16: /* ioctl */
		if ((i64)a0 < 0 || a0 >= FD_MAX || fds[a0].kind == FD_FREE) return -EBADF;
		return -ENOTTY;
	case 17: return (i64)a3 < 0 ? -EINVAL : sys_read((i64)a0, a1, a2, (i64)a3); /* pread64 */
	case 19: return sys_iov((i64)a0, a1, a2, 0);
	case 20: return sys_iov((i64)a0, a1, a2, 1);
	case 21: return sys_faccessat(-100, a0, a1);
	case 24: return 0; /* sched_yield */
	case 40: return sys_sendfile((i64)a0, (i64)a1, a2, a3);
	case 25: return sys_mremap(a0, a1, a2, a3);
	case 26: return 0; /* msync */
	case 28: return 0; /* madvise */
	case 32: return sys_dup((i64)a0, 0, 0, 0);
	case 33: return sys_dup((i64)a0, (i64)a1, 1, 0);
	case 35: return 0; /* nanosleep: no time passes in a function */
	case 37: return 0; /* alarm */
	case 39: return FN_PID;
	case 60: case 231: fn_finish(DV_FN_OUTCOME_EXITED, (i64)(a0 & 0xff));
	case 62: return (i64)a0 == FN_PID || (i64)a0 == 0 || (i64)a0 == -1 ? raise_self(a1) : -ESRCH; /* kill */
	case 63: { /* uname */
		if (!user_ok(a0, 6 * 65)) return -EFAULT;
		char *u = (char *)(uintptr_t)a0;
		memset(u, 0, 6 * 65);
		put_field(u, 0, "Linux");
		put_field(u, 1, "denovisor");
		put_field(u, 2, "6.1.0-denovisor-fn");
		put_field(u, 3, "#1 SMP denovisor function runtime");
		put_field(u, 4, "x86_64");
		put_field(u, 5, "(none)");
		return 0;
	}
	case 72: { /* fcntl */
		struct fd *f;
		i64 r = file_fd((i64)a0, &f);
		if (r < 0) return r;
		switch (a1) {
		case 0: return sys_dup((i64)a0, (i64)a2, 0, 0);
		case 1030: return sys_dup((i64)a0, (i64)a2, 0, O_CLOEXEC);
		case 1: return f->cloexec;
		case 2: f->cloexec = a2 & 1; return 0;
		case 3: return f->kind == FD_STDOUT || f->kind == FD_STDERR ? 1 : 0;
		case 4: return 0;
		default: return -EINVAL;
		}
	}
	case 79: /* getcwd */
		if (!user_ok(a0, a1)) return -EFAULT;
		if (slen(cwd) + 1 > a1) return -ERANGE;
		memcpy((void *)(uintptr_t)a0, cwd, slen(cwd) + 1);
		return (i64)slen(cwd) + 1;
	case 80: { /* chdir */
		char path[PATH_MAX_FN];
		i64 r = path_at(-100, a0, path);
		if (r < 0) return r;
		int dir;
		i64 idx = lookup(path, &dir);
		if (!dir) return idx >= 0 ? -ENOTDIR : -ENOENT;
		memcpy(cwd, path, slen(path) + 1);
		return 0;
	}
	case 89: return sys_readlinkat(-100, a0, a1, a2);
	case 95: return 022; /* umask */
	case 96: { /* gettimeofday */
		if (a0) {
			if (!user_ok(a0, 16)) return -EFAULT;
			u64 t = realtime_ns + elapsed_ns();
			((u64 *)(uintptr_t)a0)[0] = t / 1000000000ull;
			((u64 *)(uintptr_t)a0)[1] = t % 1000000000ull / 1000;
		}
		return 0;
	}
	case 97: /* getrlimit */
		a3 = a1, a1 = 0;
		/* fall through */
	case 302: { /* prlimit64(pid, resource, new, old) */
		u64 res = nr == 97 ? a0 : a1, old = a3;
		if (nr == 302 && a0 && a0 != FN_PID) return -ESRCH;
		if (res > 15) return -EINVAL;
		if (old) {
			if (!user_ok(old, 16)) return -EFAULT;
			u64 v = res == 3 ? STACK_BYTES : res == 7 ? FD_MAX : ~0ull;
			((u64 *)(uintptr_t)old)[0] = v;
			((u64 *)(uintptr_t)old)[1] = v;
		}
		return 0;
	}
	case 98: /* getrusage */
		if (!user_ok(a1, 144)) return -EFAULT;
		memset((void *)(uintptr_t)a1, 0, 144);
		return 0;
	case 99: { /* sysinfo: RAM as the program sees it */
		if (!user_ok(a0, 112)) return -EFAULT;
		u8 *si = (u8 *)(uintptr_t)a0;
		memset(si, 0, 112);
		u64 uptime = (monotonic_ns + elapsed_ns()) / 1000000000ull, total = mmap_top - brk_start;
		u64 used = brk_bytes() + mapped, free_ram = used < total ? total - used : 0;
		u16 procs = 1;
		u32 unit = 1;
		memcpy(si, &uptime, 8);
		memcpy(si + 32, &total, 8);
		memcpy(si + 40, &free_ram, 8);
		memcpy(si + 80, &procs, 2);
		memcpy(si + 104, &unit, 4);
		return 0;
	}
	case 100: { /* times */
		u64 ticks = elapsed_ns() / 10000000ull;
		if (a0) {
			if (!user_ok(a0, 32)) return -EFAULT;
			u64 *t = (u64 *)(uintptr_t)a0;
			t[0] = ticks, t[1] = t[2] = t[3] = 0;
		}
		return (i64)ticks;
	}
	case 102: case 107: return FN_UID; /* getuid, geteuid */
	case 104: case 108: return FN_UID; /* getgid, getegid */
	case 105: case 106: case 113: case 114: case 117: case 119: /* set*uid, set*gid */
		return a0 == FN_UID || (i64)a0 == -1 ? 0 : -EPERM;
	case 116: return 0; /* setgroups */
	case 115: return 0; /* getgroups: none */
	case 110: return 1;                /* getppid */
	case 111: case 121: case 124: return FN_PID; /* getpgrp, getpgid, getsid */
	case 131: /* sigaltstack */
		if ((a1 && !user_ok(a1, 24)) || (a0 && !user_ok(a0, 24))) return -EFAULT;
		if (a1) memcpy((void *)(uintptr_t)a1, altstack, 24);
		if (a0) memcpy(altstack, (void *)(uintptr_t)a0, 24);
		return 0;
	case 157: /* prctl: only the thread's name */
		if (a0 == 15 || a0 == 16) {
			if (!user_ok(a1, 16)) return -EFAULT;
			if (a0 == 15) memcpy(comm, (void *)(uintptr_t)a1, 16), comm[15] = 0;
			else memcpy((void *)(uintptr_t)a1, comm, 16);
			return 0;
		}
		return -EINVAL;
	case 158: /* arch_prctl: ARCH_SET_FS is served at CPL0 (fn_kernel.S) */
		if (a0 == 0x1003) {
			if (!user_ok(a1, 8)) return -EFAULT;
			*(u64 *)(uintptr_t)a1 = fn_fs_base;
			return 0;
		}
		return -EINVAL;
	case 186: return FN_PID; /* gettid */
	case 200: case 234: /* tkill, tgkill */
		if (nr == 234 ? ((i64)a0 != FN_PID || (i64)a1 != FN_PID) : (i64)a0 != FN_PID) return -ESRCH;
		return raise_self(nr == 234 ? a2 : a1);
	case 201: { /* time */
		u64 t = (realtime_ns + elapsed_ns()) / 1000000000ull;
		if (a0) {
			if (!user_ok(a0, 8)) return -EFAULT;
			*(u64 *)(uintptr_t)a0 = t;
		}
		return (i64)t;
	}
	case 202: /* futex: one thread, so a wait never blocks and a wake wakes nobody */
		switch (a1 & 0x7f) {
		case 0: case 9: return -EAGAIN;
		case 1: case 10: return 0;
		default: break;
		}
		break;
	case 204: /* sched_getaffinity */
		if (a1 < 8) return -EINVAL;
		if (!user_ok(a2, 8)) return -EFAULT;
		*(u64 *)(uintptr_t)a2 = 1;
		return 8;
	case 217: return sys_getdents64((i64)a0, a1, a2);
	case 218: return FN_PID; /* set_tid_address */
	case 228: return sys_clock_gettime(a0, a1);
	case 229: /* clock_getres */
		if (a1) {
			if (!user_ok(a1, 16)) return -EFAULT;
			((u64 *)(uintptr_t)a1)[0] = 0, ((u64 *)(uintptr_t)a1)[1] = 1;
		}
		return a0 > 11 ? -EINVAL : 0;
	case 230: return 0; /* clock_nanosleep */
	case 257: return sys_openat((i64)a0, a1, a2);
	case 262: return sys_fstatat((i64)a0, a1, a2, a3);
	case 267: return sys_readlinkat((i64)a0, a1, a2, a3);
	case 269: case 439: return sys_faccessat((i64)a0, a1, a2);
	case 273: return 0; /* set_robust_list */
	case 292: return (a2 & ~O_CLOEXEC) ? -EINVAL : sys_dup((i64)a0, (i64)a1, 1, a2); /* dup3 */
	case 318: /* getrandom */
		if (!user_ok(a0, a1)) return -EFAULT;
		rng_fill((u8 *)(uintptr_t)a0, a1);
		return (i64)a1;
	case 334: return -ENOSYS; /* rseq: glibc runs without it (not counted) */
	default: break;
	}
	record_enosys(nr);
	return -ENOSYS;
}
