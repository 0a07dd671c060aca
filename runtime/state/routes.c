/*
 * routes.c: the shared route table (see routes.h): 64 shards, each a chained hash table behind
 * its own mutex. Entries are single heap blocks, replaced whole on update, so a reader copies
 * exactly one block and never sees a half-written route.
 *
 * Beside the shards, an ordered index of the keys (a skip list behind its own mutex) serves
 * sorted range reads (sp_routes_range: /sandboxes pages, a user's prefix) in O(log n + page)
 * instead of a sort of the whole table. It changes only when a key is created or deleted, under
 * that key's shard lock (lock order: shard, then index), so it always holds exactly the keys
 * of the table.
 */
#include "state/routes.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#define NSHARDS 64

const char *const sp_route_field_names[SP_RF_COUNT] = {
    "namespace",   "name",        "user",         "address",          "reason",
    "service",     "conflict",    "mode",         "meta",             "api_version",
    "resource_version", "idle_timeout", "last_activity", "claim",          "alias_of",
    "ports",       "prefix",
};

typedef struct shard {
    pthread_mutex_t mu;
    sp_route_t **buckets;
    size_t nbuckets;
    size_t count;
} shard_t;

/* Two tables with the same machinery: the routes, and the name index ("namespace/name" ->
 * route key, an entry whose SP_RF_NAME field holds the key). */
typedef struct table {
    shard_t shards[NSHARDS];
    atomic_size_t total;
    atomic_size_t ready_total;
    atomic_uint_fast64_t generation;
} table_t;

static table_t rt, ix;

/* ------------------------------------------------------------------ the ordered index */

#define SL_MAX 24

typedef struct sl_node {
    uint32_t klen;
    uint32_t level;
    struct sl_node *next[]; /* level pointers, then the key bytes */
} sl_node_t;

static pthread_mutex_t idx_mu = PTHREAD_MUTEX_INITIALIZER;
static sl_node_t *idx_head;
static uint32_t idx_level;
static uint64_t idx_rng;

static inline const char *sl_key(const sl_node_t *n) { return (const char *)&n->next[n->level]; }

/* Byte order; a key sorts after its own prefixes (the order of strcmp for keys without NUL). */
static int key_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c)
        return c;
    return an < bn ? -1 : an > bn ? 1 : 0;
}

static int node_cmp(const sl_node_t *n, const char *k, size_t kn)
{
    return key_cmp(sl_key(n), n->klen, k, kn);
}

static uint32_t sl_random_level(void)
{
    idx_rng ^= idx_rng << 13;
    idx_rng ^= idx_rng >> 7;
    idx_rng ^= idx_rng << 17;
    uint64_t r = idx_rng;
    uint32_t lvl = 1;
    while (lvl < SL_MAX && (r & 3) == 0) { /* p = 1/4 per level */
        lvl++;
        r >>= 2;
    }
    return lvl;
}

/* Fills pred[i] with the last node at level i whose key is < k (or <= k when after). Counts
 * the comparisons in *work. Returns the first node at level 0 past pred[0]. */
static sl_node_t *sl_seek(const char *k, size_t kn, bool after, sl_node_t **pred, size_t *work)
{
    sl_node_t *x = idx_head;
    for (int i = (int)idx_level - 1; i >= 0; i--) {
        for (;;) {
            sl_node_t *n = x->next[i];
            if (!n)
                break;
            (*work)++;
            int c = node_cmp(n, k, kn);
            if (c < 0 || (after && c == 0))
                x = n;
            else
                break;
        }
        if (pred)
            pred[i] = x;
    }
    return x->next[0];
}

static void idx_insert(const char *k, size_t kn)
{
    sl_node_t *pred[SL_MAX];
    size_t work = 0;
    pthread_mutex_lock(&idx_mu);
    sl_node_t *n = sl_seek(k, kn, false, pred, &work);
    if (n && node_cmp(n, k, kn) == 0) {
        pthread_mutex_unlock(&idx_mu);
        return;
    }
    uint32_t lvl = sl_random_level();
    for (uint32_t i = idx_level; i < lvl; i++)
        pred[i] = idx_head;
    if (lvl > idx_level)
        idx_level = lvl;
    n = sp_malloc(sizeof(sl_node_t) + lvl * sizeof(sl_node_t *) + kn + 1);
    n->klen = (uint32_t)kn;
    n->level = lvl;
    memcpy((char *)sl_key(n), k, kn);
    ((char *)sl_key(n))[kn] = '\0';
    for (uint32_t i = 0; i < lvl; i++) {
        n->next[i] = pred[i]->next[i];
        pred[i]->next[i] = n;
    }
    pthread_mutex_unlock(&idx_mu);
}

static void idx_remove(const char *k, size_t kn)
{
    sl_node_t *pred[SL_MAX];
    size_t work = 0;
    pthread_mutex_lock(&idx_mu);
    sl_node_t *n = sl_seek(k, kn, false, pred, &work);
    if (n && node_cmp(n, k, kn) == 0) {
        for (uint32_t i = 0; i < n->level; i++)
            if (pred[i]->next[i] == n)
                pred[i]->next[i] = n->next[i];
        while (idx_level > 1 && idx_head->next[idx_level - 1] == NULL)
            idx_level--;
        free(n);
    }
    pthread_mutex_unlock(&idx_mu);
}


static uint64_t hash_key(const char *k, size_t n)
{
    uint64_t h = sp_hash(k, n);
    return h ^ (h >> 29); /* the high bits reach the shard index */
}

static void table_init(table_t *t)
{
    for (int i = 0; i < NSHARDS; i++) {
        pthread_mutex_init(&t->shards[i].mu, NULL);
        t->shards[i].nbuckets = 64;
        t->shards[i].buckets = sp_calloc(64, sizeof(sp_route_t *));
        t->shards[i].count = 0;
    }
    atomic_store(&t->total, 0);
    atomic_store(&t->ready_total, 0);
    atomic_store(&t->generation, 1);
}

void sp_routes_init(void)
{
    table_init(&rt);
    table_init(&ix);
    idx_head = sp_calloc(1, sizeof(sl_node_t) + SL_MAX * sizeof(sl_node_t *));
    idx_head->level = SL_MAX;
    idx_level = 1;
    idx_rng = 0x9e3779b97f4a7c15ull; /* fixed: the index's shape is reproducible */
}

static void table_destroy(table_t *t)
{
    for (int i = 0; i < NSHARDS; i++) {
        shard_t *s = &t->shards[i];
        for (size_t b = 0; b < s->nbuckets; b++) {
            sp_route_t *e = s->buckets[b];
            while (e) {
                sp_route_t *n = e->next;
                free(e);
                e = n;
            }
        }
        free(s->buckets);
        s->buckets = NULL;
        pthread_mutex_destroy(&s->mu);
    }
}

void sp_routes_destroy(void)
{
    table_destroy(&rt);
    table_destroy(&ix);
    for (sl_node_t *n = idx_head ? idx_head->next[0] : NULL; n;) {
        sl_node_t *next = n->next[0];
        free(n);
        n = next;
    }
    free(idx_head);
    idx_head = NULL;
}

/* High bits pick the shard; low bits pick the bucket inside it (independent bits). */
static shard_t *shard_of(table_t *t, uint64_t h) { return &t->shards[(h >> 58) % NSHARDS]; }

static sp_route_t **find_slot(shard_t *s, uint64_t h, const char *key, size_t klen)
{
    sp_route_t **pp = &s->buckets[h & (s->nbuckets - 1)];
    while (*pp) {
        sp_route_t *e = *pp;
        if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0)
            return pp;
        pp = &e->next;
    }
    return pp;
}

static void grow(shard_t *s)
{
    size_t nb = s->nbuckets * 2;
    sp_route_t **b = sp_calloc(nb, sizeof(sp_route_t *));
    for (size_t i = 0; i < s->nbuckets; i++) {
        sp_route_t *e = s->buckets[i];
        while (e) {
            sp_route_t *n = e->next;
            size_t j = e->hash & (nb - 1);
            e->next = b[j];
            b[j] = e;
            e = n;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = nb;
}

static sp_route_t *build(uint64_t h, const char *key, size_t klen, const sp_route_in_t *in)
{
    size_t size = sizeof(sp_route_t) + klen + 1;
    for (int f = 0; f < SP_RF_COUNT; f++)
        size += (in->s[f] ? in->n[f] : 0) + 1;
    size = (size + 7) & ~(size_t)7;
    sp_route_t *e = sp_malloc(size);
    e->next = NULL;
    e->hash = h;
    e->port = in->port;
    e->ready = in->ready;
    e->size = (uint32_t)size;
    e->klen = (uint32_t)klen;
    e->updated = sp_wall_time();
    memcpy(e->data, key, klen);
    e->data[klen] = '\0';
    uint32_t pos = (uint32_t)klen + 1;
    for (int f = 0; f < SP_RF_COUNT; f++) {
        size_t n = in->s[f] ? in->n[f] : 0;
        e->off[f] = pos;
        e->len[f] = (uint32_t)n;
        if (n)
            memcpy(e->data + pos, in->s[f], n);
        e->data[pos + n] = '\0';
        pos += (uint32_t)n + 1;
    }
    return e;
}

static int table_set(table_t *t, const char *key, size_t klen, const sp_route_in_t *in)
{
    uint64_t h = hash_key(key, klen);
    sp_route_t *e = build(h, key, klen, in);
    shard_t *s = shard_of(t, h);
    pthread_mutex_lock(&s->mu);
    e->version = atomic_fetch_add(&t->generation, 1) + 1;
    sp_route_t **pp = find_slot(s, h, key, klen);
    sp_route_t *old = *pp;
    int created = old == NULL;
    if (old) {
        e->next = old->next;
        if (old->ready)
            atomic_fetch_sub(&t->ready_total, 1);
    } else {
        s->count++;
        atomic_fetch_add(&t->total, 1);
        if (t == &rt) /* the ordered index holds the route keys only */
            idx_insert(key, klen);
    }
    *pp = e;
    if (e->ready)
        atomic_fetch_add(&t->ready_total, 1);
    if (created && s->count > s->nbuckets)
        grow(s);
    pthread_mutex_unlock(&s->mu);
    free(old);
    return created;
}

int sp_routes_set(const char *key, size_t klen, const sp_route_in_t *in)
{
    return table_set(&rt, key, klen, in);
}

static bool table_get(table_t *t, const char *key, size_t klen, sp_buf_t *out)
{
    uint64_t h = hash_key(key, klen);
    shard_t *s = shard_of(t, h);
    bool found = false;
    pthread_mutex_lock(&s->mu);
    sp_route_t *e = *find_slot(s, h, key, klen);
    if (e) {
        out->len = 0;
        sp_buf_add(out, e, e->size);
        found = true;
    }
    pthread_mutex_unlock(&s->mu);
    return found;
}

bool sp_routes_get(const char *key, size_t klen, sp_buf_t *out)
{
    return table_get(&rt, key, klen, out);
}

uint64_t sp_routes_version_of(const char *key, size_t klen)
{
    uint64_t h = hash_key(key, klen);
    shard_t *s = shard_of(&rt, h);
    pthread_mutex_lock(&s->mu);
    sp_route_t *e = *find_slot(s, h, key, klen);
    uint64_t v = e ? e->version : 0;
    pthread_mutex_unlock(&s->mu);
    return v;
}

static bool table_delete(table_t *t, const char *key, size_t klen)
{
    uint64_t h = hash_key(key, klen);
    shard_t *s = shard_of(t, h);
    pthread_mutex_lock(&s->mu);
    sp_route_t **pp = find_slot(s, h, key, klen);
    sp_route_t *e = *pp;
    if (e) {
        *pp = e->next;
        s->count--;
        atomic_fetch_sub(&t->total, 1);
        if (e->ready)
            atomic_fetch_sub(&t->ready_total, 1);
        atomic_fetch_add(&t->generation, 1);
        if (t == &rt)
            idx_remove(key, klen);
    }
    pthread_mutex_unlock(&s->mu);
    free(e);
    return e != NULL;
}

bool sp_routes_delete(const char *key, size_t klen) { return table_delete(&rt, key, klen); }

size_t sp_routes_count(void) { return atomic_load(&rt.total); }
size_t sp_routes_count_ready(void) { return atomic_load(&rt.ready_total); }
uint64_t sp_routes_generation(void) { return atomic_load(&rt.generation); }

void sp_routes_index_set(const char *name, size_t nlen, const char *key, size_t klen)
{
    sp_route_in_t in;
    memset(&in, 0, sizeof in);
    in.s[SP_RF_NAME] = key;
    in.n[SP_RF_NAME] = klen;
    table_set(&ix, name, nlen, &in);
}

bool sp_routes_index_get(const char *name, size_t nlen, sp_buf_t *key)
{
    sp_buf_t tmp = {0};
    bool found = table_get(&ix, name, nlen, &tmp);
    if (found) {
        const sp_route_t *e = (const sp_route_t *)tmp.p;
        key->len = 0;
        sp_buf_add(key, sp_route_field(e, SP_RF_NAME), e->len[SP_RF_NAME]);
    }
    sp_buf_free(&tmp);
    return found;
}

bool sp_routes_index_delete(const char *name, size_t nlen) { return table_delete(&ix, name, nlen); }
size_t sp_routes_index_count(void) { return atomic_load(&ix.total); }

size_t sp_routes_snapshot(sp_buf_t *out)
{
    size_t n = 0;
    out->len = 0;
    for (int i = 0; i < NSHARDS; i++) {
        shard_t *s = &rt.shards[i];
        pthread_mutex_lock(&s->mu);
        for (size_t b = 0; b < s->nbuckets; b++)
            for (sp_route_t *e = s->buckets[b]; e; e = e->next) {
                sp_buf_add(out, e, e->size);
                n++;
            }
        pthread_mutex_unlock(&s->mu);
    }
    return n;
}

size_t sp_routes_range(const char *prefix, size_t plen, const char *after, size_t alen,
                       size_t max, sp_buf_t *keys, bool *more, size_t *work)
{
    size_t n = 0;
    keys->len = 0;
    *more = false;
    pthread_mutex_lock(&idx_mu);
    sl_node_t *x;
    if (after && key_cmp(after, alen, prefix, plen) >= 0)
        x = sl_seek(after, alen, true, NULL, work);
    else
        x = sl_seek(prefix, plen, false, NULL, work);
    for (; x; x = x->next[0]) {
        (*work)++;
        if (x->klen < plen || memcmp(sl_key(x), prefix, plen) != 0)
            break; /* past the prefix's range */
        if (n == max) {
            *more = true;
            break;
        }
        uint32_t kl = x->klen;
        sp_buf_add(keys, &kl, sizeof kl);
        sp_buf_add(keys, sl_key(x), kl);
        n++;
    }
    pthread_mutex_unlock(&idx_mu);
    return n;
}
