/*
 * test_shdict.c: unit tests of shdict (types, SET/ADD/REPLACE, incr, TTLs, LRU eviction, E2BIG,
 * flush, stats, iteration, atomic incr across threads).
 */
#include "test.h"

#include "base/buf.h"
#include "base/config.h"
#include "http/http.h"
#include "base/log.h"
#include "state/routes.h"
#include "state/shdict.h"
#include "base/sp.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static sp_shval_t shnum(double n) { return (sp_shval_t){SP_SH_NUMBER, n, NULL, 0}; }
static sp_shval_t shstr(const char *s, size_t n) { return (sp_shval_t){SP_SH_STRING, 0, s, n}; }
static sp_shval_t shbool(bool b) { return (sp_shval_t){SP_SH_BOOL, b ? 1 : 0, NULL, 0}; }
static const sp_shval_t shnil = {SP_SH_NIL, 0, NULL, 0};

static int shset(sp_shdict_t *d, const char *k, sp_shval_t v, double ttl, int mode)
{
    return sp_shdict_set(d, k, strlen(k), &v, ttl, mode);
}

static int shget(sp_shdict_t *d, const char *k, sp_buf_t *buf, sp_shval_t *out, double *ttl)
{
    return sp_shdict_get(d, k, strlen(k), buf, out, ttl);
}

static bool shhas(sp_shdict_t *d, const char *k)
{
    sp_buf_t b = {0};
    sp_shval_t v;
    int rc = shget(d, k, &b, &v, NULL);
    sp_buf_free(&b);
    return rc == 0;
}

static sp_shdict_stats_t shstats(sp_shdict_t *d)
{
    sp_shdict_stats_t st;
    sp_shdict_stats(d, &st);
    return st;
}

static void test_shdict_create(void)
{
    char err[128] = "";
    sp_shdict_t *d = sp_shdict_create("t_create", 1 << 20, err);
    CHECK(d != NULL);
    CHECK_STR(sp_shdict_name(d), "t_create");
    CHECK(sp_shdict_find("t_create", 8) == d);
    CHECK(sp_shdict_find("t_creat", 7) == NULL);
    CHECK(sp_shdict_find("t_createx", 9) == NULL);
    CHECK(sp_shdict_find("t_create-and-more", 8) == d); /* by length */
    sp_shdict_stats_t st = shstats(d);
    CHECK_INT(st.capacity, 1 << 20);
    CHECK_INT(st.used, 0);
    CHECK_INT(st.count, 0);
    CHECK_INT(st.evictions, 0);

    err[0] = '\0';
    CHECK(sp_shdict_create("t_create", 4096, err) == NULL);
    CHECK_HAS(err, "t_create");
    CHECK_INT(shstats(d).capacity, 1 << 20); /* the first one is untouched */
}

static void test_shdict_types(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_types", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double ttl = -1;

    CHECK_INT(shget(d, "missing", &buf, &v, &ttl), -ENOENT);

    CHECK_INT(shset(d, "num", shnum(42.5), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, 42.5, 0);
    CHECK(v.str == NULL);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(shset(d, "neg", shnum(-1e300), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "neg", &buf, &v, NULL), 0); /* ttl_left may be NULL */
    CHECK_DBL(v.num, -1e300, 0);

    CHECK_INT(shset(d, "str", shstr("a\0b", 3), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "str", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "a\0b");
    CHECK(v.str && v.str[3] == '\0');
    CHECK_INT(shset(d, "empty", shstr("", 0), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "empty", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_INT(v.len, 0);
    CHECK(v.str && v.str[0] == '\0');

    CHECK_INT(shset(d, "t", shbool(true), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "f", shbool(false), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "t", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_BOOL);
    CHECK_DBL(v.num, 1, 0);
    CHECK_INT(shget(d, "f", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_BOOL);
    CHECK_DBL(v.num, 0, 0);

    /* overwrite with another type */
    CHECK_INT(shset(d, "num", shstr("now a string", 12), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "now a string");
    CHECK_INT(shset(d, "num", shnum(7), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, 7, 0);

    /* binary keys: "k" and "k\0" are different */
    sp_shval_t one = shnum(1), two = shnum(2);
    CHECK_INT(sp_shdict_set(d, "k", 1, &one, 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_set(d, "k\0", 2, &two, 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_get(d, "k", 1, &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 1, 0);
    CHECK_INT(sp_shdict_get(d, "k\0", 2, &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 2, 0);

    /* a string value into a stack buffer */
    char stack[4];
    sp_buf_t sb = SP_BUF_ON(stack);
    CHECK_INT(shget(d, "str", &sb, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "a\0b");
    CHECK(v.str == stack);
    CHECK_INT(shset(d, "long", shstr("longer than four", 16), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "long", &sb, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "longer than four");
    sp_buf_free(&sb);

    CHECK_INT(shstats(d).count, 9);
    sp_buf_free(&buf);
}

static void test_shdict_modes(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_modes", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;

    CHECK_INT(shset(d, "a", shnum(1), 0, SP_SH_ADD), 0);
    CHECK_INT(shset(d, "a", shnum(2), 0, SP_SH_ADD), -EEXIST);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 1, 0); /* unchanged */

    CHECK_INT(shset(d, "r", shnum(1), 0, SP_SH_REPLACE), -ENOENT);
    CHECK(!shhas(d, "r"));
    CHECK_INT(shset(d, "a", shnum(3), 0, SP_SH_REPLACE), 0);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 3, 0);
    CHECK_INT(shset(d, "a", shnum(4), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 4, 0);
    CHECK_INT(shstats(d).count, 1);

    /* a NIL value deletes */
    CHECK_INT(shset(d, "b", shnum(5), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).count, 2);
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "b", &buf, &v, NULL), -ENOENT);
    CHECK_INT(shstats(d).count, 1);
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_SET), 0); /* deleting a missing key is fine */
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_REPLACE), -ENOENT);

    /* delete */
    CHECK_INT(sp_shdict_delete(d, "a", 1), 0);
    CHECK_INT(sp_shdict_delete(d, "a", 1), -ENOENT);
    CHECK(!shhas(d, "a"));
    CHECK_INT(shstats(d).count, 0);
    CHECK_INT(shstats(d).used, 0);
    sp_buf_free(&buf);
}

static void test_shdict_incr(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_incr", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double out = -1, ttl = -1;

    CHECK_INT(shset(d, "n", shnum(10), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, 5, false, 0, 0, &out), 0);
    CHECK_DBL(out, 15, 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, -20, false, 0, 0, &out), 0);
    CHECK_DBL(out, -5, 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, 0.25, true, 1000, 0, &out), 0); /* init ignored */
    CHECK_DBL(out, -4.75, 0);
    CHECK_INT(shget(d, "n", &buf, &v, NULL), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, -4.75, 0);

    /* missing without init: -ENOENT and still missing */
    out = -1;
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, false, 0, 0, &out), -ENOENT);
    CHECK(!shhas(d, "m"));
    /* missing with init: init + delta */
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, true, 100, 0, &out), 0);
    CHECK_DBL(out, 101, 0);
    CHECK_INT(shget(d, "m", &buf, &v, &ttl), 0);
    CHECK_DBL(v.num, 101, 0);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, true, 100, 0, &out), 0);
    CHECK_DBL(out, 102, 0);

    /* init_ttl applies to the created key */
    CHECK_INT(sp_shdict_incr(d, "w", 1, 2, true, 0, 10, &out), 0);
    CHECK_DBL(out, 2, 0);
    CHECK_INT(shget(d, "w", &buf, &v, &ttl), 0);
    CHECK(ttl > 9 && ttl <= 10);

    /* not a number: -EINVAL, value untouched */
    CHECK_INT(shset(d, "s", shstr("abc", 3), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "s", 1, 1, true, 0, 0, &out), -EINVAL);
    CHECK_INT(shget(d, "s", &buf, &v, NULL), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "abc");
    CHECK_INT(shset(d, "b", shbool(true), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "b", 1, 1, false, 0, 0, &out), -EINVAL);
    sp_buf_free(&buf);
}

static void test_shdict_ttl(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_ttl", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double ttl = -1;

    CHECK_INT(shset(d, "short", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "long", shstr("x", 1), 30, SP_SH_SET), 0);
    CHECK_INT(shset(d, "forever", shnum(3), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "expire", shnum(4), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "unexpire", shnum(5), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "reset", shnum(6), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "reset", shnum(6), 0, SP_SH_SET), 0); /* a plain set clears the TTL */

    CHECK_INT(shget(d, "short", &buf, &v, &ttl), 0);
    CHECK(ttl > 0 && ttl <= 0.05 + 1e-9);
    CHECK_INT(shget(d, "long", &buf, &v, &ttl), 0);
    CHECK(ttl > 29 && ttl <= 30 + 1e-9); /* now + 30 - now rounds in binary */
    CHECK_INT(shget(d, "forever", &buf, &v, &ttl), 0);
    CHECK_DBL(ttl, 0, 0);

    CHECK_INT(sp_shdict_expire(d, "expire", 6, 0.05), 0);
    CHECK_INT(shget(d, "expire", &buf, &v, &ttl), 0);
    CHECK(ttl > 0 && ttl <= 0.05 + 1e-9);
    CHECK_INT(sp_shdict_expire(d, "unexpire", 8, 0), 0); /* removes the TTL */
    CHECK_INT(shget(d, "unexpire", &buf, &v, &ttl), 0);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(sp_shdict_expire(d, "nothere", 7, 1), -ENOENT);

    sleep_s(0.1);
    CHECK_INT(shget(d, "short", &buf, &v, &ttl), -ENOENT);
    CHECK_INT(shget(d, "expire", &buf, &v, &ttl), -ENOENT);
    CHECK_INT(shget(d, "long", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "forever", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "unexpire", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "reset", &buf, &v, &ttl), 0);
    CHECK_INT(shstats(d).count, 4); /* expired entries were dropped when touched */

    /* an expired key behaves as missing for ADD, REPLACE, incr and expire */
    CHECK_INT(shset(d, "a", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "r", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "i", shnum(50), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "e", shnum(1), 0.05, SP_SH_SET), 0);
    sleep_s(0.1);
    CHECK_INT(shset(d, "a", shnum(2), 0, SP_SH_ADD), 0);
    CHECK_INT(shset(d, "r", shnum(2), 0, SP_SH_REPLACE), -ENOENT);
    double out = 0;
    CHECK_INT(sp_shdict_incr(d, "i", 1, 1, false, 0, 0, &out), -ENOENT);
    CHECK_INT(sp_shdict_expire(d, "e", 1, 10), -ENOENT);
    sp_buf_free(&buf);
}

static void test_shdict_lru(void)
{
    char err[128];
    /* the size of one entry with a 2-byte key and a number, as the dict accounts it */
    sp_shdict_t *probe = sp_shdict_create("t_lru_probe", 1 << 20, err);
    CHECK(probe != NULL);
    if (!probe)
        return;
    CHECK_INT(shset(probe, "k0", shnum(0), 0, SP_SH_SET), 0);
    size_t S = shstats(probe).used;
    CHECK(S >= 2);
    CHECK_INT(shset(probe, "k1", shstr("abcd", 4), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(probe).used, 2 * S + 4); /* strings count their bytes */

    sp_shdict_t *d = sp_shdict_create("t_lru", 8 * S + S / 2, err);
    CHECK(d != NULL);
    if (!d)
        return;
    char key[8];
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "k%d", i);
        CHECK_INT(shset(d, key, shnum(i), 0, SP_SH_SET), 0);
    }
    sp_shdict_stats_t st = shstats(d);
    CHECK_INT(st.count, 8);
    CHECK_INT(st.used, 8 * S);
    CHECK_INT(st.evictions, 0);

    /* reading k0 and k1 makes them recent; k2 and k3 are now the oldest */
    CHECK(shhas(d, "k0"));
    CHECK(shhas(d, "k1"));
    CHECK_INT(shset(d, "k8", shnum(8), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "k9", shnum(9), 0, SP_SH_SET), 0);
    st = shstats(d);
    CHECK_INT(st.count, 8);
    CHECK_INT(st.used, 8 * S);
    CHECK_INT(st.evictions, 2);
    CHECK(st.used <= st.capacity);
    CHECK(!shhas(d, "k2"));
    CHECK(!shhas(d, "k3"));
    for (int i = 0; i < 10; i++) {
        if (i == 2 || i == 3)
            continue;
        snprintf(key, sizeof key, "k%d", i);
        if (!shhas(d, key))
            CHECK(!"a recently used or new key was evicted");
    }

    /* the reads above left k0, k1, k4 as the oldest; incr and set count as use too, so
     * after touching k0 and k1 the next insert evicts k4 */
    double out;
    CHECK_INT(sp_shdict_incr(d, "k0", 2, 1, false, 0, 0, &out), 0);
    CHECK_INT(shset(d, "k1", shnum(11), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).evictions, 2); /* overwriting in place evicts nothing */
    CHECK_INT(shset(d, "ka", shnum(10), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).evictions, 3);
    CHECK(!shhas(d, "k4"));
    CHECK(shhas(d, "k0"));
    CHECK(shhas(d, "k1"));
    CHECK(shhas(d, "k5"));

    /* E2BIG: larger than the whole dict; the old value stays */
    CHECK_INT(shset(d, "ka", shstr("v", 1), 0, SP_SH_SET), 0);
    size_t cap = shstats(d).capacity;
    char *big = sp_malloc(cap + 1);
    memset(big, 'b', cap + 1);
    CHECK_INT(sp_shdict_set(d, "ka", 2, &(sp_shval_t){SP_SH_STRING, 0, big, cap}, 0, SP_SH_SET),
              -E2BIG);
    sp_buf_t buf = {0};
    sp_shval_t v;
    CHECK_INT(shget(d, "ka", &buf, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "v");
    /* an entry exactly the capacity fits, evicting every other entry */
    uint64_t ev = shstats(d).evictions;
    size_t others = shstats(d).count - 1;
    size_t exact = cap - S; /* S: entry overhead of a 2-byte key */
    CHECK_INT(sp_shdict_set(d, "ka", 2, &(sp_shval_t){SP_SH_STRING, 0, big, exact}, 0,
                            SP_SH_SET),
              0);
    st = shstats(d);
    CHECK_INT(st.count, 1);
    CHECK_INT(st.used, cap);
    CHECK_INT(st.evictions, ev + others);
    CHECK_INT(shget(d, "ka", &buf, &v, NULL), 0);
    CHECK_INT(v.len, exact);
    CHECK_INT(sp_shdict_set(d, "kb", 2, &(sp_shval_t){SP_SH_STRING, 0, big, exact + 1}, 0,
                            SP_SH_SET),
              -E2BIG);
    CHECK_INT(shstats(d).count, 1);
    free(big);

    /* flush empties the dict; it stays usable */
    sp_shdict_flush(d);
    st = shstats(d);
    CHECK_INT(st.count, 0);
    CHECK_INT(st.used, 0);
    CHECK_INT(st.capacity, cap);
    CHECK(!shhas(d, "ka"));
    CHECK_INT(shset(d, "k0", shnum(1), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).count, 1);

    /* expired entries make room before live ones are evicted (and are not evictions) */
    sp_shdict_t *e = sp_shdict_create("t_lru_ttl", 4 * S + S / 2, err);
    CHECK(e != NULL);
    if (e) {
        CHECK_INT(shset(e, "k0", shnum(0), 0, SP_SH_SET), 0);   /* oldest, live */
        CHECK_INT(shset(e, "k1", shnum(1), 0.05, SP_SH_SET), 0); /* expires */
        CHECK_INT(shset(e, "k2", shnum(2), 0, SP_SH_SET), 0);
        CHECK_INT(shset(e, "k3", shnum(3), 0, SP_SH_SET), 0);
        sleep_s(0.1);
        CHECK_INT(shset(e, "k4", shnum(4), 0, SP_SH_SET), 0);
        st = shstats(e);
        CHECK_INT(st.evictions, 0);
        CHECK_INT(st.count, 4);
        CHECK(shhas(e, "k0"));
        CHECK(!shhas(e, "k1"));
    }
    sp_buf_free(&buf);
}

static void test_shdict_grow(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_grow", 64 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    const int n = 5000; /* well past the initial 1024 buckets */
    for (int i = 0; i < n; i++) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        sp_shval_t v = shnum(i);
        if (sp_shdict_set(d, key, (size_t)kl, &v, 0, SP_SH_SET) != 0) {
            CHECK(!"set failed");
            break;
        }
    }
    CHECK_INT(shstats(d).count, n);
    CHECK_INT(shstats(d).evictions, 0);
    sp_buf_t buf = {0};
    int bad = 0;
    for (int i = 0; i < n; i++) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        sp_shval_t v;
        if (sp_shdict_get(d, key, (size_t)kl, &buf, &v, NULL) != 0 || v.num != i)
            bad++;
    }
    CHECK_INT(bad, 0);
    for (int i = 0; i < n; i += 2) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        bad += sp_shdict_delete(d, key, (size_t)kl) != 0;
    }
    CHECK_INT(bad, 0);
    CHECK_INT(shstats(d).count, n / 2);
    sp_buf_free(&buf);
}

#define INC_THREADS 4
#define INC_OPS 50000

typedef struct {
    sp_shdict_t *d;
    double *seen; /* every value incr returned */
    long errors;
} inc_worker_t;

static void *inc_thread(void *arg)
{
    inc_worker_t *w = arg;
    for (int i = 0; i < INC_OPS; i++) {
        double out = -1;
        if (sp_shdict_incr(w->d, "hits", 4, 1, true, 0, 0, &out) != 0)
            w->errors++;
        w->seen[i] = out;
    }
    return NULL;
}

static void test_shdict_incr_threads(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_incr_threads", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    pthread_t th[INC_THREADS];
    inc_worker_t w[INC_THREADS];
    for (int i = 0; i < INC_THREADS; i++) {
        w[i].d = d;
        w[i].seen = sp_malloc(INC_OPS * sizeof(double));
        w[i].errors = 0;
        CHECK_INT(pthread_create(&th[i], NULL, inc_thread, &w[i]), 0);
    }
    long errors = 0;
    for (int i = 0; i < INC_THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += w[i].errors;
    }
    CHECK_INT(errors, 0);
    sp_buf_t buf = {0};
    sp_shval_t v;
    CHECK_INT(shget(d, "hits", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, INC_THREADS * INC_OPS, 0);
    /* each value 1..N was handed out exactly once; each thread saw increasing values */
    const int total = INC_THREADS * INC_OPS;
    unsigned char *mark = sp_calloc((size_t)total + 1, 1);
    int bad = 0, order = 0;
    for (int t = 0; t < INC_THREADS; t++) {
        for (int i = 0; i < INC_OPS; i++) {
            double x = w[t].seen[i];
            if (x < 1 || x > total || x != (int)x || mark[(int)x]++)
                bad++;
            if (i && x <= w[t].seen[i - 1])
                order++;
        }
        free(w[t].seen);
    }
    CHECK_INT(bad, 0);
    CHECK_INT(order, 0);
    free(mark);
    sp_buf_free(&buf);
}

static void test_shdict_iterate(void)
{
    char err[128];
    const char *names[] = {"t_iter_a", "t_iter_b", "t_iter_c"};
    for (size_t i = 0; i < SP_ARRAY_LEN(names); i++)
        CHECK(sp_shdict_create(names[i], 4096, err) != NULL);
    int found[3] = {0, 0, 0}, n = 0;
    for (sp_shdict_t *d = sp_shdict_next(NULL); d && n < 1000; d = sp_shdict_next(d)) {
        n++;
        for (size_t i = 0; i < SP_ARRAY_LEN(names); i++)
            if (strcmp(sp_shdict_name(d), names[i]) == 0)
                found[i]++;
        CHECK(sp_shdict_find(sp_shdict_name(d), strlen(sp_shdict_name(d))) == d);
    }
    CHECK(n >= 3 && n < 1000);
    CHECK_INT(found[0], 1);
    CHECK_INT(found[1], 1);
    CHECK_INT(found[2], 1);
}

static void test_shdict_destroy_all(void)
{
    char err[128];
    sp_shdict_destroy_all();
    CHECK(sp_shdict_next(NULL) == NULL);
    CHECK(sp_shdict_find("t_types", 7) == NULL);
    /* names are free again */
    sp_shdict_t *d = sp_shdict_create("t_types", 4096, err);
    CHECK(d != NULL);
    if (d) {
        CHECK_INT(shset(d, "x", shstr("y", 1), 0, SP_SH_SET), 0);
        CHECK(shhas(d, "x"));
    }
    CHECK(sp_shdict_next(NULL) == d);
    CHECK(d == NULL || sp_shdict_next(d) == NULL);
    sp_shdict_destroy_all(); /* frees the entries too (LeakSanitizer) */
    CHECK(sp_shdict_next(NULL) == NULL);
}

void suite_shdict(void)
{
    RUN(test_shdict_create);
    RUN(test_shdict_types);
    RUN(test_shdict_modes);
    RUN(test_shdict_incr);
    RUN(test_shdict_ttl);
    RUN(test_shdict_lru);
    RUN(test_shdict_grow);
    RUN(test_shdict_incr_threads);
    RUN(test_shdict_iterate);
    RUN(test_shdict_destroy_all);
}
