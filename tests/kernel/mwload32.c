// SPDX-License-Identifier: GPL-2.0
/*
 * mwload32: a 32-bit caller of the module syscalls, for modwatch's kernel tests.
 *
 *     mwload32 finit PATH PARAMS
 *     mwload32 delete NAME
 *
 * Built freestanding (-m32 -nostdlib -static: no 32-bit C library is needed) and
 * calls the kernel through int $0x80, so its calls enter at the __ia32_sys_*
 * entry points. Exit status: 0 when the call returned 0, else its errno; 255 for
 * a usage error.
 */

#define NR_EXIT 1
#define NR_OPEN 5
#define NR_DELETE_MODULE 129
#define NR_FINIT_MODULE 350
#define O_RDONLY 0
#define O_NONBLOCK 04000

static long syscall3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
	return ret;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

static __attribute__((noreturn)) void leave(long ret)
{
	syscall3(NR_EXIT, ret < 0 ? -ret : ret, 0, 0);
	__builtin_unreachable();
}

__attribute__((used, noreturn)) void start(long *stack)
{
	long argc = stack[0];
	char **argv = (char **)(stack + 1);

	if (argc == 4 && same(argv[1], "finit")) {
		long fd = syscall3(NR_OPEN, (long)argv[2], O_RDONLY, 0);

		if (fd < 0)
			leave(fd);
		leave(syscall3(NR_FINIT_MODULE, fd, (long)argv[3], 0));
	}
	if (argc == 3 && same(argv[1], "delete"))
		leave(syscall3(NR_DELETE_MODULE, (long)argv[2], O_NONBLOCK, 0));
	leave(255);
}

/* The entry point: the stack holds argc, then argv. */
__asm__(".globl _start\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	pushl %esp\n"
	"	call start\n");
