/*
 * conn_limit.c: the process-wide count of open client connections per address, behind
 * max_connections_per_ip (server.c counts a connection when it starts and uncounts it when it
 * closes). Shared by all workers under one mutex.
 */
#include "http/server_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A process-wide count of open connections per client address (max_connections_per_ip). */
typedef struct ipcount {
    struct ipcount *next;
    int n;
    char ip[48];
} ipcount_t;

#define IP_BUCKETS 4096
static ipcount_t *ip_buckets[IP_BUCKETS];
static uv_mutex_t ip_mu;
static uv_once_t ip_once = UV_ONCE_INIT;

static void ip_init(void) { uv_mutex_init(&ip_mu); }

static unsigned ip_hash(const char *s)
{
    return (unsigned)(sp_hash(s, strlen(s)) % IP_BUCKETS);
}

/* Counts one more connection from ip. Returns false (and counts nothing) past the limit. */
bool sp_ip_acquire(const char *ip, int limit)
{
    uv_once(&ip_once, ip_init);
    unsigned h = ip_hash(ip);
    bool ok = true;
    uv_mutex_lock(&ip_mu);
    ipcount_t *e = ip_buckets[h];
    while (e && strcmp(e->ip, ip) != 0)
        e = e->next;
    if (!e) {
        e = sp_calloc(1, sizeof *e);
        snprintf(e->ip, sizeof e->ip, "%s", ip);
        e->next = ip_buckets[h];
        ip_buckets[h] = e;
    }
    if (e->n >= limit)
        ok = false;
    else
        e->n++;
    uv_mutex_unlock(&ip_mu);
    return ok;
}

void sp_ip_release(const char *ip)
{
    unsigned h = ip_hash(ip);
    uv_mutex_lock(&ip_mu);
    ipcount_t **pp = &ip_buckets[h];
    while (*pp && strcmp((*pp)->ip, ip) != 0)
        pp = &(*pp)->next;
    if (*pp && --(*pp)->n == 0) {
        ipcount_t *e = *pp;
        *pp = e->next;
        free(e);
    }
    uv_mutex_unlock(&ip_mu);
}
