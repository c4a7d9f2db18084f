// SPDX-License-Identifier: GPL-2.0
/*
 * mwtest under the longest name a module may have: 55 bytes (MODULE_NAME_LEN
 * less the NUL). KBUILD_MODNAME comes from this object's name.
 */
#include "mwtest.c"
