/*
 * A stand-in for libinih, which xfsprogs links for mkfs.xfs's -c option
 * (a config file). Stemcells ship no libinih and its source is not among
 * this release's blobs; grootfs never passes -c, so the stand-in refuses
 * every config file instead of parsing it.
 */
#ifndef GROOTFS_PY_INI_H
#define GROOTFS_PY_INI_H

typedef int (*ini_handler)(void *user, const char *section, const char *name,
                           const char *value);

int ini_parse(const char *filename, ini_handler handler, void *user);

#endif
