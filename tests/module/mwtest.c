// SPDX-License-Identifier: GPL-2.0
/*
 * mwtest: a module that does nothing but get loaded, for modwatch's kernel
 * tests. Its parameters let a test choose what a load looks like: a failing
 * init (fail), a string argument (note), a slow init (delay_ms) and an init
 * that waits until the test lets it go on (hold_ms).
 *
 * mwtest_b.c builds the same code under a second name, so that a test can
 * have two distinct modules loaded at once.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/delay.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

static int fail;
module_param(fail, int, 0444);
MODULE_PARM_DESC(fail, "when non-zero, init returns -fail (fail=22: the load fails with EINVAL)");

static char *note = "";
module_param(note, charp, 0444);
MODULE_PARM_DESC(note, "a string printed at init");

static int delay_ms;
module_param(delay_ms, int, 0444);
MODULE_PARM_DESC(delay_ms, "milliseconds init sleeps before returning");

/* Writable: the module's parameters are in sysfs while its init runs. */
static int hold_ms;
module_param(hold_ms, int, 0644);
MODULE_PARM_DESC(hold_ms, "init waits until 0 is written to this parameter, at most hold_ms milliseconds");

static int __init mwtest_init(void)
{
	int limit = hold_ms, waited = 0;

	pr_info("init note=\"%s\" fail=%d delay_ms=%d hold_ms=%d\n", note, fail, delay_ms, hold_ms);
	if (delay_ms > 0)
		msleep(delay_ms);
	while (READ_ONCE(hold_ms) > 0 && waited < limit) {
		msleep(10);
		waited += 10;
	}
	if (limit > 0)
		pr_info("held %d ms%s\n", waited, waited < limit ? "" : ", not released");
	return -fail;
}

static void __exit mwtest_exit(void)
{
	pr_info("exit\n");
}

module_init(mwtest_init);
module_exit(mwtest_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("modwatch test module: parameters fail, note, delay_ms, hold_ms");
