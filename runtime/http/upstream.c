/*
 * upstream.c: connections to sandboxes. Per worker, a keep-alive pool per host:port; connect
 * with retries of refused connects; the upstream request head (hop-by-hop headers removed,
 * X-Forwarded-* added, the script's header edits applied); the response parsed with llhttp
 * and streamed to the client as it arrives with backpressure (one read buffer per direction,
 * never more); 101 responses turned into a raw tunnel. Failures map to 502/504 before the
 * response head is sent, and to a closed client connection after it.
 */
#include "http/http.h"
#include "http/worker.h"
#include "base/config.h"
#include "base/log.h"
#include "base/netaddr.h"
#include "http/trace.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

enum { US_NEW, US_RETRY_WAIT, US_RESOLVING, US_CONNECTING, US_ACTIVE, US_TUNNEL, US_IDLE };
enum { UT_NONE, UT_CONNECT, UT_FIRST_BYTE, UT_IDLE, UT_RETRY, UT_KEEPALIVE, UT_TUNNEL };

typedef struct sp_upkey {
    char host[256];
    int port;
    uint64_t hash;
    sp_upconn_t *idle;
    uint32_t nidle;
    struct sp_upkey *next;
} sp_upkey_t;

static char idle_scratch[64]; /* reads on idle pooled connections are discarded */

static void up_process(sp_upconn_t *u);
static void up_close(sp_upconn_t *u);
static void up_connect_start(sp_upconn_t *u);
static void up_send_head(sp_upconn_t *u);
static void up_timer(sp_upconn_t *u, int kind, double secs);
static void on_up_timer(sp_deadline_t *d, int kind);

/* ---------------------------------------------------------------- pool keys */

static uint64_t key_hash(const char *h, int port)
{
    return sp_hash_more(SP_HASH_INIT ^ (uint64_t)port, h, strlen(h));
}

static sp_upkey_t *key_get(sp_worker_t *w, const char *host, int port)
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

static void idle_unlink(sp_upconn_t *u)
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

void sp_upstream_close_idle(sp_worker_t *w)
{
    if (!w->upkeys)
        return;
    for (uint32_t i = 0; i < w->nupkeys_cap; i++)
        for (sp_upkey_t *k = w->upkeys[i]; k; k = k->next)
            while (k->idle) {
                sp_upconn_t *u = k->idle;
                idle_unlink(u);
                up_close(u);
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

/* ---------------------------------------------------------------- lifecycle */

static void on_up_handle_closed(uv_handle_t *h)
{
    sp_upconn_t *u = h->data;
    if (--u->handles > 0)
        return;
    if (u->buf)
        sp_pool_put(&u->w->upstream_bufs, u->buf);
    free(u);
}

static void up_release_buf(sp_upconn_t *u)
{
    if (u->buf) {
        sp_pool_put(&u->w->upstream_bufs, u->buf);
        u->buf = NULL;
    }
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

static void up_close(sp_upconn_t *u)
{
    if (u->closing)
        return;
    u->closing = true;
    up_detach(u);
    if (u->state == US_IDLE && u->key && (u->prev || u->next || u->key->idle == u))
        idle_unlink(u);
    if (u->state == US_RESOLVING)
        uv_cancel((uv_req_t *)&u->gai); /* its callback still runs and drops the last ref */
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
    up_close(u);
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
    default: up_close(u); break;
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
        up_close(u);
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
        up_close(u);
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
    if (u->closing) {
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
    memcpy(&ss, res->ai_addr, res->ai_addrlen);
    uv_freeaddrinfo(res);
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)u->key->port);
    else
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)u->key->port);
    if (up_refuse_address(u, (struct sockaddr *)&ss))
        return;
    do_connect(u, (struct sockaddr *)&ss);
}

static void up_connect_start(sp_upconn_t *u)
{
    sp_upkey_t *k = u->key;
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    const char *host = k->host;
    char unbr[256];
    size_t hl = strlen(host);
    if (hl > 2 && host[0] == '[' && host[hl - 1] == ']') {
        snprintf(unbr, sizeof unbr, "%.*s", (int)(hl - 2), host + 1);
        host = unbr;
    }
    if (uv_ip4_addr(host, k->port, &a4) == 0) {
        if (!up_refuse_address(u, (struct sockaddr *)&a4))
            do_connect(u, (struct sockaddr *)&a4);
        return;
    }
    if (uv_ip6_addr(host, k->port, &a6) == 0) {
        if (!up_refuse_address(u, (struct sockaddr *)&a6))
            do_connect(u, (struct sockaddr *)&a6);
        return;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    u->state = US_RESOLVING;
    u->gai.data = u;
    int rc = uv_getaddrinfo(&u->w->loop, &u->gai, on_resolved, host, NULL, &hints);
    if (rc < 0) {
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

/* True if nothing arrived on an idle pooled connection. Its reads are on (up_on_read closes it
 * at the first byte or at EOF), but bytes that came in this loop iteration are not read yet:
 * whatever the sandbox sent unasked would be taken as the next request's response. */
static bool idle_quiet(sp_upconn_t *u)
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

void sp_upstream_start(sp_request_t *r)
{
    sp_worker_t *w = r->w;
    r->up_tried = true;
    if (!r->t_forward)
        r->t_forward = uv_hrtime();
    format_upstream_addr(r);
    sp_upkey_t *k = key_get(w, r->up_host, r->up_port);
    while (k->idle) {
        sp_upconn_t *u = k->idle;
        idle_unlink(u);
        if (!idle_quiet(u)) {
            up_close(u);
            continue;
        }
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
    sp_upconn_t *u = up_new(w, k);
    up_attach(u, r);
    up_connect_start(u);
}

/* ---------------------------------------------------------------- the request head */

static bool is_hop_by_hop(const char *n, size_t l)
{
    switch (l) {
    case 2: return sp_ieq(n, l, "te");
    case 7: return sp_ieq(n, l, "trailer") || sp_ieq(n, l, "upgrade");
    case 10: return sp_ieq(n, l, "connection") || sp_ieq(n, l, "keep-alive");
    case 16: return sp_ieq(n, l, "proxy-connection");
    case 17: return sp_ieq(n, l, "transfer-encoding");
    default: return false;
    }
}

/* True if `name` is listed in any Connection header of hdrs[0..n) (so it is hop-by-hop too).
 * A framing header is never dropped this way (a message that lists one is refused before). */
static bool listed_in_connection(bool any, const char *base, const sp_hdr_t *hdrs, uint32_t n,
                                 const char *name, size_t l)
{
    if (!any || sp_framing_header(name, l))
        return false;
    for (uint32_t i = 0; i < n; i++) {
        if (hdrs[i].name_len != 10 || !sp_ieq(base + hdrs[i].name_off, 10, "connection"))
            continue;
        const char *v = base + hdrs[i].value_off, *t;
        size_t pos = 0, tl;
        while ((tl = sp_next_token(v, hdrs[i].value_len, &pos, &t)) > 0)
            if (tl == l && strncasecmp(t, name, l) == 0)
                return true;
    }
    return false;
}

/* False when every Connection header lists nothing but "keep-alive" and "close" (the usual
 * case): those name no header that is not already hop-by-hop ("Keep-Alive" is), so no header
 * needs to be looked up in them. */
static bool connection_names(const char *base, const sp_hdr_t *hdrs, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        if (hdrs[i].name_len != 10 || !sp_ieq(base + hdrs[i].name_off, 10, "connection"))
            continue;
        const char *v = base + hdrs[i].value_off, *t;
        size_t pos = 0, tl;
        while ((tl = sp_next_token(v, hdrs[i].value_len, &pos, &t)) > 0)
            if (!sp_ieq(t, tl, "keep-alive") && !sp_ieq(t, tl, "close"))
                return true;
    }
    return false;
}

static bool edited(const sp_request_t *r, const char *n, size_t l)
{
    size_t i = 0;
    while (i < r->extra.len) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        const char *val = name + nlen + 1;
        if ((op == '-' || op == '=') && nlen == l && strncasecmp(name, n, l) == 0)
            return true;
        i += 1 + nlen + 1 + strlen(val) + 1;
    }
    return false;
}

static void build_request_head(sp_request_t *r)
{
    sp_buf_t *o = &r->out;
    o->len = 0;
    const char *m = llhttp_method_name((llhttp_method_t)r->method);
    sp_buf_adds(o, m);
    sp_buf_addc(o, ' ');
    sp_buf_add(o, r->up_path.p, r->up_path.len);
    sp_buf_lit(o, " HTTP/1.1\r\n");
    size_t xfflen = 0, hostlen = 0, uplen = 0;
    bool conn = connection_names(r->head.p, r->hdrs, r->nhdrs);
    const char *xff = sp_request_header(r, "x-forwarded-for", 15, &xfflen);
    const char *host = sp_request_header(r, "host", 4, &hostlen);
    const char *upg = r->upgrade ? sp_request_header(r, "upgrade", 7, &uplen) : NULL;
    /* a script that set or removed traceparent itself (req:set_header / remove_header) wins */
    bool trace = sp_cfg.trace_propagation && !(r->header_edits && edited(r, "traceparent", 11));
    if (trace)
        sp_trace_ensure(r);
    for (uint32_t i = 0; i < r->nhdrs; i++) {
        const sp_hdr_t *h = &r->hdrs[i];
        const char *n = r->head.p + h->name_off;
        size_t l = h->name_len;
        if (is_hop_by_hop(n, l) || listed_in_connection(conn, r->head.p, r->hdrs, r->nhdrs, n, l))
            continue;
        /* ours replaces the client's traceparent; its tracestate goes on only with a valid one */
        if (trace && ((l == 11 && sp_ieq(n, l, "traceparent")) ||
                      (l == 10 && !r->trace_has_parent && sp_ieq(n, l, "tracestate"))))
            continue;
        if ((l == 15 && (sp_ieq(n, l, "x-forwarded-for"))) ||
            (l == 17 && sp_ieq(n, l, "x-forwarded-proto")) ||
            (l == 16 && sp_ieq(n, l, "x-forwarded-host")) || (l == 12 && sp_ieq(n, l, "x-request-id")) ||
            (l == 6 && sp_ieq(n, l, "expect")))
            continue;
        if ((r->chunked || r->body_buffered) && l == 14 && sp_ieq(n, l, "content-length"))
            continue;
        if (r->header_edits && edited(r, n, l))
            continue;
        sp_buf_add(o, n, l);
        sp_buf_lit(o, ": ");
        sp_buf_add(o, r->head.p + h->value_off, h->value_len);
        sp_buf_lit(o, "\r\n");
    }
    sp_buf_lit(o, "X-Forwarded-For: ");
    if (xff && xfflen) {
        sp_buf_add(o, xff, xfflen);
        sp_buf_lit(o, ", ");
    }
    sp_buf_adds(o, r->client_ip[0] ? r->client_ip : "unknown");
    sp_buf_lit(o, "\r\nX-Forwarded-Proto: http\r\n");
    if (host) {
        sp_buf_lit(o, "X-Forwarded-Host: ");
        sp_buf_add(o, host, hostlen);
        sp_buf_lit(o, "\r\n");
    }
    sp_buf_lit(o, "X-Request-Id: ");
    sp_buf_add(o, r->id, r->id_len);
    sp_buf_lit(o, "\r\n");
    if (trace)
        sp_trace_write_header(r, o);
    size_t i = 0;
    while (i < r->extra.len) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        const char *val = name + nlen + 1;
        size_t vlen = strlen(val);
        if (op == '+' || op == '=') {
            sp_buf_add(o, name, nlen);
            sp_buf_lit(o, ": ");
            sp_buf_add(o, val, vlen);
            sp_buf_lit(o, "\r\n");
        }
        i += 1 + nlen + 1 + vlen + 1;
    }
    if (r->body_buffered) {
        sp_buf_lit(o, "Content-Length: "); /* the script read it */
        sp_buf_addu(o, r->body.len);
        sp_buf_lit(o, "\r\n");
    } else if (r->chunked)
        sp_buf_lit(o, "Transfer-Encoding: chunked\r\n");
    if (upg) {
        sp_buf_lit(o, "Connection: upgrade\r\nUpgrade: ");
        sp_buf_add(o, upg, uplen);
        sp_buf_lit(o, "\r\n");
    }
    sp_buf_lit(o, "\r\n");
}

/* ---------------------------------------------------------------- writing upstream */

static int up_write(sp_upconn_t *u, uv_buf_t *bufs, unsigned n, uv_write_cb cb)
{
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += bufs[i].len;
    int w = uv_try_write((uv_stream_t *)&u->tcp, bufs, n);
    if (w == UV_EAGAIN || w == UV_ENOSYS)
        w = 0;
    if (w < 0)
        return w;
    if ((size_t)w == total)
        return 0;
    size_t skip = (size_t)w;
    unsigned k = 0;
    while (k < n && skip >= bufs[k].len) {
        skip -= bufs[k].len;
        k++;
    }
    if (k < n && skip) {
        bufs[k].base += skip;
        bufs[k].len -= skip;
    }
    u->wreq.data = u;
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
    up_close(u);
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
    if (u->closing || !u->req)
        return;
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
        build_request_head(r);
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
    int rc = up_write(u, b, nb, on_head_written);
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
    int rc = up_write(u, r->iov, r->niov, on_body_written);
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
    int rc = up_write(u, bufs, n, on_tunnel_up_written);
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

/* ---------------------------------------------------------------- response prefix
 * req:set_response_prefix(P) (path routing in strip mode): the sandbox answers as if it were
 * served at "/", so its Location and Set-Cookie Path are put back under P. Headers only, never
 * a body; nothing here runs unless the script asked. */

const char *sp_request_response_prefix(const sp_request_t *r, size_t *plen)
{
    if (!r->resp_prefix)
        return NULL;
    const char *found = NULL;
    size_t i = 0;
    while (i < r->extra.len) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        const char *val = name + nlen + 1;
        size_t vlen = strlen(val);
        if (op == 'P') {
            found = val;
            *plen = vlen;
        }
        i += 1 + nlen + 1 + vlen + 1;
    }
    return found;
}

/* True when path p is already under the prefix: equal to it, or it followed by '/', '?', '#'. */
static bool under_prefix(const char *p, size_t l, const char *pre, size_t pl)
{
    return l >= pl && memcmp(p, pre, pl) == 0 &&
           (l == pl || p[pl] == '/' || p[pl] == '?' || p[pl] == '#');
}

/* Location: a path-absolute reference ("/x"; not "//host") or an absolute http(s) URL whose
 * authority is the request's own Host gets the prefix in front of its path. False: relay the
 * value as it is (relative references resolve under the prefix by themselves). */
static bool emit_location(const sp_request_t *r, sp_buf_t *o, const char *v, size_t vl,
                          const char *pre, size_t pl)
{
    size_t at;
    if (vl >= 1 && v[0] == '/') {
        if (vl >= 2 && (v[1] == '/' || v[1] == '\\'))
            return false;
        at = 0;
    } else {
        size_t s = (vl > 7 && strncasecmp(v, "http://", 7) == 0)    ? 7
                   : (vl > 8 && strncasecmp(v, "https://", 8) == 0) ? 8
                                                                   : 0;
        if (!s)
            return false;
        size_t e = s;
        while (e < vl && v[e] != '/' && v[e] != '?' && v[e] != '#')
            e++;
        size_t hl = 0;
        const char *host = sp_request_header(r, "host", 4, &hl);
        if (!host || hl != e - s || strncasecmp(host, v + s, hl) != 0)
            return false;
        at = e;
    }
    if (under_prefix(v + at, vl - at, pre, pl))
        return false;
    sp_buf_add(o, v, at);
    sp_buf_add(o, pre, pl);
    if (at == vl || v[at] != '/')
        sp_buf_addc(o, '/');
    sp_buf_add(o, v + at, vl - at);
    return true;
}

static bool is_ows(char c) { return c == ' ' || c == '\t'; }

/* Set-Cookie: every Path attribute that starts with '/' and is not under the prefix gets it
 * in front ("Path=/" becomes "Path=<prefix>"); the rest of the value is relayed as it is. */
static void emit_set_cookie(sp_buf_t *o, const char *v, size_t vl, const char *pre, size_t pl)
{
    size_t done = 0, i = 0;
    const char *semi;
    while (i < vl && (semi = memchr(v + i, ';', vl - i)) != NULL) {
        size_t a = (size_t)(semi - v) + 1;
        while (a < vl && is_ows(v[a]))
            a++;
        size_t end = a;
        while (end < vl && v[end] != ';')
            end++;
        i = end;
        if (end - a < 5 || strncasecmp(v + a, "path", 4) != 0)
            continue;
        size_t k = a + 4;
        while (k < end && is_ows(v[k]))
            k++;
        if (k == end || v[k] != '=')
            continue;
        k++;
        while (k < end && is_ows(v[k]))
            k++;
        size_t ve = end;
        while (ve > k && is_ows(v[ve - 1]))
            ve--;
        if (ve == k || v[k] != '/' || under_prefix(v + k, ve - k, pre, pl))
            continue;
        sp_buf_add(o, v + done, k - done);
        sp_buf_add(o, pre, pl);
        if (ve - k > 1)
            sp_buf_add(o, v + k, ve - k);
        done = ve;
    }
    sp_buf_add(o, v + done, vl - done);
}

void sp_response_header_value(const sp_request_t *r, const char *pre, size_t plen, const char *n,
                              size_t l, const char *v, size_t vl, sp_buf_t *o)
{
    if (pre && l == 10 && sp_ieq(n, l, "set-cookie"))
        emit_set_cookie(o, v, vl, pre, plen);
    else if (!(pre && l == 8 && sp_ieq(n, l, "location") && emit_location(r, o, v, vl, pre, plen)))
        sp_buf_add(o, v, vl);
}

/* Builds the client's response head from the parsed upstream head into r->out. */
/* The final response head (or a 101) is in: the time to first byte, in the record and in the
 * upstream_first_byte histogram (from the moment forwarding began). */
static void mark_first_byte(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    r->t_first_byte = uv_hrtime();
    if (r->t_forward && r->t_first_byte >= r->t_forward)
        sp_stat_observe(u->w->stats.upfirst, sp_upfirst_bounds_ns, SP_UPF_BUCKETS,
                        &u->w->stats.upfirst_sum_us, r->t_first_byte - r->t_forward);
}

static void build_response_head(sp_upconn_t *u)
{
    sp_request_t *r = u->req;
    sp_buf_t *o = &r->out;
    o->len = 0;
    bool chunked = (u->parser.flags & F_CHUNKED) != 0;
    bool client10 = r->vmajor == 1 && r->vminor == 0;
    bool upgrade = r->resp_status == 101;
    bool bodyless = r->method == HTTP_HEAD || r->resp_status == 204 || r->resp_status == 304 ||
                    upgrade;
    if (!bodyless && chunked && (client10 || r->vmajor == 2))
        r->resp_decode = true; /* HTTP/1.0 and HTTP/2 clients get the body without chunking */
    if (!bodyless && llhttp_message_needs_eof(&u->parser))
        r->close_client = true;
    /* Say "Connection: close" whenever the client connection will end after this exchange:
     * the request cap, a drain, or a request body still unread when the answer comes. */
    if (r->resp_decode || !r->keepalive || r->w->draining ||
        (r->client && r->cops->last_exchange(r)) || (r->has_body && !r->body_done))
        r->close_client = true;
    if (upgrade)
        r->close_client = false;
    sp_buf_lit(o, "HTTP/1.1 ");
    sp_buf_addu(o, (uint64_t)r->resp_status);
    sp_buf_addc(o, ' ');
    if (r->reason_len)
        sp_buf_add(o, r->resp_head.p, r->reason_len);
    else
        sp_buf_adds(o, sp_status_reason(r->resp_status));
    sp_buf_lit(o, "\r\n");
    size_t uplen = 0;
    const char *upg = NULL;
    bool conn = connection_names(r->resp_head.p, r->rhdrs, r->nrhdrs);
    for (uint32_t i = 0; i < r->nrhdrs; i++) {
        const sp_hdr_t *h = &r->rhdrs[i];
        if (sp_ieq(r->resp_head.p + h->name_off, h->name_len, "upgrade")) {
            upg = r->resp_head.p + h->value_off;
            uplen = h->value_len;
        }
    }
    /* RFC 9112 6.1, 6.2: no Content-Length (nor Transfer-Encoding) on a 204; a 304 and a
     * response to HEAD keep their Content-Length (it describes the body a GET would get). */
    bool no_length = r->resp_decode || r->resp_status == 204;
    size_t plen = 0;
    const char *pre = sp_request_response_prefix(r, &plen);
    for (uint32_t i = 0; i < r->nrhdrs; i++) {
        const sp_hdr_t *h = &r->rhdrs[i];
        const char *n = r->resp_head.p + h->name_off;
        size_t l = h->name_len;
        if (is_hop_by_hop(n, l) ||
            listed_in_connection(conn, r->resp_head.p, r->rhdrs, r->nrhdrs, n, l))
            continue;
        if (no_length && sp_ieq(n, l, "content-length"))
            continue;
        if (l == 12 && sp_ieq(n, l, "x-request-id"))
            continue; /* ours is added below: one id per exchange */
        sp_buf_add(o, n, l);
        sp_buf_lit(o, ": ");
        sp_response_header_value(r, pre, plen, n, l, r->resp_head.p + h->value_off, h->value_len, o);
        sp_buf_lit(o, "\r\n");
    }
    if (upgrade) {
        sp_buf_lit(o, "Connection: upgrade\r\n");
        if (upg) {
            sp_buf_lit(o, "Upgrade: ");
            sp_buf_add(o, upg, uplen);
            sp_buf_lit(o, "\r\n");
        }
    } else if (chunked && !r->resp_decode && r->resp_status != 204) {
        sp_buf_lit(o, "Transfer-Encoding: chunked\r\n");
    }
    sp_buf_lit(o, "X-Request-Id: ");
    sp_buf_add(o, r->id, r->id_len);
    sp_buf_lit(o, "\r\n");
    sp_request_emit_response_headers(r, o); /* the script's additions (req:add_response_header) */
    if (!upgrade) {
        if (r->close_client)
            sp_buf_lit(o, "Connection: close\r\n");
        else if (client10)
            sp_buf_lit(o, "Connection: keep-alive\r\n");
    }
    sp_buf_lit(o, "\r\n");
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
    if (!u->buf) {
        u->buf = sp_pool_get(&u->w->upstream_bufs);
        u->cap = (uint32_t)u->w->upstream_bufs.block_size;
        u->len = u->pos = 0;
    }
    if (u->pos == u->len)
        u->pos = u->len = 0;
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
        u->next = k->idle;
        u->prev = NULL;
        if (k->idle)
            k->idle->prev = u;
        k->idle = u;
        k->nidle++;
        up_timer(u, UT_KEEPALIVE, sp_cfg.upstream_keepalive_timeout);
        up_read_start(u); /* to notice the sandbox closing it (a no-op if still reading) */
    } else {
        up_close(u);
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
        up_close(u);
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
    up_read_stop(u);
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
        up_close(u);
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
            build_response_head(u);
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
        build_response_head(u);
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
        up_close(u);
        return;
    }
    if (nread < 0) {
        up_read_stop(u);
        if (u->state == US_TUNNEL) {
            if (r->client)
                r->cops->close(r);
            else
                up_close(u);
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
    up_close(u);
}
