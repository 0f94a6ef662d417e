/*
 * The smallest workload: it only has to come back with its pid and finish its window.
 *
 * usage: idle [SECONDS]   (the window, 3 s by default)
 */
#include "wl.h"

int main(int argc, char **argv)
{
	double window = argc > 1 ? atof(argv[1]) : WL_WINDOW_S;

	wl_ready();
	wl_sleep(window);
	return wl_finish();
}
