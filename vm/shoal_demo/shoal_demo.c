// SPDX-License-Identifier: GPL-2.0
/*
 * shoal_demo: the smallest out-of-tree module that lets shoal's VM test prove the driver
 * backend against a real kernel. Its version is chosen at build time (MODULE_VERSION, read back
 * through /sys/module/shoal_demo/version), and so is whether it works: a broken build says so in
 * /sys/module/shoal_demo/parameters/healthy, which the test's health probe reads, the way a real
 * driver's regression shows up in a device that no longer answers.
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>

#ifndef SHOAL_VERSION
#error "build with ccflags-y=-DSHOAL_VERSION=\\\"1.0\\\""
#endif
#ifndef SHOAL_HEALTHY
#define SHOAL_HEALTHY 1
#endif

static bool healthy = SHOAL_HEALTHY;
module_param(healthy, bool, 0444);
MODULE_PARM_DESC(healthy, "whether this build works (read-only; set when it is built)");

static int __init shoal_demo_init(void)
{
	pr_info("shoal_demo %s loaded, healthy=%d\n", SHOAL_VERSION, healthy);
	return 0;
}

static void __exit shoal_demo_exit(void)
{
	pr_info("shoal_demo %s unloaded\n", SHOAL_VERSION);
}

module_init(shoal_demo_init);
module_exit(shoal_demo_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION(SHOAL_VERSION);
MODULE_DESCRIPTION("shoal VM test module");
