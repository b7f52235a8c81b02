/*
 * dv_fn.h: the SDK for functions written for the denovisor function runtime.
 *
 * A function is a static x86-64 Linux program with no C library: these calls
 * are raw Linux system calls, so the same ELF runs in the function runtime
 * (guest/fn/runtime/) and natively on Linux. Build one with
 * `deno run -A main.ts fn-build SOURCE [-o OUT]` (src/build/fn_build.ts), which
 * links it with dv_fn.c (the entry point `_start` calls `main`).
 *
 *   int main(int argc, char **argv) {
 *       size_t len;
 *       const uint8_t *in = dv_fn_input(&len);   // all of stdin
 *       dv_fn_output(in, len);                   // to stdout
 *       return 0;                                // the exit status
 *   }
 */
#ifndef DV_FN_H
#define DV_FN_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* A raw Linux system call; negative results are -errno. */
long dv_fn_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5);

/* The whole input (stdin), read once into memory from brk; *len its size.
 * NULL (and *len = 0) when memory runs out. */
const void *dv_fn_input(size_t *len);

/* Writes all of buf to stdout; returns len, or -errno. */
long dv_fn_output(const void *buf, size_t len);

/* The same as dv_fn_output. */
long dv_fn_write(const void *buf, size_t len);

/* Formats to stdout (one write): %s %c %d %i %u %x %p %% with the l, ll, z
 * length modifiers; returns the bytes written (output longer than 1 KiB is cut). */
int dv_fn_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Writes a NUL-terminated string to stdout. */
long dv_fn_puts(const char *s);

/* Writes "error: MSG\n" to stderr. */
void dv_fn_error(const char *msg);

/* Ends the function with status (exit_group). */
void dv_fn_exit(int status) __attribute__((noreturn));

/* Memory from brk, 16-byte aligned, never freed; NULL when none is left. */
void *dv_fn_alloc(size_t len);

/* The freestanding basics gcc may call. */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t dv_fn_strlen(const char *s);

#endif
