/* echo.c: the simplest function: its output is its input. */
#include "dv_fn.h"

int main(int argc, char **argv) {
	(void)argc, (void)argv;
	size_t len;
	const uint8_t *in = dv_fn_input(&len);
	if (!in) {
		dv_fn_error("out of memory reading the input");
		return 1;
	}
	return dv_fn_output(in, len) < 0 ? 1 : 0;
}
