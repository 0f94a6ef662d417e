/*
 * The three stages of a shell pipeline, with data in flight between them.
 *
 * usage: sh -c 'tree_pipeline produce BYTES WINDOW | tree_pipeline filter |
 *               tree_pipeline consume WINDOW'
 *
 * produce writes BYTES (a multiple of 4096) of reproducible data: the first 32 KiB, then "READY"
 * on stderr, then the rest once WINDOW seconds are over.  filter turns every byte into two hex
 * digits, with a newline after every 32 input bytes: its output does not fit in the next pipe, so
 * it blocks with data in its own buffer and in both pipes.  consume reads nothing before WINDOW
 * seconds are over, then everything, and prints "SUM <FNV-1a 64 of its input> <bytes>".  Each
 * stage checks its pid, parent, session and group at the end and exits 0, or prints
 * "FAIL <stage>: ..." on stderr and exits 1.  WINDOW 0 gives the reference checksum.
 */
#include "tree.h"

#define BLOCK 4096
#define FIRST (32 * 1024)

static char in[BLOCK], out[BLOCK * 2 + BLOCK / 32];

static void produce(long bytes, double window)
{
	for (long done = 0; done < bytes; done += BLOCK) {
		if (done == FIRST) {
			fprintf(stderr, "READY\n");
			wl_sleep(window);
		}
		wl_fill(in, BLOCK, 0x5000 + done / BLOCK);
		tree_write_all(1, in, BLOCK);
	}
}

static void filter(void)
{
	static const char hex[] = "0123456789abcdef";
	unsigned long position = 0;
	size_t n;

	while ((n = tree_read_all(0, in, BLOCK)) > 0) {
		size_t len = 0;

		for (size_t i = 0; i < n; i++) {
			out[len++] = hex[(unsigned char)in[i] >> 4];
			out[len++] = hex[in[i] & 0xf];
			if (++position % 32 == 0)
				out[len++] = '\n';
		}
		tree_write_all(1, out, len);
	}
}

static void consume(double window)
{
	uint64_t hash = 0xcbf29ce484222325ULL;
	unsigned long long total = 0;
	size_t n;

	wl_sleep(window);
	while ((n = tree_read_all(0, in, BLOCK)) > 0) {
		for (size_t i = 0; i < n; i++)
			hash = (hash ^ (unsigned char)in[i]) * 0x100000001b3ULL;
		total += n;
	}
	printf("SUM %016llx %llu\n", (unsigned long long)hash, total);
}

int main(int argc, char **argv)
{
	if (argc >= 2)
		tree_name = argv[1];
	tree_record();
	if (argc == 4 && !strcmp(argv[1], "produce"))
		produce(atol(argv[2]), atof(argv[3]));
	else if (argc == 2 && !strcmp(argv[1], "filter"))
		filter();
	else if (argc == 3 && !strcmp(argv[1], "consume"))
		consume(atof(argv[2]));
	else {
		fprintf(stderr, "usage: tree_pipeline produce BYTES WINDOW | filter | consume WINDOW\n");
		return 2;
	}
	tree_check_place();
	tree_exit();
}
