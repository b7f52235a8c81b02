/*
 * wordfreq.c: counts the words of its input (runs of ASCII letters, folded to
 * lower case) and prints "COUNT WORD" lines, most frequent first (ties in
 * alphabetical order), at most the first argument's number of lines (default 10).
 */
#include "dv_fn.h"

#define TABLE (1 << 16)

struct word {
	const uint8_t *text;
	uint32_t len, count;
};

static int lower(int c) {
	return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

static int is_letter(int c) {
	c = lower(c);
	return c >= 'a' && c <= 'z';
}

static int same(const struct word *w, const uint8_t *t, uint32_t n) {
	if (w->len != n) return 0;
	for (uint32_t i = 0; i < n; i++)
		if (lower(w->text[i]) != lower(t[i])) return 0;
	return 1;
}

/* < 0 when a sorts before b: higher count first, then alphabetical. */
static int order(const struct word *a, const struct word *b) {
	if (a->count != b->count) return a->count > b->count ? -1 : 1;
	for (uint32_t i = 0; i < a->len && i < b->len; i++) {
		int d = lower(a->text[i]) - lower(b->text[i]);
		if (d) return d;
	}
	return (int)a->len - (int)b->len;
}

static void put_number(uint64_t v) {
	char buf[24];
	int i = 24;
	do buf[--i] = (char)('0' + v % 10), v /= 10;
	while (v);
	dv_fn_output(buf + i, (size_t)(24 - i));
}

int main(int argc, char **argv) {
	uint64_t limit = 10;
	if (argc > 1) {
		limit = 0;
		for (const char *p = argv[1]; *p >= '0' && *p <= '9'; p++) limit = limit * 10 + (uint64_t)(*p - '0');
	}
	size_t len;
	const uint8_t *in = dv_fn_input(&len);
	struct word *table = dv_fn_alloc(TABLE * sizeof *table);
	if (!in || !table) {
		dv_fn_error("out of memory");
		return 1;
	}
	memset(table, 0, TABLE * sizeof *table);
	uint32_t distinct = 0;
	for (size_t i = 0; i < len;) {
		if (!is_letter(in[i])) {
			i++;
			continue;
		}
		size_t s = i;
		uint32_t h = 2166136261u;
		while (i < len && is_letter(in[i])) h = (h ^ (uint32_t)lower(in[i++])) * 16777619u;
		uint32_t n = (uint32_t)(i - s), slot = h & (TABLE - 1);
		while (table[slot].len && !same(&table[slot], in + s, n)) slot = (slot + 1) & (TABLE - 1);
		if (!table[slot].len) {
			if (++distinct > TABLE / 2) {
				dv_fn_error("too many distinct words");
				return 1;
			}
			table[slot] = (struct word){in + s, n, 0};
		}
		table[slot].count++;
	}
	/* Compact, then a selection of the top `limit`. */
	uint32_t m = 0;
	for (uint32_t i = 0; i < TABLE; i++)
		if (table[i].len) table[m++] = table[i];
	for (uint64_t k = 0; k < limit && k < m; k++) {
		uint32_t best = (uint32_t)k;
		for (uint32_t j = (uint32_t)k + 1; j < m; j++)
			if (order(&table[j], &table[best]) < 0) best = j;
		struct word t = table[k];
		table[k] = table[best];
		table[best] = t;
		put_number(table[k].count);
		dv_fn_output(" ", 1);
		char buf[256];
		uint32_t n = table[k].len < sizeof buf ? table[k].len : sizeof buf;
		for (uint32_t i = 0; i < n; i++) buf[i] = (char)lower(table[k].text[i]);
		dv_fn_output(buf, n);
		dv_fn_output("\n", 1);
	}
	return 0;
}
