/*
 * shdict.h: named dictionaries shared by every worker (rate-limit counters, source status):
 * string keys, values that are numbers, strings or booleans, optional TTLs, least-recently-
 * used eviction when the byte capacity is reached (counted), and an atomic incr. One mutex
 * per dict; every operation is O(1). Dicts are created at start-up and live until exit.
 */
#ifndef SP_SHDICT_H
#define SP_SHDICT_H

#include "base/sp.h"
#include "base/buf.h"

typedef struct sp_shdict sp_shdict_t;

typedef enum { SP_SH_NIL = 0, SP_SH_BOOL, SP_SH_NUMBER, SP_SH_STRING } sp_shtype_t;

typedef struct sp_shval {
    sp_shtype_t type;
    double num;       /* number, or 0/1 for booleans */
    const char *str;  /* string values: points into the caller's buffer after a get */
    size_t len;
} sp_shval_t;

enum { SP_SH_SET = 0, SP_SH_ADD, SP_SH_REPLACE };

/* Creates a dict (or returns NULL with err when the name exists). Not thread-safe: call at
 * start-up before workers run. */
sp_shdict_t *sp_shdict_create(const char *name, size_t capacity, char err[128]);
sp_shdict_t *sp_shdict_find(const char *name, size_t len);
/* Iterates over all dicts (for metrics). */
sp_shdict_t *sp_shdict_next(sp_shdict_t *prev);
const char *sp_shdict_name(const sp_shdict_t *d);
void sp_shdict_destroy_all(void);

/* 0 and *out filled (strings copied into buf), or -ENOENT. ttl_left: seconds, 0 = none. */
int sp_shdict_get(sp_shdict_t *d, const char *k, size_t kl, sp_buf_t *buf, sp_shval_t *out,
                  double *ttl_left);
/* mode SET/ADD/REPLACE; ttl seconds (0: none); a NIL value deletes.
 * Returns 0, -EEXIST (ADD on an existing key), -ENOENT (REPLACE on a missing key),
 * -E2BIG (larger than the whole dict). Evicts least recently used entries to make room. */
int sp_shdict_set(sp_shdict_t *d, const char *k, size_t kl, const sp_shval_t *v, double ttl,
                  int mode);
/* Adds delta to a number. A missing key is created with init+delta (ttl init_ttl) when
 * has_init, else -ENOENT. -EINVAL if the value is not a number. */
int sp_shdict_incr(sp_shdict_t *d, const char *k, size_t kl, double delta, bool has_init,
                   double init, double init_ttl, double *out);
/* Takes one unit of a counter capped at limit: 1 when taken (the counter grew by one), 0 when
 * it is at the limit. The counter never expires; give units back with sp_shdict_incr(-1). */
int sp_shdict_acquire(sp_shdict_t *d, const char *k, size_t kl, double limit);
/* A rate limit on key (GCRA, the token bucket's exact equivalent): `rate` requests per second
 * with bursts of up to `burst`. Atomic across workers. Returns 1 if allowed (and counted), 0 if
 * not. Fills remaining (requests left in the burst), retry_after (seconds until one more is
 * allowed; 0 when allowed) and reset (seconds until the burst is whole again). */
int sp_shdict_rate(sp_shdict_t *d, const char *k, size_t kl, double rate, double burst,
                   double *remaining, double *retry_after, double *reset);
int sp_shdict_delete(sp_shdict_t *d, const char *k, size_t kl);
/* Sets a new TTL on an existing key (0: none). -ENOENT if missing. */
int sp_shdict_expire(sp_shdict_t *d, const char *k, size_t kl, double ttl);
void sp_shdict_flush(sp_shdict_t *d);

typedef struct sp_shdict_stats {
    size_t capacity, used, count;
    uint64_t evictions;
} sp_shdict_stats_t;
void sp_shdict_stats(sp_shdict_t *d, sp_shdict_stats_t *st);

#endif
