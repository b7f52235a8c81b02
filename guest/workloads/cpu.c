/*
 * cpu.c: pure computation. SHA-256 over `arg` MiB of generated data (xorshift64*
 * output, produced block by block, so the working set stays in L1). Everything
 * runs at CPL3 without a single VM exit between the two clock reads.
 *
 * checksum: the digest's first 8 bytes, big-endian.   ops: bytes hashed.
 */
#include "dv_guest.h"

#define DEFAULT_MIB 32

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
	0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
	0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
	0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
	0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
	0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
	0xc67178f2,
};

struct sha256 {
	uint32_t h[8];
	uint64_t bytes;
	uint8_t block[64];
	unsigned used;
};

static inline uint32_t ror(uint32_t x, unsigned n)
{
	return (x >> n) | (x << (32 - n));
}

static void compress(uint32_t h[8], const uint8_t *p)
{
	uint32_t w[64];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (int i = 16; i < 64; i++) {
		uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
	for (int i = 0; i < 64; i++) {
		uint32_t t1 = hh + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] +
			      w[i];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		hh = g;
		g = f;
		f = e;
		e = d + t1;
		d = c;
		c = b;
		b = a;
		a = t1 + t2;
	}
	h[0] += a;
	h[1] += b;
	h[2] += c;
	h[3] += d;
	h[4] += e;
	h[5] += f;
	h[6] += g;
	h[7] += hh;
}

static void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
					0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
	for (int i = 0; i < 8; i++)
		s->h[i] = iv[i];
	s->bytes = 0;
	s->used = 0;
}

static void sha256_update(struct sha256 *s, const uint8_t *p, size_t n)
{
	s->bytes += n;
	while (n > 0) {
		if (s->used == 0 && n >= 64) {
			compress(s->h, p);
			p += 64;
			n -= 64;
			continue;
		}
		s->block[s->used++] = *p++;
		n--;
		if (s->used == 64) {
			compress(s->h, s->block);
			s->used = 0;
		}
	}
}

static void sha256_final(struct sha256 *s, uint8_t out[32])
{
	uint64_t bits = s->bytes * 8;
	uint8_t pad[72] = { 0x80 };
	size_t padlen = (s->used < 56 ? 56 : 120) - s->used;
	for (int i = 0; i < 8; i++)
		pad[padlen + i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(s, pad, padlen + 8);
	for (int i = 0; i < 8; i++) {
		out[4 * i] = (uint8_t)(s->h[i] >> 24);
		out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
		out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
		out[4 * i + 3] = (uint8_t)s->h[i];
	}
}

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

int main(uint64_t arg)
{
	if (arg == 0)
		arg = DEFAULT_MIB;
	uint8_t digest[32];
	struct sha256 s;

	/* Known answer first: SHA-256("abc") starts with ba7816bf8f01cfea. */
	sha256_init(&s);
	sha256_update(&s, (const uint8_t *)"abc", 3);
	sha256_final(&s, digest);
	if (be64(digest) != 0xba7816bf8f01cfeaull) {
		dv_printf("cpu: SHA-256 self-test failed\n");
		return 2;
	}

	uint64_t blocks = arg * (1u << 20) / 64;
	uint64_t x = 0x9e3779b97f4a7c15ull;
	union {
		uint64_t q[8];
		uint8_t b[64];
	} block;

	uint64_t t0 = dv_clock_ns();
	sha256_init(&s);
	for (uint64_t i = 0; i < blocks; i++) {
		for (int j = 0; j < 8; j++) {
			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			block.q[j] = x * 0x2545f4914f6cdd1dull;
		}
		sha256_update(&s, block.b, 64);
	}
	sha256_final(&s, digest);
	uint64_t t1 = dv_clock_ns();

	dv_report_result("cpu", arg, be64(digest), t1 - t0, blocks * 64);
	return 0;
}
