// SPDX-License-Identifier: MIT
/*
 * mwload: a module loader for modwatch's kernel tests. It calls finit_module,
 * init_module and delete_module directly (exact errno, chosen task name, chosen
 * uid) and prints one JSON line per call on stderr (stdout may be the record
 * stream of the capture that runs it). C rather than Python: an interpreter
 * start costs seconds in an emulated guest.
 *
 *   mwload [--comm NAME] [--uid UID] OP...
 *   OP: finit PATH PARAMS | finitc PATH PARAMS | unlinked PATH PARAMS | init PATH PARAMS
 *       | delete NAME | sleep MS | stop | storm N
 *
 * `finitc` passes MODULE_INIT_COMPRESSED_FILE. `unlinked` opens PATH, unlinks it, then loads from the open file. `storm` makes N
 * finit_module(-1) calls, each failing with EBADF after the permission check, silently.
 * `stop` stops mwload (SIGSTOP) until a test sends SIGCONT: its /proc stays readable,
 * with the last finit's file still open.
 *
 * Exit status: 0 if every call returned 0, else 1; 2 for a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* mono_ns: CLOCK_MONOTONIC when the call had returned, for latency measurements. */
static long report(const char *op, long ret)
{
	int err = errno;
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	fprintf(stderr, "{\"op\": \"%s\", \"pid\": %d, \"ret\": %ld, \"errno\": %d, \"mono_ns\": %lld}\n",
		op, getpid(), ret, ret < 0 ? err : 0, (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
	return ret;
}

/*
 * The file of the last finit stays open until the next one opens its own (under the
 * same fd number): a `stop` right after a finit leaves it readable through /proc.
 */
static int last_fd = -1;

static long do_finit(const char *path, const char *params, int unlink_first, int flags)
{
	int fd;
	long ret;

	if (last_fd >= 0)
		close(last_fd);
	fd = last_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || (unlink_first && unlink(path) < 0)) {
		perror(path);
		exit(2);
	}
	ret = syscall(SYS_finit_module, fd, params, flags);
	report("finit", ret);
	return ret;
}

static long do_init(const char *path, const char *params)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	char *image;
	long ret;

	if (fd < 0 || fstat(fd, &st) < 0 || !(image = malloc(st.st_size)) ||
	    read(fd, image, st.st_size) != st.st_size) {
		perror(path);
		exit(2);
	}
	close(fd);
	ret = report("init", syscall(SYS_init_module, image, (unsigned long)st.st_size, params));
	free(image);
	return ret;
}

int main(int argc, char **argv)
{
	int i = 1, failures = 0;

	if (i + 1 < argc && !strcmp(argv[i], "--comm")) {
		prctl(PR_SET_NAME, argv[i + 1], 0, 0, 0);
		i += 2;
	}
	if (i + 1 < argc && !strcmp(argv[i], "--uid")) {
		uid_t uid = (uid_t)atoi(argv[i + 1]);

		if (setgid(uid) || setuid(uid)) {
			perror("setuid");
			return 2;
		}
		i += 2;
	}
	while (i < argc) {
		const char *op = argv[i++];

		if (!strcmp(op, "finit") && i + 1 < argc) {
			failures += do_finit(argv[i], argv[i + 1], 0, 0) != 0;
			i += 2;
		} else if (!strcmp(op, "finitc") && i + 1 < argc) {
			/* MODULE_INIT_COMPRESSED_FILE: the kernel decompresses (6.4+) */
			failures += do_finit(argv[i], argv[i + 1], 0, 4) != 0;
			i += 2;
		} else if (!strcmp(op, "unlinked") && i + 1 < argc) {
			failures += do_finit(argv[i], argv[i + 1], 1, 0) != 0;
			i += 2;
		} else if (!strcmp(op, "init") && i + 1 < argc) {
			failures += do_init(argv[i], argv[i + 1]) != 0;
			i += 2;
		} else if (!strcmp(op, "delete") && i < argc) {
			failures += report("delete", syscall(SYS_delete_module, argv[i], O_NONBLOCK)) != 0;
			i += 1;
		} else if (!strcmp(op, "storm") && i < argc) {
			for (long n = atol(argv[i]); n > 0; n--)
				syscall(SYS_finit_module, -1, "", 0);
			i += 1;
		} else if (!strcmp(op, "stop")) {
			raise(SIGSTOP);
		} else if (!strcmp(op, "sleep") && i < argc) {
			struct timespec ts = { atoi(argv[i]) / 1000, (atoi(argv[i]) % 1000) * 1000000L };

			nanosleep(&ts, NULL);
			i += 1;
		} else {
			fprintf(stderr, "mwload: bad operation '%s'\n", op);
			return 2;
		}
	}
	return failures ? 1 : 0;
}
