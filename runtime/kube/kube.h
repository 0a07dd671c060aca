/*
 * kube.h: the Kubernetes API client transport: libcurl's multi-socket interface driven by a
 * libuv loop (no threads, no blocking calls). It owns the connection settings (server, TLS,
 * bearer token re-read from its file, client certificates) and runs requests whose bodies
 * stream to a callback. It knows nothing about watches (kwatch.c) or Lua (lua_k8s.c).
 */
#ifndef SP_KUBE_H
#define SP_KUBE_H

#include <uv.h>

#include "base/sp.h"

typedef struct sp_kube sp_kube_t;
typedef struct sp_kreq sp_kreq_t;

typedef struct sp_kube_conf {
    const char *server;     /* https://host:port or http://... (no trailing slash) */
    const char *token;      /* a fixed bearer token, or */
    const char *token_file; /* a file re-read every token_refresh seconds and after a 401 */
    const char *ca_file, *ca_data;
    const char *cert_file, *cert_data;
    const char *key_file, *key_data;
    bool insecure;          /* skip certificate verification (development only) */
    bool compression;       /* accept gzip responses */
    double token_refresh;
} sp_kube_conf_t;

/* Body bytes as they arrive. Return 0 to continue, non-zero to abort the transfer. */
typedef int (*sp_kreq_data_cb)(sp_kreq_t *r, const char *data, size_t len, void *ud);
/* The request ended: curl_code 0 and the HTTP status, or a curl error (status 0 when no
 * response head arrived). Not called after sp_kreq_cancel. */
typedef void (*sp_kreq_done_cb)(sp_kreq_t *r, int curl_code, const char *curl_error, long status,
                                void *ud);

/* Creates a client on loop. Returns NULL with err filled on bad settings. */
sp_kube_t *sp_kube_new(uv_loop_t *loop, const sp_kube_conf_t *conf, char err[256]);
/* Cancels every request (no callbacks) and frees the client once its handles are closed. */
void sp_kube_free(sp_kube_t *k);
const char *sp_kube_server(const sp_kube_t *k);
uv_loop_t *sp_kube_loop(const sp_kube_t *k);
/* Forces the token file to be re-read before the next request (after a 401). */
void sp_kube_token_stale(sp_kube_t *k);

/* Starts a request. path includes the query. body may be NULL. timeout_ms 0: none (watches).
 * Returns NULL on failure to start. The request is freed after its done callback returns. */
sp_kreq_t *sp_kube_request(sp_kube_t *k, const char *method, const char *path,
                           const char *content_type, const char *body, size_t blen,
                           long timeout_ms, sp_kreq_data_cb on_data, sp_kreq_done_cb on_done,
                           void *ud);
/* Aborts a request; its callbacks are not called again. */
void sp_kreq_cancel(sp_kreq_t *r);
/* The response status (0 until the head arrived) and its Retry-After in seconds (-1: none). */
long sp_kreq_status(const sp_kreq_t *r);
double sp_kreq_retry_after(const sp_kreq_t *r);
/* The value of a response header captured for scripts (Content-Type, Warning), or NULL. */
const char *sp_kreq_content_type(const sp_kreq_t *r);

#endif
