/*
 * test_routes.c: unit tests of routes (set/get/delete, copies, fields, versions and generation,
 * counts, snapshots, shard growth, concurrent readers and writers).
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

static void rin_field(sp_route_in_t *in, int f, const char *s)
{
    in->s[f] = s;
    in->n[f] = s ? strlen(s) : 0;
}

static sp_route_in_t rin(const char *ns, const char *name, const char *addr, int port, bool ready)
{
    sp_route_in_t in;
    memset(&in, 0, sizeof in);
    rin_field(&in, SP_RF_NAMESPACE, ns);
    rin_field(&in, SP_RF_NAME, name);
    rin_field(&in, SP_RF_ADDRESS, addr);
    in.port = port;
    in.ready = ready;
    return in;
}

static int rset(const char *key, const sp_route_in_t *in)
{
    return sp_routes_set(key, strlen(key), in);
}

static const sp_route_t *rget(const char *key, sp_buf_t *out)
{
    return sp_routes_get(key, strlen(key), out) ? (const sp_route_t *)out->p : NULL;
}

static void test_routes_set_get(void)
{
    sp_routes_init();
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    CHECK_STR(sp_route_field_names[SP_RF_NAMESPACE], "namespace");
    CHECK_STR(sp_route_field_names[SP_RF_ADDRESS], "address");
    CHECK_STR(sp_route_field_names[SP_RF_META], "meta");

    sp_buf_t out = {0};
    CHECK(rget("alice/box", &out) == NULL);
    CHECK_INT(sp_routes_version_of("alice/box", 9), 0);

    sp_route_in_t in = rin("ns-a", "box", "10.0.0.1", 8080, true);
    rin_field(&in, SP_RF_USER, "alice");
    rin_field(&in, SP_RF_META, "{\"x\":1}");
    double t0 = sp_wall_time();
    CHECK_INT(rset("alice/box", &in), 1);
    double t1 = sp_wall_time();
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);

    const sp_route_t *r = rget("alice/box", &out);
    CHECK(r != NULL);
    if (r) {
        CHECK_STR(sp_route_key(r), "alice/box");
        CHECK_INT(r->klen, 9);
        CHECK_STR(sp_route_field(r, SP_RF_NAMESPACE), "ns-a");
        CHECK_INT(r->len[SP_RF_NAMESPACE], 4);
        CHECK_STR(sp_route_field(r, SP_RF_NAME), "box");
        CHECK_INT(r->len[SP_RF_NAME], 3);
        CHECK_STR(sp_route_field(r, SP_RF_USER), "alice");
        CHECK_INT(r->len[SP_RF_USER], 5);
        CHECK_STR(sp_route_field(r, SP_RF_ADDRESS), "10.0.0.1");
        CHECK_INT(r->len[SP_RF_ADDRESS], 8);
        CHECK_STR(sp_route_field(r, SP_RF_META), "{\"x\":1}");
        CHECK_INT(r->len[SP_RF_META], 7);
        /* unset (NULL) fields are empty strings */
        CHECK_STR(sp_route_field(r, SP_RF_REASON), "");
        CHECK_INT(r->len[SP_RF_REASON], 0);
        CHECK_STR(sp_route_field(r, SP_RF_SERVICE), "");
        CHECK_STR(sp_route_field(r, SP_RF_CONFLICT), "");
        CHECK_STR(sp_route_field(r, SP_RF_MODE), "");
        CHECK_INT(r->port, 8080);
        CHECK(r->ready);
        CHECK_INT(r->size % 8, 0);
        CHECK_INT(out.len, r->size);
        CHECK(r->size >= sizeof(sp_route_t) + 10 + 5 + 4 + 6 + 9 + 8);
        CHECK(r->updated >= t0 - 0.001 && r->updated <= t1 + 0.001);
        CHECK(r->version >= 1);
        CHECK_INT(r->version, sp_routes_version_of("alice/box", 9));
        CHECK_INT(r->version, sp_routes_generation());
    }

    /* the copy is the caller's: mutating it does not change the table */
    if (r) {
        sp_route_t *w = (sp_route_t *)out.p;
        w->port = 1;
        w->ready = false;
        w->data[w->off[SP_RF_ADDRESS]] = 'X';
        w->data[0] = 'Z';
    }
    sp_buf_t out2 = {0};
    const sp_route_t *r2 = rget("alice/box", &out2);
    CHECK(r2 != NULL);
    if (r2) {
        CHECK_INT(r2->port, 8080);
        CHECK(r2->ready);
        CHECK_STR(sp_route_field(r2, SP_RF_ADDRESS), "10.0.0.1");
        CHECK_STR(sp_route_key(r2), "alice/box");
    }
    CHECK_INT(sp_routes_count_ready(), 1);

    /* keys and fields need not be NUL-terminated; empty non-NULL fields are empty */
    const char *rawkey = "bob/sbx-and-trailing-junk";
    sp_route_in_t in2;
    memset(&in2, 0, sizeof in2);
    in2.s[SP_RF_ADDRESS] = "10.1.2.3:junk";
    in2.n[SP_RF_ADDRESS] = 8;
    in2.s[SP_RF_REASON] = "";
    in2.n[SP_RF_REASON] = 0;
    in2.s[SP_RF_MODE] = NULL;
    in2.n[SP_RF_MODE] = 5; /* NULL means empty whatever the length */
    in2.port = 9;
    CHECK_INT(sp_routes_set(rawkey, 7, &in2), 1);
    r = rget("bob/sbx", &out);
    CHECK(r != NULL);
    if (r) {
        CHECK_STR(sp_route_key(r), "bob/sbx");
        CHECK_INT(r->klen, 7);
        CHECK_STR(sp_route_field(r, SP_RF_ADDRESS), "10.1.2.3");
        CHECK_INT(r->len[SP_RF_ADDRESS], 8);
        CHECK_STR(sp_route_field(r, SP_RF_REASON), "");
        CHECK_INT(r->len[SP_RF_REASON], 0);
        CHECK_STR(sp_route_field(r, SP_RF_MODE), "");
        CHECK_INT(r->len[SP_RF_MODE], 0);
        CHECK(!r->ready);
    }
    CHECK(rget("bob/sbx-and-trailing-junk", &out) == NULL);
    CHECK(rget("bob/sb", &out) == NULL);
    CHECK(rget("", &out) == NULL);
    CHECK_INT(sp_routes_count(), 2);
    CHECK_INT(sp_routes_count_ready(), 1);

    /* an empty key is a key like any other */
    sp_route_in_t e = rin(NULL, NULL, NULL, 0, false);
    CHECK_INT(sp_routes_set("", 0, &e), 1);
    CHECK(sp_routes_get("", 0, &out));
    CHECK_INT(sp_routes_count(), 3);
    CHECK(sp_routes_delete("", 0));

    sp_buf_free(&out);
    sp_buf_free(&out2);
    sp_routes_destroy();
}

static void test_routes_versions(void)
{
    sp_routes_init();
    sp_buf_t out = {0};
    uint64_t g0 = sp_routes_generation();
    sp_route_in_t in = rin("ns", "a", "10.0.0.1", 1, false);
    CHECK_INT(rset("u/a", &in), 1);
    uint64_t g1 = sp_routes_generation();
    CHECK(g1 > g0);
    uint64_t v1 = sp_routes_version_of("u/a", 3);
    CHECK(v1 > 0);
    CHECK_INT(v1, g1);

    /* replacing: returns 0, new content, newer version */
    sp_route_in_t in2 = rin("ns", "a", "10.0.0.2", 2, true);
    CHECK_INT(rset("u/a", &in2), 0);
    uint64_t g2 = sp_routes_generation();
    uint64_t v2 = sp_routes_version_of("u/a", 3);
    CHECK(g2 > g1);
    CHECK(v2 > v1);
    const sp_route_t *r = rget("u/a", &out);
    CHECK(r && r->version == v2);
    CHECK(r && r->port == 2 && r->ready);
    CHECK(r && strcmp(sp_route_field(r, SP_RF_ADDRESS), "10.0.0.2") == 0);
    CHECK_INT(sp_routes_count(), 1);

    /* setting another key does not change this key's version */
    CHECK_INT(rset("u/b", &in), 1);
    CHECK_INT(sp_routes_version_of("u/a", 3), v2);
    uint64_t g3 = sp_routes_generation();
    CHECK(g3 > g2);

    /* delete: true, generation moves; again: false, generation does not move */
    CHECK(sp_routes_delete("u/a", 3));
    uint64_t g4 = sp_routes_generation();
    CHECK(g4 > g3);
    CHECK_INT(sp_routes_version_of("u/a", 3), 0);
    CHECK(rget("u/a", &out) == NULL);
    CHECK(!sp_routes_delete("u/a", 3));
    CHECK(!sp_routes_delete("never", 5));
    CHECK_INT(sp_routes_generation(), g4);
    CHECK_INT(sp_routes_count(), 1);

    /* re-creating after delete: created again, version newer than any before */
    CHECK_INT(rset("u/a", &in), 1);
    CHECK(sp_routes_version_of("u/a", 3) > g4);
    sp_buf_free(&out);
    sp_routes_destroy();
}

static void test_routes_counts(void)
{
    sp_routes_init();
    sp_route_in_t ready = rin("ns", "n", "10.0.0.1", 80, true);
    sp_route_in_t down = rin("ns", "n", "", 0, false);
    rin_field(&down, SP_RF_REASON, "Pending");

    CHECK_INT(rset("a", &ready), 1);
    CHECK_INT(rset("b", &down), 1);
    CHECK_INT(rset("c", &ready), 1);
    CHECK_INT(sp_routes_count(), 3);
    CHECK_INT(sp_routes_count_ready(), 2);

    CHECK_INT(rset("a", &down), 0); /* ready -> not ready */
    CHECK_INT(sp_routes_count(), 3);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK_INT(rset("b", &ready), 0); /* not ready -> ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(rset("b", &ready), 0); /* ready -> ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(rset("a", &down), 0); /* not ready -> not ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(sp_routes_count(), 3);

    CHECK(sp_routes_delete("a", 1)); /* not ready */
    CHECK_INT(sp_routes_count(), 2);
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK(sp_routes_delete("c", 1)); /* ready */
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK(!sp_routes_delete("c", 1));
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK(sp_routes_delete("b", 1));
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    sp_routes_destroy();

    /* init starts from an empty table again */
    sp_routes_init();
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    sp_buf_t out = {0};
    CHECK(rget("b", &out) == NULL);
    sp_buf_free(&out);
    sp_routes_destroy();
}

#define SNAP_N 10000

static int snap_key(char *buf, size_t n, int i)
{
    return snprintf(buf, n, "user%d/sandbox-%05d", i % 97, i);
}

static void test_routes_snapshot(void)
{
    sp_routes_init();
    sp_buf_t out = {0};
    CHECK_INT(sp_routes_snapshot(&out), 0);
    CHECK_INT(out.len, 0);

    size_t want_ready = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64], addr[32], name[32];
        int kl = snap_key(key, sizeof key, i);
        snprintf(addr, sizeof addr, "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        snprintf(name, sizeof name, "sandbox-%05d", i);
        sp_route_in_t in = rin("default", name, addr, 1000 + i, i % 3 == 0);
        if (i % 5 == 0)
            rin_field(&in, SP_RF_META, "{\"tier\":\"gold\"}");
        want_ready += i % 3 == 0;
        if (sp_routes_set(key, (size_t)kl, &in) != 1) {
            CHECK(!"sp_routes_set did not create a new key");
            break;
        }
    }
    CHECK_INT(sp_routes_count(), SNAP_N);
    CHECK_INT(sp_routes_count_ready(), want_ready);

    /* every key reads back with its own fields (after the shards grew) */
    int bad = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64], addr[32];
        int kl = snap_key(key, sizeof key, i);
        snprintf(addr, sizeof addr, "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        if (!sp_routes_get(key, (size_t)kl, &out)) {
            bad++;
            continue;
        }
        const sp_route_t *r = (const sp_route_t *)out.p;
        if (r->port != 1000 + i || r->ready != (i % 3 == 0) || strcmp(sp_route_key(r), key) ||
            strcmp(sp_route_field(r, SP_RF_ADDRESS), addr) ||
            strcmp(sp_route_field(r, SP_RF_META), i % 5 == 0 ? "{\"tier\":\"gold\"}" : ""))
            bad++;
    }
    CHECK_INT(bad, 0);

    /* the snapshot holds every entry once, packed, 8-aligned */
    size_t n = sp_routes_snapshot(&out);
    CHECK_INT(n, SNAP_N);
    unsigned char *seen = sp_calloc(SNAP_N, 1);
    size_t off = 0, walked = 0, ready = 0;
    int malformed = 0, dup = 0;
    while (off < out.len) {
        const sp_route_t *r = (const sp_route_t *)(out.p + off);
        if (r->size < sizeof(sp_route_t) || r->size % 8 || off + r->size > out.len) {
            malformed++;
            break;
        }
        int i = atoi(sp_route_key(r) + strlen(sp_route_key(r)) - 5);
        char key[64];
        snap_key(key, sizeof key, i);
        if (i < 0 || i >= SNAP_N || strcmp(key, sp_route_key(r)) || r->port != 1000 + i ||
            r->klen != strlen(key))
            malformed++;
        else if (seen[i]++)
            dup++;
        ready += r->ready;
        walked++;
        off += r->size;
    }
    CHECK_INT(off, out.len);
    CHECK_INT(walked, SNAP_N);
    CHECK_INT(malformed, 0);
    CHECK_INT(dup, 0);
    CHECK_INT(ready, want_ready);
    int missing = 0;
    for (int i = 0; i < SNAP_N; i++)
        missing += !seen[i];
    CHECK_INT(missing, 0);
    free(seen);

    /* delete half; the snapshot follows */
    int notdel = 0;
    for (int i = 0; i < SNAP_N; i += 2) {
        char key[64];
        int kl = snap_key(key, sizeof key, i);
        notdel += !sp_routes_delete(key, (size_t)kl);
    }
    CHECK_INT(notdel, 0);
    CHECK_INT(sp_routes_count(), SNAP_N / 2);
    CHECK_INT(sp_routes_snapshot(&out), SNAP_N / 2);
    int wrong = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64];
        int kl = snap_key(key, sizeof key, i);
        wrong += sp_routes_get(key, (size_t)kl, &out) != (i % 2 == 1);
    }
    CHECK_INT(wrong, 0);
    sp_buf_free(&out);
    sp_routes_destroy();
}

#define RT_THREADS 4
#define RT_OPS 20000
#define RT_KEYS 200

typedef struct {
    uint32_t seed;
    long sets, created, deleted, found, errors;
} rt_worker_t;

static int rt_key(char *buf, size_t n, int k) { return snprintf(buf, n, "u%d/sbx-%d", k % 7, k); }

static void *rt_thread(void *arg)
{
    rt_worker_t *w = arg;
    sp_buf_t out = {0};
    for (int i = 0; i < RT_OPS; i++) {
        uint32_t r = xorshift(&w->seed);
        int k = (int)(r % RT_KEYS);
        char key[32], addr[32];
        int kl = rt_key(key, sizeof key, k);
        snprintf(addr, sizeof addr, "10.0.%d.%d", k / 256, k % 256);
        switch ((r >> 12) % 3) {
        case 0: {
            sp_route_in_t in = rin("ns", key, addr, 1000 + k, (r >> 20) & 1);
            int c = sp_routes_set(key, (size_t)kl, &in);
            w->sets++;
            if (c == 1)
                w->created++;
            else if (c != 0)
                w->errors++;
            break;
        }
        case 1:
            if (sp_routes_get(key, (size_t)kl, &out)) {
                const sp_route_t *e = (const sp_route_t *)out.p;
                w->found++;
                if (out.len != e->size || e->klen != (uint32_t)kl ||
                    memcmp(sp_route_key(e), key, (size_t)kl + 1) || e->port != 1000 + k ||
                    strcmp(sp_route_field(e, SP_RF_ADDRESS), addr) ||
                    strcmp(sp_route_field(e, SP_RF_NAME), key))
                    w->errors++;
            }
            break;
        default:
            if (sp_routes_delete(key, (size_t)kl))
                w->deleted++;
            break;
        }
    }
    sp_buf_free(&out);
    return NULL;
}

static void test_routes_concurrent(void)
{
    sp_routes_init();
    uint64_t g0 = sp_routes_generation();
    pthread_t th[RT_THREADS];
    rt_worker_t w[RT_THREADS];
    for (int i = 0; i < RT_THREADS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].seed = 0x9e3779b9u * (uint32_t)(i + 1);
        CHECK_INT(pthread_create(&th[i], NULL, rt_thread, &w[i]), 0);
    }
    long sets = 0, created = 0, deleted = 0, found = 0, errors = 0;
    for (int i = 0; i < RT_THREADS; i++) {
        pthread_join(th[i], NULL);
        sets += w[i].sets;
        created += w[i].created;
        deleted += w[i].deleted;
        found += w[i].found;
        errors += w[i].errors;
    }
    CHECK_INT(errors, 0);
    CHECK(sets > 0 && deleted > 0 && found > 0);

    /* the counters agree with what is actually in the table */
    sp_buf_t out = {0};
    size_t present = 0, ready = 0;
    for (int k = 0; k < RT_KEYS; k++) {
        char key[32];
        int kl = rt_key(key, sizeof key, k);
        if (sp_routes_get(key, (size_t)kl, &out)) {
            present++;
            ready += ((const sp_route_t *)out.p)->ready;
        }
    }
    CHECK_INT(sp_routes_count(), present);
    CHECK_INT(sp_routes_count_ready(), ready);
    CHECK_INT(created - deleted, (long)present);
    CHECK_INT(sp_routes_snapshot(&out), present);
    /* every set and every successful delete moved the generation once */
    CHECK_INT(sp_routes_generation() - g0, (uint64_t)(sets + deleted));
    sp_buf_free(&out);
    sp_routes_destroy();
}

/* Reads one range; returns the keys joined by spaces. */
static const char *rrange(const char *prefix, const char *after, size_t max, bool *more,
                          size_t *work)
{
    static char joined[4096];
    sp_buf_t keys = {0};
    size_t w = 0;
    size_t n = sp_routes_range(prefix, strlen(prefix), after, after ? strlen(after) : 0, max,
                               &keys, more, &w);
    if (work)
        *work = w;
    size_t off = 0, j = 0;
    joined[0] = '\0';
    for (size_t k = 0; k < n; k++) {
        uint32_t kl;
        memcpy(&kl, keys.p + off, sizeof kl);
        off += sizeof kl;
        if (j + kl + 2 < sizeof joined) {
            if (j)
                joined[j++] = ' ';
            memcpy(joined + j, keys.p + off, kl);
            j += kl;
            joined[j] = '\0';
        }
        off += kl;
    }
    sp_buf_free(&keys);
    return joined;
}

/* The ordered index: byte order, prefixes, `after`, `more`, deletes, and O(log n) seeks. */
static void test_routes_range(void)
{
    sp_routes_init();
    bool more = true;
    CHECK_STR(rrange("", NULL, 10, &more, NULL), "");
    CHECK(!more);
    sp_route_in_t in = rin("default", "x", "10.0.0.1", 1, true);
    const char *keys[] = {"bob/b", "alice/b", "alice-x/a", "alice/a", "alicf/z", "alice/c"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK_INT(rset(keys[i], &in), 1);
    CHECK_INT(rset("alice/b", &in), 0); /* a replace does not add a second index entry */
    CHECK_STR(rrange("", NULL, 10, &more, NULL),
              "alice-x/a alice/a alice/b alice/c alicf/z bob/b");
    CHECK(!more);
    CHECK_STR(rrange("", NULL, 2, &more, NULL), "alice-x/a alice/a");
    CHECK(more);
    CHECK_STR(rrange("", "alice/a", 2, &more, NULL), "alice/b alice/c");
    CHECK(more);
    CHECK_STR(rrange("", "alice/bb", 10, &more, NULL), "alice/c alicf/z bob/b"); /* absent */
    CHECK_STR(rrange("alice/", NULL, 10, &more, NULL), "alice/a alice/b alice/c");
    CHECK(!more);
    CHECK_STR(rrange("alice/", NULL, 3, &more, NULL), "alice/a alice/b alice/c");
    CHECK(!more); /* the next key is another user's */
    CHECK_STR(rrange("alice/", "alice/a", 1, &more, NULL), "alice/b");
    CHECK(more);
    CHECK_STR(rrange("alice/", "a", 10, &more, NULL), "alice/a alice/b alice/c"); /* before */
    CHECK_STR(rrange("alice/", "zzz", 10, &more, NULL), "");                       /* after */
    CHECK_STR(rrange("nobody/", NULL, 10, &more, NULL), "");
    CHECK(!more);
    CHECK(sp_routes_delete("alice/b", 7));
    CHECK(!sp_routes_delete("alice/b", 7));
    CHECK_STR(rrange("alice/", NULL, 10, &more, NULL), "alice/a alice/c");
    CHECK_STR(rrange("", "alice/a", 10, &more, NULL), "alice/c alicf/z bob/b");

    /* 20,000 other keys: one user's range costs a seek, not a walk */
    for (int i = 0; i < 20000; i++) {
        char k[32];
        snprintf(k, sizeof k, "u%d/sb%d", i % 50, i);
        rset(k, &in);
    }
    size_t work = 0;
    CHECK_STR(rrange("bob/", NULL, 10, &more, &work), "bob/b");
    CHECK(work < 200);
    rrange("", NULL, 10, &more, &work);
    CHECK(work < 200);
    CHECK(more);
    sp_routes_destroy();
}

static void test_routes_index(void)
{
    sp_routes_init();
    sp_buf_t key = {0};
    CHECK(!sp_routes_index_get("ns/claim", 8, &key));
    sp_routes_index_set("ns/claim", 8, "alice/claim", 11);
    sp_routes_index_set("ns/pool-x", 8, "alice/pool-x", 12);
    CHECK(sp_routes_index_get("ns/claim", 8, &key));
    CHECK_MEM(key.p, key.len, "alice/claim");
    CHECK_INT(sp_routes_index_count(), 2);
    CHECK_INT(sp_routes_count(), 0);
    sp_buf_t snap = {0};
    CHECK_INT(sp_routes_snapshot(&snap), 0);
    sp_buf_free(&snap);
    sp_routes_index_set("ns/claim", 8, "bob/claim", 9);
    CHECK(sp_routes_index_get("ns/claim", 8, &key));
    CHECK_MEM(key.p, key.len, "bob/claim");
    CHECK_INT(sp_routes_index_count(), 2);
    CHECK(sp_routes_index_delete("ns/claim", 8));
    CHECK(!sp_routes_index_delete("ns/claim", 8));
    CHECK(!sp_routes_index_get("ns/claim", 8, &key));
    CHECK_INT(sp_routes_index_count(), 1);
    sp_buf_free(&key);
    sp_routes_destroy();
}

void suite_routes(void)
{
    RUN(test_routes_set_get);
    RUN(test_routes_versions);
    RUN(test_routes_counts);
    RUN(test_routes_index);
    RUN(test_routes_snapshot);
    RUN(test_routes_range);
    RUN(test_routes_concurrent);
}
