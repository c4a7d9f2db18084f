// SPDX-License-Identifier: GPL-2.0
/*
 * mwtest_b: mwtest under a second name. KBUILD_MODNAME, hence the module
 * name and its log prefix, comes from this object's name.
 */
#include "mwtest.c"
