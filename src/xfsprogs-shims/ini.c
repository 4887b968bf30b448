/* See ini.h: mkfs.xfs config files are not supported in this build. */
#include <errno.h>
#include <stdio.h>

#include "ini.h"

int ini_parse(const char *filename, ini_handler handler, void *user)
{
	(void)handler;
	(void)user;
	fprintf(stderr, "mkfs.xfs config files are not supported in this build: %s\n",
		filename);
	errno = ENOTSUP;
	return -1;
}
