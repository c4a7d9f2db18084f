// SPDX-License-Identifier: MIT
/*
 * storm: failing module syscalls at a fixed rate, for modwatch's benchmark.
 *
 *     storm N RATE     N calls of finit_module(-1) (EBADF, after the permission check
 *                      when run as root), RATE per second (0: as fast as it can)
 *
 * Prints the calls made and the seconds they took, as one JSON line.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	long n, rate, done = 0;
	double start;

	if (argc != 3) {
		fprintf(stderr, "usage: storm N RATE\n");
		return 2;
	}
	n = atol(argv[1]);
	rate = atol(argv[2]);
	start = now();
	while (done < n) {
		/* Calls due by now at RATE; at full speed, batches of 1000. */
		long due = rate ? (long)((now() - start) * rate) + 1 : done + 1000;

		if (due > n)
			due = n;
		for (; done < due; done++)
			syscall(SYS_finit_module, -1, "", 0);
		if (rate && done < n) {
			struct timespec pause = { 0, 200000 }; /* 0.2 ms */

			nanosleep(&pause, NULL);
		}
	}
	printf("{\"calls\": %ld, \"seconds\": %.3f}\n", done, now() - start);
	return 0;
}
