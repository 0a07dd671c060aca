/*
 * upstream_int.h: declarations shared by the files of the upstream side (upstream.c,
 * upstream_pool.c, proxy_head.c); not an interface for other layers.
 */
#ifndef SP_UPSTREAM_INT_H
#define SP_UPSTREAM_INT_H
#include "http/http.h"

typedef struct sp_upkey {
    char host[256];
    int port;
    uint64_t hash;
    sp_upconn_t *idle;
    uint32_t nidle;
    struct sp_upkey *next;
} sp_upkey_t;

/* upstream.c */
void sp_up_close(sp_upconn_t *u);

/* upstream_pool.c: the key of host:port (created on first use); putting a connection on (the
 * front of) its key's idle list and unlinking it; true if nothing arrived on an idle pooled
 * connection; taking the most recently pooled connection off the list, or NULL: with `check`,
 * one that is still quiet (the ones that are not are closed). */
sp_upkey_t *sp_up_key_get(sp_worker_t *w, const char *host, int port);
void sp_up_idle_put(sp_upkey_t *k, sp_upconn_t *u);
void sp_up_idle_unlink(sp_upconn_t *u);
bool sp_up_idle_quiet(sp_upconn_t *u);
sp_upconn_t *sp_up_idle_take(sp_upkey_t *k, bool check);

/* proxy_head.c: the upstream request head into r->out; the client's response head (from the
 * parsed upstream response) into u->req->out. */
void sp_build_request_head(sp_request_t *r);
void sp_build_response_head(sp_upconn_t *u);

#endif
