/*
 * upstream.c: connections to sandboxes. Takes a connection from the keep-alive pool
 * (upstream_pool.c) or connects, with retries of refused connects; sends the request head
 * (built in proxy_head.c) and streams the body; parses the response with llhttp and streams it
 * to the client as it arrives with backpressure (one read buffer per direction, never more);
 * turns 101 responses into a raw tunnel; puts a finished connection back in the pool. Failures
 * map to 502/504 before the response head is sent, and to a closed client connection after it.
 */
#include "http/http.h"
#include "http/worker.h"
#include "base/config.h"
#include "base/log.h"
#include "base/netaddr.h"
#include "http/trace.h"
#include "http/wbatch.h"
#include "http/upstream_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

enum { US_NEW, US_RETRY_WAIT, US_RESOLVING, US_CONNECTING, US_ACTIVE, US_TUNNEL, US_IDLE };
enum { UT_NONE, UT_CONNECT, UT_FIRST_BYTE, UT_IDLE, UT_RETRY, UT_KEEPALIVE, UT_TUNNEL };

static char idle_scratch[64]; /* reads on idle pooled connections are discarded */

static void up_process(sp_upconn_t *u);
static void up_connect_start(sp_upconn_t *u);
static void up_send_head(sp_upconn_t *u);
static void up_timer(sp_upconn_t *u, int kind, double secs);
static void on_up_timer(sp_deadline_t *d, int kind);

/* ---------------------------------------------------------------- lifecycle */

/* Drops one reference: each of the two handles (socket, deadline timer) holds one until its
 * close callback, and a running name lookup holds one until its callback, which libuv runs
 * even when uv_cancel succeeded (a loop iteration after the handles' close callbacks). */
static void up_unref(sp_upconn_t *u)
{
    if (--u->handles > 0)
        return;
    if (u->buf)
        sp_pool_put(u->big_buf ? &u->w->upstream_body_bufs : &u->w->upstream_bufs, u->buf);
    free(u);
}

static void on_up_handle_closed(uv_handle_t *h) { up_unref(h->data); }

static void up_release_buf(sp_upconn_t *u)
{
    if (u->buf) {
        sp_pool_put(u->big_buf ? &u->w->upstream_body_bufs : &u->w->upstream_bufs, u->buf);
        u->buf = NULL;
    }
    u->big_buf = u->want_big = false;
    u->len = u->pos = u->cap = 0;
}

static void up_detach(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    if (r) {
        if (r->up == u)
            r->up = NULL;
        u->req = NULL;
    }
}

void sp_up_close(sp_upconn_t *u)
{
    if (u->closing)
        return;
    u->closing = true;
    if (sp_wbatch_cancel(u->w->wb, &u->wreq))
        u->writing = false; /* a staged head to a connection given up must not go */
    up_detach(u);
    if (u->state == US_IDLE && u->key && (u->prev || u->next || u->key->idle == u))
        sp_up_idle_unlink(u);
    if (u->state == US_RESOLVING)
        uv_cancel((uv_req_t *)&u->gai); /* its callback still runs and drops its reference */
    uv_close((uv_handle_t *)&u->tcp, on_up_handle_closed);
    sp_deadline_close(&u->dl, on_up_handle_closed);
}

static sp_upconn_t *up_new(sp_worker_t *w, sp_upkey_t *key)
{
    sp_upconn_t *u = sp_calloc(1, sizeof *u);
    u->w = w;
    u->key = key;
    uv_tcp_init(&w->loop, &u->tcp);
    sp_deadline_init(&u->dl, &w->loop, on_up_timer, u);
    u->tcp.data = u;
    u->handles = 2;
    u->state = US_NEW;
    return u;
}

static const llhttp_settings_t response_settings;

static void up_attach(sp_upconn_t *u, sp_request_t *r)
{
    u->req = r;
    r->up = u;
    u->got_bytes = false;
    u->rflags = 0;
    u->pos = u->len = 0;
    llhttp_init(&u->parser, HTTP_RESPONSE, &response_settings);
    u->parser.data = u;
}

static void up_fail_msg(sp_upconn_t *u, sp_error_t err, int status, const char *msg);

/* Ends the exchange with an error response (or a closed client if the head went out). */
static void up_fail(sp_upconn_t *u, sp_error_t err, int status)
{
    up_fail_msg(u, err, status, sp_error_names[err]);
}

/* up_fail with msg as the response's "error" text. */
static void up_fail_msg(sp_upconn_t *u, sp_error_t err, int status, const char *msg)
{
    sp_request_t *r = u->req;
    sp_up_close(u);
    if (!r)
        return;
    if (r->error == SP_ERR_NONE)
        r->error = err;
    sp_worker_t *w = r->w;
    if (err == SP_ERR_CONNECT)
        SP_STAT_ADD(w->stats.upstream_connect_errors, 1);
    if (err == SP_ERR_CONNECT_TIMEOUT || err == SP_ERR_FIRST_BYTE_TIMEOUT)
        SP_STAT_ADD(w->stats.upstream_timeouts, 1);
    if (!r->client)
        return;
    sp_log(SP_LOG_WARN, "upstream error", "s:request_id", r->id, "s:upstream", r->upstream_addr,
           "s:error", sp_error_names[err], NULL);
    r->cops->fail(r, status, msg);
}

/* Refuses (503, one log line, nothing dialled) an address no sandbox may have: unspecified,
 * link-local, multicast, broadcast, and loopback unless allow_loopback_sandboxes. Checked for
 * literal addresses and for what a name (serviceFQDN) resolved to. Returns true if refused. */
static bool up_refuse_address(sp_upconn_t *u, const struct sockaddr *sa)
{
    const char *why = sp_addr_refusal(sa, sp_cfg.allow_loopback_sandboxes);
    if (!why)
        return false;
    sp_request_t *r = u->req;
    sp_log(SP_LOG_WARN, "sandbox address refused", "s:request_id", r ? r->id : "",
           "s:upstream", r ? r->upstream_addr : u->key->host, "s:reason", why, NULL);
    char msg[96];
    snprintf(msg, sizeof msg, "sandbox address refused: %s", why);
    up_fail_msg(u, SP_ERR_ADDRESS_REFUSED, 503, msg);
    return true;
}

/* ---------------------------------------------------------------- timers */

static double req_timeout(const sp_request_t *r, double per_request, double def)
{
    SP_UNUSED(r);
    return per_request > 0 ? per_request : def;
}

/* Inactivity timeouts (idle, tunnel, first byte) count from the last read; the others from
 * when they were set. */
static void on_up_timer(sp_deadline_t *d, int kind)
{
    sp_upconn_t *u = d->timer.data;
    switch (kind) {
    case UT_CONNECT: up_fail(u, SP_ERR_CONNECT_TIMEOUT, 504); break;
    case UT_FIRST_BYTE: up_fail(u, SP_ERR_FIRST_BYTE_TIMEOUT, 504); break;
    case UT_IDLE:
    case UT_TUNNEL: up_fail(u, SP_ERR_UPSTREAM_IDLE, 504); break;
    case UT_RETRY: up_connect_start(u); break;
    case UT_KEEPALIVE:
    default: sp_up_close(u); break;
    }
}

/* The connection's one timeout (base/deadline.h: armed lazily, no timer heap work per request
 * unless a deadline moves earlier). */
static void up_timer(sp_upconn_t *u, int kind, double secs)
{
    if (kind == UT_NONE)
        sp_deadline_clear(&u->dl);
    else
        sp_deadline_set(&u->dl, kind, secs,
                        kind == UT_IDLE || kind == UT_TUNNEL || kind == UT_FIRST_BYTE);
}

/* ---------------------------------------------------------------- connecting */

static void on_connect(uv_connect_t *cr, int status)
{
    sp_upconn_t *u = cr->data;
    if (u->closing)
        return;
    sp_request_t *r = u->req;
    if (!r) {
        sp_up_close(u);
        return;
    }
    if (status == 0) {
        u->state = US_ACTIVE;
        r->t_connected = uv_hrtime();
        if (r->t_forward && r->t_connected >= r->t_forward)
            sp_stat_observe(u->w->stats.upconnect, sp_upconnect_bounds_ns, SP_UPC_BUCKETS,
                            &u->w->stats.upconnect_sum_us, r->t_connected - r->t_forward);
        uv_tcp_nodelay(&u->tcp, 1);
        up_timer(u, UT_NONE, 0);
        up_send_head(u);
        return;
    }
    if (status == UV_ECONNREFUSED && r->connect_tries <= sp_cfg.connect_retries) {
        /* The sandbox may bind its port a moment after Ready: try again on a new socket
         * after connect_retry_delay, doubling each time (0.2, 0.4, 0.8 s by default). */
        double delay = sp_cfg.connect_retry_delay;
        for (int i = 1; i < r->connect_tries; i++)
            delay *= 2;
        sp_log(SP_LOG_DEBUG, "upstream connect refused: retrying", "s:upstream",
               r->upstream_addr, "i:try", (int64_t)r->connect_tries, "d:delay", delay, NULL);
        sp_upconn_t *n = up_new(u->w, u->key);
        up_detach(u);
        sp_up_close(u);
        up_attach(n, r);
        n->state = US_RETRY_WAIT;
        up_timer(n, UT_RETRY, delay);
        return;
    }
    sp_log(SP_LOG_DEBUG, "upstream connect failed", "s:upstream", r->upstream_addr, "s:error",
           uv_strerror(status), NULL);
    up_fail(u, SP_ERR_CONNECT, 502);
}

static void do_connect(sp_upconn_t *u, const struct sockaddr *sa)
{
    sp_request_t *r = u->req;
    r->connect_tries++;
    u->state = US_CONNECTING;
    u->creq.data = u;
    int rc = uv_tcp_connect(&u->creq, &u->tcp, sa, on_connect);
    if (rc < 0) {
        sp_log(SP_LOG_DEBUG, "upstream connect failed", "s:upstream", r->upstream_addr,
               "s:error", uv_strerror(rc), NULL);
        up_fail(u, SP_ERR_CONNECT, 502);
        return;
    }
    up_timer(u, UT_CONNECT, req_timeout(r, r->to_connect, sp_cfg.connect_timeout));
}

static void on_resolved(uv_getaddrinfo_t *gr, int status, struct addrinfo *res)
{
    sp_upconn_t *u = gr->data;
    bool closing = u->closing;
    up_unref(u); /* the lookup's; the handles still hold theirs unless it was closed */
    if (closing) {
        if (res)
            uv_freeaddrinfo(res);
        return;
    }
    u->state = US_NEW;
    if (status < 0 || !res || !u->req) {
        if (u->req)
            sp_log(SP_LOG_WARN, "upstream name resolution failed", "s:upstream",
                   u->req->upstream_addr, "s:error", uv_strerror(status), NULL);
        if (res)
            uv_freeaddrinfo(res);
        up_fail(u, SP_ERR_CONNECT, 502);
        return;
    }
    struct sockaddr_storage ss;
    sp_addr_with_port(res->ai_addr, res->ai_addrlen, u->key->port, &ss);
    uv_freeaddrinfo(res);
    if (up_refuse_address(u, (struct sockaddr *)&ss))
        return;
    do_connect(u, (struct sockaddr *)&ss);
}

static void up_connect_start(sp_upconn_t *u)
{
    struct sockaddr_storage ss;
    char host[256];
    if (sp_addr_literal(u->key->host, u->key->port, &ss, host)) {
        if (!up_refuse_address(u, (struct sockaddr *)&ss))
            do_connect(u, (struct sockaddr *)&ss);
        return;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    u->state = US_RESOLVING;
    u->gai.data = u;
    u->handles++;
    int rc = uv_getaddrinfo(&u->w->loop, &u->gai, on_resolved, host, NULL, &hints);
    if (rc < 0) {
        u->handles--;
        u->state = US_NEW;
        up_fail(u, SP_ERR_CONNECT, 502);
        return;
    }
    up_timer(u, UT_CONNECT, req_timeout(u->req, u->req->to_connect, sp_cfg.connect_timeout));
}

/* r->upstream_addr = "host:port" (host cut at 50 bytes), without printf on the hot path. */
static void format_upstream_addr(sp_request_t *r)
{
    size_t hl = strnlen(r->up_host, 50);
    memcpy(r->upstream_addr, r->up_host, hl);
    r->upstream_addr[hl] = ':';
    char tmp[8];
    size_t i = sizeof tmp;
    unsigned port = (unsigned)r->up_port;
    do {
        tmp[--i] = (char)('0' + port % 10);
        port /= 10;
    } while (port && i > 0);
    memcpy(r->upstream_addr + hl + 1, tmp + i, sizeof tmp - i);
    r->upstream_addr[hl + 1 + sizeof tmp - i] = '\0';
}

void sp_upstream_start(sp_request_t *r)
{
    sp_worker_t *w = r->w;
    r->up_tried = true;
    if (!r->t_forward)
        r->t_forward = uv_hrtime();
    format_upstream_addr(r);
    sp_upkey_t *k = sp_up_key_get(w, r->up_host, r->up_port);
    /* With batched writes the pool's quiet check (a recv with MSG_PEEK) is not made here but
     * right before the head goes out: batched with the sends when the head is staged, at once
     * when it is not (up_write). Bytes the loop reads first are caught in up_on_read. Either
     * way a connection that is not quiet is closed and the request retried on a fresh one. */
    sp_upconn_t *u = sp_up_idle_take(k, !w->wb);
    if (u) {
        u->unchecked = w->wb != NULL;
        u->state = US_ACTIVE;
        up_timer(u, UT_NONE, 0);
        /* It stays readable (as it was in the pool): stopping and restarting reads would cost
         * two epoll_ctl calls per request. Bytes before our head goes out are the response's. */
        u->reused = true;
        up_attach(u, r);
        r->t_connected = uv_hrtime();
        up_send_head(u);
        return;
    }
    u = up_new(w, k);
    up_attach(u, r);
    up_connect_start(u);
}

/* ---------------------------------------------------------------- writing upstream */

/* `batch`: a small write with nothing of the client's buffer in it may be staged
 * (http/wbatch.h); returns 2 then. */
static int up_write(sp_upconn_t *u, uv_buf_t *bufs, unsigned n, uv_write_cb cb, bool batch)
{
    size_t total = sp_bufs_total(bufs, n);
    u->wreq.data = u;
    if (batch && sp_wbatch_write(u->w->wb, &u->wreq, (uv_stream_t *)&u->tcp, bufs, n, total,
                                 cb, NULL, u->unchecked)) {
        u->writing = true;
        return 2;
    }
    if (u->unchecked) {
        u->unchecked = false;
        if (!sp_up_idle_quiet(u))
            return UV_ECONNRESET; /* stale: the caller retries on a fresh connection */
    }
    int w = uv_try_write((uv_stream_t *)&u->tcp, bufs, n);
    if (w == UV_EAGAIN || w == UV_ENOSYS)
        w = 0;
    if (w < 0)
        return w;
    if ((size_t)w == total)
        return 0;
    unsigned k = sp_bufs_consume(bufs, n, (size_t)w);
    int rc = uv_write(&u->wreq, (uv_stream_t *)&u->tcp, bufs + k, n - k, cb);
    if (rc < 0)
        return rc;
    u->writing = true;
    return 1;
}

static void up_read_start(sp_upconn_t *u);

/* A reused pooled connection failed before any response byte and nothing of the body went:
 * retry once on a fresh connection. Returns true if it did. */
static bool up_retry_stale(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    if (!r || !u->reused || u->got_bytes || r->body_forwarded > 0 || r->resp_head_sent)
        return false;
    sp_upconn_t *n = up_new(u->w, u->key);
    up_detach(u);
    sp_up_close(u);
    r->head_sent = false;
    up_attach(n, r);
    up_connect_start(n);
    return true;
}

static void after_head_sent(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    r->head_sent = true;
    if (r->body_in_head) {
        /* the body bytes that went with the head are delivered */
        for (unsigned i = 0; i < r->niov; i++)
            r->body_forwarded += r->iov[i].len;
        r->body_in_head = false;
        r->niov = 0;
    }
    up_timer(u, UT_FIRST_BYTE, req_timeout(r, r->to_first_byte, sp_cfg.first_byte_timeout));
    up_read_start(u);
    if (r->client)
        r->cops->resume_body(r); /* stream the body, if any */
}

static void on_head_written(uv_write_t *wr, int status)
{
    sp_upconn_t *u = wr->data;
    u->writing = false;
    u->unchecked = false;
    if (u->closing || !u->req)
        return;
    if (status == SP_WB_NOT_QUIET)
        sp_log(SP_LOG_WARN, "upstream sent bytes on an idle connection: closed", "s:upstream",
               u->key->host, "i:port", (int64_t)u->key->port, NULL);
    if (status < 0) {
        if (!up_retry_stale(u))
            up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return;
    }
    after_head_sent(u);
}

static void up_send_head(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    if (!r->out.len || !r->head_sent)
        sp_build_request_head(r);
    /* A body the script already read goes out with the head; so do the body bytes already
     * read from the client (one write instead of two for a small upload). They stay in the
     * client's read buffer until confirmed, so a retry on a fresh connection sends them again. */
    uv_buf_t b[1 + SP_MAX_IOV];
    unsigned nb = 0;
    r->up_sent = true; /* from here on the sandbox may see (part of) the request */
    b[nb++] = uv_buf_init(r->out.p, (unsigned)r->out.len);
    if (r->body_buffered) {
        if (r->body.len)
            b[nb++] = uv_buf_init(r->body.p, (unsigned)r->body.len);
    } else if (r->body_in_head || (r->client && r->cops->take_body(r) > 0)) {
        r->body_in_head = true;
        for (unsigned i = 0; i < r->niov; i++)
            b[nb++] = r->iov[i];
    }
    int rc = up_write(u, b, nb, on_head_written, nb == 1);
    if (rc != 0 && r->body_in_head && r->client)
        r->cops->hold_body(r); /* the buffer under the slices stays put (write, retry) */
    if (rc == 0) {
        after_head_sent(u);
    } else if (rc < 0) {
        if (!up_retry_stale(u))
            up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
    }
}

static void on_body_written(uv_write_t *wr, int status)
{
    sp_upconn_t *u = wr->data;
    u->writing = false;
    if (u->closing || !u->req)
        return;
    if (status < 0) {
        up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return;
    }
    sp_deadline_touch(&u->dl);
    if (u->req->client)
        u->req->cops->resume_body(u->req);
}

int sp_upstream_write_body(sp_request_t *r)
{
    sp_upconn_t *u = r->up;
    if (!u)
        return -1;
    for (unsigned i = 0; i < r->niov; i++)
        r->body_forwarded += r->iov[i].len;
    sp_deadline_touch(&u->dl);
    int rc = up_write(u, r->iov, r->niov, on_body_written, false);
    if (rc < 0) {
        up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return -1;
    }
    return rc;
}

static void on_tunnel_up_written(uv_write_t *wr, int status)
{
    sp_upconn_t *u = wr->data;
    u->writing = false;
    if (u->closing || !u->req)
        return;
    if (status < 0) {
        up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return;
    }
    if (u->req->client)
        u->req->cops->resume_body(u->req);
}

int sp_upstream_tunnel_write(sp_request_t *r, uv_buf_t *bufs, unsigned n)
{
    sp_upconn_t *u = r->up;
    if (!u)
        return -1;
    sp_deadline_touch(&u->dl);
    int rc = up_write(u, bufs, n, on_tunnel_up_written, false);
    if (rc < 0) {
        up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return -1;
    }
    return rc;
}

/* ---------------------------------------------------------------- the response */

static int rcb_message_begin(llhttp_t *p)
{
    sp_upconn_t *u = p->data;
    sp_request_t *r = u->req;
    r->resp_head.len = 0;
    r->nrhdrs = 0;
    r->rin_value = false;
    r->reason_len = 0;
    return 0;
}

static int resp_limit(sp_upconn_t *u, size_t add)
{
    sp_request_t *r = u->req;
    if (r->resp_head.len + add > (size_t)sp_cfg.max_upstream_header_size) {
        llhttp_set_error_reason(&u->parser, "response head too large");
        return HPE_USER;
    }
    return 0;
}

static int rcb_status(llhttp_t *p, const char *at, size_t len)
{
    sp_upconn_t *u = p->data;
    sp_request_t *r = u->req;
    if (resp_limit(u, len))
        return HPE_USER;
    /* RFC 9112 4: HTAB, SP, VCHAR and obs-text only; llhttp lets control bytes (NUL) through,
     * and the phrase is relayed to the client */
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)at[i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
            llhttp_set_error_reason(p, "control byte in the reason phrase");
            return HPE_USER;
        }
    }
    sp_buf_add(&r->resp_head, at, len);
    r->reason_len += (uint32_t)len;
    return 0;
}

static int rcb_header_field(llhttp_t *p, const char *at, size_t len)
{
    sp_upconn_t *u = p->data;
    if (resp_limit(u, len))
        return HPE_USER;
    sp_hdr_acc_t a = SP_RESP_HDRS(u->req);
    sp_hdrs_field(&a, &u->fold, at, len, UINT32_MAX); /* resp_limit bounds the count */
    return 0;
}

static int rcb_header_field_complete(llhttp_t *p)
{
    sp_upconn_t *u = p->data;
    sp_hdr_acc_t a = SP_RESP_HDRS(u->req);
    sp_hdrs_field_complete(&a);
    return 0;
}

static int rcb_header_value(llhttp_t *p, const char *at, size_t len)
{
    sp_upconn_t *u = p->data;
    if (resp_limit(u, len))
        return HPE_USER;
    /* obsolete line folding, in any form (sp_fold_value): refuse it (502) rather than pass a
     * folded header to the client */
    sp_hdr_acc_t a = SP_RESP_HDRS(u->req);
    if (!sp_hdrs_value(&a, &u->fold, at, len)) {
        llhttp_set_error_reason(p, "obsolete line folding in a response header");
        return HPE_USER;
    }
    return 0;
}

/* Response parse progress, kept in u->rflags between callbacks. */
#define RESP_HEAD_DONE 1
#define RESP_MSG_DONE 2
#define RESP_INTERIM 4

static int rcb_headers_complete(llhttp_t *p)
{
    sp_upconn_t *u = p->data;
    sp_request_t *r = u->req;
    int status = llhttp_get_status_code(p);
    size_t fl;
    if (sp_connection_lists_framing(r->resp_head.p, r->rhdrs, r->nrhdrs, &fl)) {
        /* dropping it while the body is framed by it would desynchronise the client */
        llhttp_set_error_reason(p, "Connection header lists a framing header");
        return -1;
    }
    /* RFC 9112 6.3: a 1xx, a 204, a 304 and a response to HEAD end at their header block,
     * whatever Content-Length or Transfer-Encoding they carry (return 1: no body). Bytes after
     * it are not theirs: the connection is then not reused (up_complete). */
    if (status >= 100 && status < 200 && status != 101) {
        u->rflags |= RESP_INTERIM; /* 100 Continue, 103 Early Hints: not forwarded */
        return 1;
    }
    u->rflags |= RESP_HEAD_DONE;
    r->resp_status = status;
    if (status == 101) {
        if (!r->upgrade) {
            llhttp_set_error_reason(p, "101 to a request that did not ask to upgrade");
            return -1;
        }
        return 2; /* no body; llhttp_execute returns HPE_PAUSED_UPGRADE */
    }
    if (r->method == HTTP_HEAD || status == 204 || status == 304)
        return 1; /* no body follows; the message completes at once */
    return HPE_PAUSED;
}

static int rcb_body(llhttp_t *p, const char *at, size_t len)
{
    sp_upconn_t *u = p->data;
    sp_request_t *r = u->req;
    if (r->resp_decode && r->niov < SP_MAX_IOV - 1)
        r->iov[r->niov++] = uv_buf_init((char *)at, (unsigned)len);
    return 0;
}

static int rcb_message_complete(llhttp_t *p)
{
    sp_upconn_t *u = p->data;
    if (u->rflags & RESP_INTERIM) {
        u->rflags = 0;
        return 0; /* the real response follows */
    }
    if (u->req->resp_status == 101)
        return 0; /* llhttp_execute returns HPE_PAUSED_UPGRADE: the tunnel starts */
    u->rflags |= RESP_MSG_DONE;
    return HPE_PAUSED;
}

static int rcb_chunk_header(llhttp_t *p)
{
    sp_upconn_t *u = p->data;
    /* In decode mode each chunk adds one iov: stop early to keep room. */
    if (u->req->resp_decode && u->req->niov + 2 >= SP_MAX_IOV)
        return HPE_PAUSED;
    return 0;
}

static const llhttp_settings_t response_settings = {
    .on_message_begin = rcb_message_begin,
    .on_status = rcb_status,
    .on_header_field = rcb_header_field,
    .on_header_field_complete = rcb_header_field_complete,
    .on_header_value = rcb_header_value,
    .on_headers_complete = rcb_headers_complete,
    .on_body = rcb_body,
    .on_chunk_header = rcb_chunk_header,
    .on_message_complete = rcb_message_complete,
};

static void mark_first_byte(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    r->t_first_byte = uv_hrtime();
    if (r->t_forward && r->t_first_byte >= r->t_forward)
        sp_stat_observe(u->w->stats.upfirst, sp_upfirst_bounds_ns, SP_UPF_BUCKETS,
                        &u->w->stats.upfirst_sum_us, r->t_first_byte - r->t_forward);
}

static void up_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    SP_UNUSED(suggested);
    sp_upconn_t *u = h->data;
    if (!u->req) {
        buf->base = idle_scratch;
        buf->len = sizeof idle_scratch;
        return;
    }
    if (u->pos == u->len && u->want_big && !u->big_buf && !u->req->cops->busy(u->req)) {
        /* A large body: the same bytes in fewer, larger reads and client writes (per MiB, the
         * kernel's fixed cost per call and per wake-up of the peers is what counts). The buffer
         * is empty and no write refers to it. */
        up_release_buf(u);
        u->buf = sp_pool_get(&u->w->upstream_body_bufs);
        u->cap = (uint32_t)u->w->upstream_body_bufs.block_size;
        u->big_buf = true;
    }
    if (!u->buf) {
        u->buf = sp_pool_get(&u->w->upstream_bufs);
        u->cap = (uint32_t)u->w->upstream_bufs.block_size;
        u->len = u->pos = 0;
    }
    if (u->pos == u->len && !(u->req->client && u->req->cops->busy(u->req)))
        u->pos = u->len = 0; /* else a client write still refers to the bytes before len */
    buf->base = u->buf + u->len;
    buf->len = u->cap - u->len;
}

static void up_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void up_read_start(sp_upconn_t *u)
{
    if (u->reading || u->closing)
        return;
    if (u->buf && u->len == u->cap && u->pos == 0)
        return;
    if (uv_read_start((uv_stream_t *)&u->tcp, up_alloc, up_on_read) == 0)
        u->reading = true;
}

static void up_read_stop(sp_upconn_t *u)
{
    if (!u->reading)
        return;
    uv_read_stop((uv_stream_t *)&u->tcp);
    u->reading = false;
}

/* The response is complete and written: pool or close the connection, finish the request. */
static void up_complete(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    bool keep = llhttp_should_keep_alive(&u->parser) && r->body_done && u->pos == u->len &&
                !r->tunnel && !u->closing && sp_cfg.upstream_keepalive > 0 &&
                !r->w->draining && u->key->nidle < (uint32_t)sp_cfg.upstream_keepalive;
    r->resp_done = true;
    up_detach(u);
    if (keep) {
        sp_upkey_t *k = u->key;
        u->state = US_IDLE;
        u->rflags = 0;
        u->nrequests++;
        up_release_buf(u);
        sp_up_idle_put(k, u);
        up_timer(u, UT_KEEPALIVE, sp_cfg.upstream_keepalive_timeout);
        up_read_start(u); /* to notice the sandbox closing it (a no-op if still reading) */
    } else {
        sp_up_close(u);
    }
    if (r->client)
        r->cops->finish(r);
}

void sp_upstream_client_written(sp_request_t *r)
{
    sp_upconn_t *u = r->up;
    if (!u)
        return;
    sp_deadline_touch(&u->dl);
    if (u->state != US_TUNNEL && (u->rflags & RESP_MSG_DONE)) {
        up_complete(u);
        return;
    }
    /* Bytes past u->pos were not parsed yet (a pause for iov room): they stay. */
    if (u->pos == u->len)
        u->pos = u->len = 0;
    up_process(u);
}

void sp_upstream_client_drained(sp_request_t *r)
{
    if (r->up)
        up_process(r->up);
}

/* Sends r->iov[0..niov) to the client (iov[0] is the response head when `head`). Returns true
 * if the caller may continue at once. */
static bool up_send_client(sp_upconn_t *u, bool head)
{
    sp_request_t *r = u->req;
    if (!r->client) {
        sp_up_close(u);
        return false;
    }
    if (r->niov == 0)
        return true;
    unsigned n = r->niov;
    r->niov = 0;
    int rc = r->cops->send(r, r->iov, n, head);
    if (rc == 0)
        return true;
    if (rc < 0)
        return false; /* the client side was closed, which aborted u */
    if (rc == 1)
        up_read_stop(u); /* a slow client: read on when it has taken these bytes */
    /* rc 2: staged, sent before the loop sleeps. Reads go on meanwhile (stopping and starting
     * them would cost two epoll_ctl calls); they append behind the bytes being sent (up_alloc)
     * and stop when the buffer is full. */
    return false;
}

static void start_tunnel(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    r->tunnel = true;
    r->resp_head_sent = true;
    atomic_fetch_add(&sp_open_tunnels, 1);
    r->w->tunnels_open++;
    u->state = US_TUNNEL;
    up_timer(u, UT_TUNNEL, req_timeout(r, r->to_idle, sp_cfg.tunnel_idle_timeout));
    r->cops->start_tunnel(r);
}

static void up_step(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    if (!r)
        return;
    if (!r->client) {
        sp_up_close(u);
        return;
    }
    if (r->cops->busy(r))
        return; /* continue when the client has taken the previous bytes */
    if (u->state == US_TUNNEL) {
        if (u->pos == u->len) {
            u->pos = u->len = 0;
            up_read_start(u);
            return;
        }
        r->iov[0] = uv_buf_init(u->buf + u->pos, u->len - u->pos);
        r->niov = 1;
        u->pos = u->len;
        if (up_send_client(u, false)) {
            u->pos = u->len = 0;
            up_read_start(u);
        }
        return;
    }
    if (u->pos == u->len) {
        u->pos = u->len = 0;
        up_read_start(u);
        return;
    }
    r->niov = 0;
    bool head_now = false;
    if (!(u->rflags & RESP_HEAD_DONE)) {
        const char *start = u->buf + u->pos;
        sp_fold_run(&u->fold, start);
        llhttp_errno_t e = llhttp_execute(&u->parser, start, u->len - u->pos);
        if (e == HPE_OK) {
            sp_fold_skip(&u->fold, u->buf + u->len); /* a fold may continue in the next read */
            u->pos = u->len;
            up_read_start(u);
            return;
        }
        if (e == HPE_PAUSED_UPGRADE && r->resp_status == 101 && r->upgrade) {
            u->pos = (uint32_t)(llhttp_get_error_pos(&u->parser) - u->buf);
            mark_first_byte(u);
            sp_build_response_head(u);
            r->iov[r->niov++] = uv_buf_init(r->out.p, (unsigned)r->out.len);
            if (u->pos < u->len) {
                r->iov[r->niov++] = uv_buf_init(u->buf + u->pos, u->len - u->pos);
                u->pos = u->len;
            }
            start_tunnel(u);
            if (up_send_client(u, true)) {
                u->pos = u->len = 0;
                up_read_start(u);
            }
            return;
        }
        if (e != HPE_PAUSED) {
            sp_log(SP_LOG_WARN, "bad upstream response", "s:upstream", r->upstream_addr,
                   "s:error", llhttp_errno_name(e), "s:reason",
                   llhttp_get_error_reason(&u->parser), NULL);
            up_fail(u, SP_ERR_UPSTREAM_PROTOCOL, 502);
            return;
        }
        u->pos = (uint32_t)(llhttp_get_error_pos(&u->parser) - u->buf);
        llhttp_resume(&u->parser);
        if (!(u->rflags & RESP_HEAD_DONE)) {
            u->process_again = true; /* an interim (1xx) response was skipped */
            return;
        }
        mark_first_byte(u);
        sp_build_response_head(u);
        r->resp_head_sent = true;
        r->iov[r->niov++] = uv_buf_init(r->out.p, (unsigned)r->out.len);
        head_now = true;
        up_timer(u, UT_IDLE, req_timeout(r, r->to_idle, sp_cfg.upstream_idle_timeout));
    }
    if (!(u->rflags & RESP_MSG_DONE)) {
        /* Runs even with no bytes left: a bodyless response completes on an empty run. */
        const char *start = u->buf + u->pos;
        unsigned before = r->niov;
        sp_fold_run(&u->fold, start);
        llhttp_errno_t e = llhttp_execute(&u->parser, start, u->len - u->pos);
        const char *end = u->buf + u->len;
        if (e == HPE_PAUSED) {
            end = llhttp_get_error_pos(&u->parser);
            llhttp_resume(&u->parser);
        } else if (e != HPE_OK) {
            sp_log(SP_LOG_WARN, "bad upstream response body", "s:upstream", r->upstream_addr,
                   "s:error", llhttp_errno_name(e), NULL);
            if (head_now)
                r->resp_head_sent = false; /* nothing went to the client yet: answer 502 */
            up_fail(u, SP_ERR_UPSTREAM_PROTOCOL, 502);
            return;
        }
        if (!r->resp_decode && end > start) {
            r->niov = before;
            r->iov[r->niov++] = uv_buf_init((char *)start, (unsigned)(end - start));
        }
        u->pos = (uint32_t)(end - u->buf);
    }
    bool done = (u->rflags & RESP_MSG_DONE) != 0;
    /* A large body (its Content-Length says more than this buffer holds, or a read filled the
     * buffer and the body goes on): read the rest into a body buffer (up_alloc takes it once
     * this one is empty). */
    if (!done && !u->big_buf && r->cops != &sp_h2_client_ops &&
        sp_cfg.upstream_body_buffer_size > sp_cfg.upstream_buffer_size &&
        (u->len == u->cap || (!(u->parser.flags & F_CHUNKED) &&
                              (u->parser.flags & F_CONTENT_LENGTH) &&
                              u->parser.content_length > u->cap)))
        u->want_big = true;
    if (!up_send_client(u, head_now))
        return;
    if (done) {
        up_complete(u);
        return;
    }
    if (u->pos == u->len) {
        u->pos = u->len = 0;
        up_read_start(u);
    } else {
        u->process_again = true;
    }
}

static void up_process(sp_upconn_t *u)
{
    if (u->in_process) {
        u->process_again = true;
        return;
    }
    u->in_process = true;
    do {
        u->process_again = false;
        if (u->closing)
            break;
        up_step(u);
    } while (u->process_again && !u->closing);
    u->in_process = false;
}

static void up_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    SP_UNUSED(buf);
    sp_upconn_t *u = s->data;
    if (u->closing || nread == 0)
        return;
    sp_request_t *r = u->req;
    if (!r) {
        /* idle pooled connection: the sandbox closed it or sent stray bytes (never a response
         * to keep for the next request: the connection is not reused) */
        if (nread > 0)
            sp_log(SP_LOG_WARN, "upstream sent bytes on an idle connection: closed",
                   "s:upstream", u->key->host, "i:port", (int64_t)u->key->port, NULL);
        sp_up_close(u);
        return;
    }
    if (nread == UV_ENOBUFS) {
        /* the buffer is full of bytes a staged client write still refers to (up_alloc):
         * reads resume once the client has taken them (sp_upstream_client_written) */
        up_read_stop(u);
        return;
    }
    if (u->unchecked && nread > 0) {
        /* Bytes before our request head went out (it is still staged): sent unasked on the
         * idle connection, not a response. As the pool's quiet check would have: closed. */
        sp_log(SP_LOG_WARN, "upstream sent bytes on an idle connection: closed", "s:upstream",
               u->key->host, "i:port", (int64_t)u->key->port, NULL);
        if (!up_retry_stale(u))
            up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return;
    }
    if (nread < 0) {
        up_read_stop(u);
        if (u->state == US_TUNNEL) {
            if (r->client)
                r->cops->close(r);
            else
                sp_up_close(u);
            return;
        }
        if (up_retry_stale(u))
            return;
        if ((u->rflags & RESP_HEAD_DONE) && !(u->rflags & RESP_MSG_DONE) &&
            llhttp_message_needs_eof(&u->parser)) {
            /* a body delimited by the end of the connection is complete */
            u->rflags |= RESP_MSG_DONE;
            r->close_client = true;
            if (r->client && !r->cops->busy(r))
                up_complete(u);
            return; /* else sp_upstream_client_written completes it */
        }
        up_fail(u, SP_ERR_UPSTREAM_CLOSED, 502);
        return;
    }
    u->len += (uint32_t)nread;
    u->got_bytes = true;
    sp_deadline_touch(&u->dl);
    if (u->len == u->cap)
        up_read_stop(u);
    up_process(u);
}

void sp_upstream_abort(sp_request_t *r)
{
    sp_upconn_t *u = r->up;
    if (!u)
        return;
    sp_up_close(u);
}
