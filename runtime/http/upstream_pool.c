/*
 * upstream_pool.c: the per-worker keep-alive pool of upstream connections: a key per
 * host:port (hashed into the worker's table), its list of idle connections, the check that an
 * idle connection is still quiet before it is reused, and closing the idle connections (drain)
 * and the keys (worker exit). upstream.c takes a connection from the pool when a request
 * starts and puts it back when a response completes.
 */
#include "http/upstream_int.h"
#include "http/worker.h"
#include "base/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static uint64_t key_hash(const char *h, int port)
{
    return sp_hash_more(SP_HASH_INIT ^ (uint64_t)port, h, strlen(h));
}

sp_upkey_t *sp_up_key_get(sp_worker_t *w, const char *host, int port)
{
    if (!w->upkeys) {
        w->nupkeys_cap = 256;
        w->upkeys = sp_calloc(w->nupkeys_cap, sizeof *w->upkeys);
    }
    uint64_t h = key_hash(host, port);
    sp_upkey_t **pp = &w->upkeys[h & (w->nupkeys_cap - 1)];
    for (sp_upkey_t *k = *pp; k; k = k->next)
        if (k->hash == h && k->port == port && strcmp(k->host, host) == 0)
            return k;
    sp_upkey_t *k = sp_calloc(1, sizeof *k);
    snprintf(k->host, sizeof k->host, "%s", host);
    k->port = port;
    k->hash = h;
    k->next = *pp;
    *pp = k;
    w->nupkeys++;
    return k;
}

void sp_up_idle_unlink(sp_upconn_t *u)
{
    sp_upkey_t *k = u->key;
    if (u->prev)
        u->prev->next = u->next;
    else if (k->idle == u)
        k->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->next = u->prev = NULL;
    k->nidle--;
}

void sp_up_idle_put(sp_upkey_t *k, sp_upconn_t *u)
{
    u->next = k->idle;
    u->prev = NULL;
    if (k->idle)
        k->idle->prev = u;
    k->idle = u;
    k->nidle++;
}

void sp_upstream_close_idle(sp_worker_t *w)
{
    if (!w->upkeys)
        return;
    for (uint32_t i = 0; i < w->nupkeys_cap; i++)
        for (sp_upkey_t *k = w->upkeys[i]; k; k = k->next)
            while (k->idle) {
                sp_upconn_t *u = k->idle;
                sp_up_idle_unlink(u);
                sp_up_close(u);
            }
}

void sp_upstream_pool_destroy(sp_worker_t *w)
{
    if (!w->upkeys)
        return;
    for (uint32_t i = 0; i < w->nupkeys_cap; i++) {
        sp_upkey_t *k = w->upkeys[i];
        while (k) {
            sp_upkey_t *n = k->next;
            free(k);
            k = n;
        }
    }
    free(w->upkeys);
    w->upkeys = NULL;
}

/* True if nothing arrived on an idle pooled connection. Its reads are on (up_on_read closes it
 * at the first byte or at EOF), but bytes that came in this loop iteration are not read yet:
 * whatever the sandbox sent unasked would be taken as the next request's response. */
bool sp_up_idle_quiet(sp_upconn_t *u)
{
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&u->tcp, &fd) != 0)
        return false;
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0)
        sp_log(SP_LOG_WARN, "upstream sent bytes on an idle connection: closed", "s:upstream",
               u->key->host, "i:port", (int64_t)u->key->port, NULL);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

sp_upconn_t *sp_up_idle_take(sp_upkey_t *k, bool check)
{
    while (k->idle) {
        sp_upconn_t *u = k->idle;
        sp_up_idle_unlink(u);
        if (!check || sp_up_idle_quiet(u))
            return u;
        sp_up_close(u);
    }
    return NULL;
}
