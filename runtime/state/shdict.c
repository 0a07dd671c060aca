/*
 * shdict.c: shared dicts (see shdict.h). Each entry is one heap block holding the key and the
 * value; a chained hash table finds it and a doubly-linked list keeps recency for eviction.
 * Expired entries are dropped lazily when touched and first when making room.
 */
#include "state/shdict.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct entry {
    struct entry *hnext;
    struct entry *prev, *next; /* LRU: head is most recent */
    uint64_t hash;
    double expires;            /* monotonic seconds; 0: never */
    sp_shtype_t type;
    double num;
    uint32_t klen, vlen;
    size_t size;
    char data[];               /* key then string value */
} entry_t;

struct sp_shdict {
    char *name;
    pthread_mutex_t mu;
    entry_t **buckets;
    size_t nbuckets;
    entry_t *head, *tail;
    size_t capacity, used, count;
    uint64_t evictions;
    struct sp_shdict *next_dict;
};

static sp_shdict_t *dicts;

static double now_s(void) { return (double)sp_mono_ms() / 1000.0; }

sp_shdict_t *sp_shdict_create(const char *name, size_t capacity, char err[128])
{
    if (sp_shdict_find(name, strlen(name))) {
        snprintf(err, 128, "shared dict '%s' is declared twice", name);
        return NULL;
    }
    sp_shdict_t *d = sp_calloc(1, sizeof *d);
    d->name = sp_strdup(name);
    pthread_mutex_init(&d->mu, NULL);
    d->nbuckets = 1024;
    d->buckets = sp_calloc(d->nbuckets, sizeof(entry_t *));
    d->capacity = capacity;
    d->next_dict = dicts;
    dicts = d;
    return d;
}

sp_shdict_t *sp_shdict_find(const char *name, size_t len)
{
    for (sp_shdict_t *d = dicts; d; d = d->next_dict)
        if (strlen(d->name) == len && memcmp(d->name, name, len) == 0)
            return d;
    return NULL;
}

sp_shdict_t *sp_shdict_next(sp_shdict_t *prev) { return prev ? prev->next_dict : dicts; }
const char *sp_shdict_name(const sp_shdict_t *d) { return d->name; }

static void lru_unlink(sp_shdict_t *d, entry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        d->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        d->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push(sp_shdict_t *d, entry_t *e)
{
    e->prev = NULL;
    e->next = d->head;
    if (d->head)
        d->head->prev = e;
    d->head = e;
    if (!d->tail)
        d->tail = e;
}

static entry_t **find(sp_shdict_t *d, uint64_t h, const char *k, size_t kl)
{
    entry_t **pp = &d->buckets[h & (d->nbuckets - 1)];
    while (*pp) {
        entry_t *e = *pp;
        if (e->hash == h && e->klen == kl && memcmp(e->data, k, kl) == 0)
            return pp;
        pp = &e->hnext;
    }
    return pp;
}

static void remove_entry(sp_shdict_t *d, entry_t *e)
{
    entry_t **pp = find(d, e->hash, e->data, e->klen);
    *pp = e->hnext;
    lru_unlink(d, e);
    d->used -= e->size;
    d->count--;
    free(e);
}

static void grow(sp_shdict_t *d)
{
    size_t nb = d->nbuckets * 2;
    entry_t **b = sp_calloc(nb, sizeof(entry_t *));
    for (size_t i = 0; i < d->nbuckets; i++) {
        entry_t *e = d->buckets[i];
        while (e) {
            entry_t *n = e->hnext;
            e->hnext = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = n;
        }
    }
    free(d->buckets);
    d->buckets = b;
    d->nbuckets = nb;
}

/* Looks up a live entry (dropping it if expired) and marks it recently used. */
static entry_t *lookup(sp_shdict_t *d, const char *k, size_t kl, double now)
{
    uint64_t h = sp_hash(k, kl);
    entry_t *e = *find(d, h, k, kl);
    if (!e)
        return NULL;
    if (e->expires && e->expires <= now) {
        remove_entry(d, e);
        return NULL;
    }
    lru_unlink(d, e);
    lru_push(d, e);
    return e;
}

int sp_shdict_get(sp_shdict_t *d, const char *k, size_t kl, sp_buf_t *buf, sp_shval_t *out,
                  double *ttl_left)
{
    double now = now_s();
    pthread_mutex_lock(&d->mu);
    entry_t *e = lookup(d, k, kl, now);
    if (!e) {
        pthread_mutex_unlock(&d->mu);
        return -ENOENT;
    }
    out->type = e->type;
    out->num = e->num;
    out->str = NULL;
    out->len = 0;
    if (e->type == SP_SH_STRING) {
        buf->len = 0;
        sp_buf_add(buf, e->data + e->klen, e->vlen);
        sp_buf_addc(buf, '\0');
        out->str = buf->p;
        out->len = e->vlen;
    }
    if (ttl_left)
        *ttl_left = e->expires ? e->expires - now : 0;
    pthread_mutex_unlock(&d->mu);
    return 0;
}

/* Frees room for `need` bytes: expired entries from the tail first, then the LRU tail. */
static void make_room(sp_shdict_t *d, size_t need, double now)
{
    int scanned = 0;
    for (entry_t *e = d->tail; e && scanned < 30 && d->used + need > d->capacity; scanned++) {
        entry_t *p = e->prev;
        if (e->expires && e->expires <= now)
            remove_entry(d, e);
        e = p;
    }
    while (d->used + need > d->capacity && d->tail) {
        remove_entry(d, d->tail);
        d->evictions++;
    }
}

static int set_locked(sp_shdict_t *d, const char *k, size_t kl, const sp_shval_t *v, double ttl,
                      int mode, double now)
{
    entry_t *old = lookup(d, k, kl, now);
    if (mode == SP_SH_ADD && old)
        return -EEXIST;
    if (mode == SP_SH_REPLACE && !old)
        return -ENOENT;
    if (v->type == SP_SH_NIL) {
        if (old)
            remove_entry(d, old);
        return 0;
    }
    size_t vlen = v->type == SP_SH_STRING ? v->len : 0;
    size_t size = sizeof(entry_t) + kl + vlen;
    if (size > d->capacity)
        return -E2BIG;
    if (old)
        remove_entry(d, old);
    make_room(d, size, now);
    entry_t *e = sp_malloc(size);
    e->hash = sp_hash(k, kl);
    e->expires = ttl > 0 ? now + ttl : 0;
    e->type = v->type;
    e->num = v->num;
    e->klen = (uint32_t)kl;
    e->vlen = (uint32_t)vlen;
    e->size = size;
    memcpy(e->data, k, kl);
    if (vlen)
        memcpy(e->data + kl, v->str, vlen);
    entry_t **pp = find(d, e->hash, k, kl);
    e->hnext = NULL;
    *pp = e;
    lru_push(d, e);
    d->used += size;
    d->count++;
    if (d->count > d->nbuckets)
        grow(d);
    return 0;
}

int sp_shdict_set(sp_shdict_t *d, const char *k, size_t kl, const sp_shval_t *v, double ttl,
                  int mode)
{
    double now = now_s();
    pthread_mutex_lock(&d->mu);
    int rc = set_locked(d, k, kl, v, ttl, mode, now);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int sp_shdict_incr(sp_shdict_t *d, const char *k, size_t kl, double delta, bool has_init,
                   double init, double init_ttl, double *out)
{
    double now = now_s();
    int rc = 0;
    pthread_mutex_lock(&d->mu);
    entry_t *e = lookup(d, k, kl, now);
    if (e) {
        if (e->type != SP_SH_NUMBER)
            rc = -EINVAL;
        else
            *out = e->num += delta;
    } else if (!has_init) {
        rc = -ENOENT;
    } else {
        sp_shval_t v = {SP_SH_NUMBER, init + delta, NULL, 0};
        rc = set_locked(d, k, kl, &v, init_ttl, SP_SH_SET, now);
        *out = init + delta;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int sp_shdict_acquire(sp_shdict_t *d, const char *k, size_t kl, double limit)
{
    double now = now_s();
    int rc = 0;
    pthread_mutex_lock(&d->mu);
    entry_t *e = lookup(d, k, kl, now);
    double cur = (e && e->type == SP_SH_NUMBER) ? e->num : 0;
    if (cur + 1 <= limit) {
        if (e && e->type == SP_SH_NUMBER) {
            e->num = cur + 1;
            rc = 1;
        } else {
            sp_shval_t v = {SP_SH_NUMBER, 1, NULL, 0};
            rc = set_locked(d, k, kl, &v, 0, SP_SH_SET, now) == 0 ? 1 : 0;
        }
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int sp_shdict_rate(sp_shdict_t *d, const char *k, size_t kl, double rate, double burst,
                   double *remaining, double *retry_after, double *reset)
{
    double now = now_s();
    double T = 1.0 / rate;           /* emission interval */
    double tau = burst * T;          /* how far ahead the schedule may run */
    pthread_mutex_lock(&d->mu);
    entry_t *e = lookup(d, k, kl, now);
    double tat = (e && e->type == SP_SH_NUMBER && e->num > now) ? e->num : now;
    double new_tat = tat + T;
    int allowed = new_tat - now <= tau + 1e-9;
    if (allowed) {
        if (e && e->type == SP_SH_NUMBER) {
            e->num = new_tat;
            e->expires = new_tat + 1;
        } else {
            sp_shval_t v = {SP_SH_NUMBER, new_tat, NULL, 0};
            set_locked(d, k, kl, &v, new_tat - now + 1, SP_SH_SET, now);
        }
        tat = new_tat;
        *retry_after = 0;
    } else {
        *retry_after = new_tat - tau - now;
    }
    pthread_mutex_unlock(&d->mu);
    /* The same 1e-9 s of float noise as the decision, before dividing by T: tat and now are
     * seconds of uptime, so tat - now is off by a few ulps of now (1e-11 s), which a
     * tolerance in tokens (after / T) would not cover at 1000/s (1998 instead of 1999). */
    double left = (tau - (tat - now) + 1e-9) / T;
    *remaining = left > 0 ? (double)(long long)left : 0;
    *reset = tat - now > 0 ? tat - now : 0;
    return allowed;
}

int sp_shdict_delete(sp_shdict_t *d, const char *k, size_t kl)
{
    double now = now_s();
    pthread_mutex_lock(&d->mu);
    entry_t *e = *find(d, sp_hash(k, kl), k, kl);
    bool live = e && !(e->expires && e->expires <= now);
    if (e)
        remove_entry(d, e);
    pthread_mutex_unlock(&d->mu);
    return live ? 0 : -ENOENT;
}

int sp_shdict_expire(sp_shdict_t *d, const char *k, size_t kl, double ttl)
{
    double now = now_s();
    pthread_mutex_lock(&d->mu);
    entry_t *e = lookup(d, k, kl, now);
    if (e)
        e->expires = ttl > 0 ? now + ttl : 0;
    pthread_mutex_unlock(&d->mu);
    return e ? 0 : -ENOENT;
}

void sp_shdict_flush(sp_shdict_t *d)
{
    pthread_mutex_lock(&d->mu);
    while (d->head)
        remove_entry(d, d->head);
    pthread_mutex_unlock(&d->mu);
}

void sp_shdict_stats(sp_shdict_t *d, sp_shdict_stats_t *st)
{
    pthread_mutex_lock(&d->mu);
    st->capacity = d->capacity;
    st->used = d->used;
    st->count = d->count;
    st->evictions = d->evictions;
    pthread_mutex_unlock(&d->mu);
}

void sp_shdict_destroy_all(void)
{
    while (dicts) {
        sp_shdict_t *d = dicts;
        dicts = d->next_dict;
        while (d->head)
            remove_entry(d, d->head);
        free(d->buckets);
        pthread_mutex_destroy(&d->mu);
        free(d->name);
        free(d);
    }
}
