/*
 * server.c: client connections (HTTP/1). Accepts, parses requests with llhttp (strict mode),
 * enforces the client-side limits and timeouts, hands each parsed head to the scripting layer
 * through the worker's hooks, writes local responses (built in request.c), streams request
 * bodies towards upstream.c, answers pipelined requests in order and closes connections
 * gracefully. What a request slot holds and what scripts do to it is request.c's; the count of
 * connections per address conn_limit.c's. It does not decide anything about routing and does
 * not talk to upstreams itself (upstream.c does).
 */
#include "http/http.h"
#include "http/worker.h"
#include "http/trace.h"
#include "http/wbatch.h"
#include "http/server_int.h"
#include "base/config.h"
#include "base/log.h"
#include "base/netaddr.h"
#include "state/shdict.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>

enum {
    CS_IDLE,      /* between requests */
    CS_HEAD,      /* reading a request head */
    CS_SCRIPT,    /* the script is deciding */
    CS_READ_BODY, /* the script is waiting for the whole body (req:read_body) */
    CS_RESPOND,   /* writing a local response */
    CS_DISCARD,   /* reading and dropping the rest of a body after a local response */
    CS_UPSTREAM,  /* forwarding (upstream.c drives the response) */
    CS_TUNNEL,    /* upgraded: raw bytes both ways */
    CS_LINGER,    /* response sent, waiting for the client to close */
    CS_H2,        /* HTTP/2: h2.c owns the connection's bytes */
};

enum { T_NONE, T_HEADER, T_KEEPALIVE, T_BODY, T_SEND, T_LINGER };

atomic_int sp_open_connections;
atomic_int sp_open_tunnels;

const double sp_latency_bounds[SP_LAT_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                  0.25,  0.5,    1,     2.5,  5,     10};
#define MS(x) ((uint64_t)((x) * 1000000.0))
/* connect: a pod network connect takes well under a millisecond; refused-connect retries add
 * 0.2, 0.4, 0.8 s; connect_timeout is 5 s */
const uint64_t sp_upconnect_bounds_ns[SP_UPC_BUCKETS] = {
    MS(0.25), MS(0.5), MS(1), MS(2.5), MS(5), MS(10), MS(25), MS(50), MS(100), MS(250), MS(500),
    MS(1000), MS(2500), MS(5000)};
/* first byte: the request durations' bounds, then up to first_byte_timeout (180 s): a command
 * may run for minutes before its answer */
const uint64_t sp_upfirst_bounds_ns[SP_UPF_BUCKETS] = {
    MS(1),    MS(2.5),   MS(5),     MS(10),    MS(25),    MS(50),    MS(100),   MS(250),
    MS(500),  MS(1000),  MS(2500),  MS(5000),  MS(10000), MS(30000), MS(60000), MS(180000)};
#undef MS
const char *const sp_method_names[SP_M_COUNT] = {"GET",   "HEAD",   "POST",    "PUT",
                                                 "PATCH", "DELETE", "OPTIONS", "OTHER"};

const char *const sp_error_names[] = {
    "", "upstream connect failed", "upstream connect timeout", "upstream first byte timeout",
    "upstream idle timeout", "upstream closed connection", "upstream protocol error",
    "client aborted", "client timeout", "script error", "request body too large", "draining",
    "sandbox address refused",
};

static void conn_process(sp_conn_t *c);
static void conn_linger_close(sp_conn_t *c);
static void conn_timer(sp_conn_t *c, int kind, double secs);

/* ---------------------------------------------------------------- timers */

/* Inactivity timeouts (keep-alive, body) count from the last read; the others from when they
 * were set. The send timeout is set anew for each write the client has to make room for: bytes
 * the client sends meanwhile are no progress (a client that trickles them while reading nothing
 * would otherwise hold its connection and its sandbox connection for ever). */
static void on_conn_timer(sp_deadline_t *d, int kind)
{
    sp_conn_t *c = d->timer.data;
    switch (kind) {
    case T_HEADER:
        sp_log(SP_LOG_INFO, "client header timeout", "s:client", c->peer_ip, NULL);
        if (c->req && c->state == CS_HEAD) {
            c->req->error = SP_ERR_CLIENT_TIMEOUT;
            sp_conn_error_response(c, 408, "request header timeout");
        } else {
            sp_conn_close(c);
        }
        break;
    case T_BODY:
        if (c->req)
            c->req->error = SP_ERR_CLIENT_TIMEOUT;
        if (c->state == CS_READ_BODY) {
            sp_conn_close(c); /* the waiting script is told by the abort hook */
        } else if (c->req && !c->req->resp_head_sent && c->state != CS_DISCARD) {
            sp_upstream_abort(c->req);
            sp_conn_error_response(c, 408, "request body timeout");
        } else {
            sp_conn_close(c);
        }
        break;
    case T_SEND:
        sp_log(SP_LOG_INFO, "client send timeout", "s:client", c->peer_ip, "s:request_id",
               c->req ? c->req->id : NULL, "d:send_timeout", sp_cfg.send_timeout, NULL);
        if (c->req)
            c->req->error = SP_ERR_CLIENT_TIMEOUT;
        sp_conn_close(c);
        break;
    case T_KEEPALIVE:
    case T_LINGER:
    default:
        sp_conn_close(c);
        break;
    }
}

/* Sets the connection's one timeout (base/deadline.h: armed lazily). */
static void conn_timer(sp_conn_t *c, int kind, double secs)
{
    if (kind == T_NONE)
        sp_deadline_clear(&c->dl);
    else
        sp_deadline_set(&c->dl, kind, secs, kind == T_KEEPALIVE || kind == T_BODY);
}

void sp_conn_write_done(sp_conn_t *c)
{
    c->writing = false;
    if (c->dl.kind == T_SEND)
        conn_timer(c, T_NONE, 0);
}

void sp_conn_idle_timer(sp_conn_t *c, bool on)
{
    if (on)
        conn_timer(c, T_KEEPALIVE, sp_cfg.keepalive_timeout);
    else if (c->dl.kind == T_KEEPALIVE)
        conn_timer(c, T_NONE, 0);
}

/* ---------------------------------------------------------------- reading */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    SP_UNUSED(suggested);
    sp_conn_t *c = h->data;
    if (!c->rbuf) {
        /* An idle connection owns no buffer: read into the worker's scratch and take a buffer
         * only if bytes came (on_read). A close of 10,000 idle connections then allocates
         * nothing. */
        buf->base = c->w->read_scratch;
        buf->len = c->w->client_bufs.block_size;
        return;
    }
    if (c->rpos == c->rlen) {
        c->rpos = c->rlen = 0;
    }
    buf->base = c->rbuf + c->rlen;
    buf->len = c->rcap - c->rlen;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

void sp_conn_read_start(sp_conn_t *c)
{
    if (c->reading || c->closing)
        return;
    if (c->rbuf && c->rlen == c->rcap) {
        if (c->rpos == 0 || c->writing)
            return; /* full: the parser must consume first */
        memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
        c->rlen -= c->rpos;
        c->rpos = 0;
    }
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

void sp_conn_read_stop(sp_conn_t *c)
{
    if (!c->reading)
        return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void release_rbuf_if_empty(sp_conn_t *c)
{
    if (c->rbuf && c->rpos == c->rlen && !c->writing) {
        sp_pool_put(&c->w->client_bufs, c->rbuf);
        c->rbuf = NULL;
        c->rlen = c->rpos = c->rcap = 0;
    }
}

static void on_client_eof(sp_conn_t *c)
{
    c->eof = true;
    sp_conn_read_stop(c);
    switch (c->state) {
    case CS_IDLE:
        sp_conn_close(c);
        break;
    case CS_RESPOND:
        /* finish writing what we have; then close */
        if (c->req)
            c->req->close_client = true;
        break;
    case CS_TUNNEL:
        sp_conn_close(c);
        break;
    default:
        if (c->req && c->req->error == SP_ERR_NONE)
            c->req->error = SP_ERR_CLIENT_ABORT;
        sp_conn_close(c);
        break;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    sp_conn_t *c = s->data;
    if (nread < 0) {
        on_client_eof(c);
        return;
    }
    if (nread == 0)
        return;
    sp_deadline_touch(&c->dl);
    if (c->state == CS_LINGER) {
        c->rpos = c->rlen = 0; /* discard */
        return;
    }
    if (buf->base == c->w->read_scratch) {
        /* the bytes are in the worker's scratch (on_alloc): move them to a buffer of our own */
        c->rbuf = sp_pool_get(&c->w->client_bufs);
        c->rcap = (uint32_t)c->w->client_bufs.block_size;
        memcpy(c->rbuf, buf->base, (size_t)nread);
        c->rpos = c->rlen = 0;
    }
    c->rlen += (uint32_t)nread;
    if (c->req)
        c->req->bytes_in += (uint64_t)nread;
    if (c->rlen == c->rcap)
        sp_conn_read_stop(c); /* resumed when the parser has consumed */
    conn_process(c);
}

/* ---------------------------------------------------------------- the client side ops */

/* An HTTP/1.1 connection as the client side of its current request (sp_client_ops_t). */
static void h1_written(uv_write_t *wr, int status)
{
    sp_conn_t *c = wr->data;
    sp_conn_write_done(c);
    if (c->closing)
        return;
    if (status < 0) {
        if (c->req)
            c->req->error = SP_ERR_CLIENT_ABORT;
        sp_conn_close(c);
        return;
    }
    if (c->req)
        sp_upstream_client_written(c->req);
    /* Client bytes that came while the write was pending (a tunnel's, a body streamed while
     * the response streams) wait for no further read: go on with them now. */
    if (!c->closing && c->rbuf && c->rpos < c->rlen &&
        (c->state == CS_TUNNEL || c->state == CS_UPSTREAM))
        conn_process(c);
}

static int h1_send(sp_request_t *r, uv_buf_t *bufs, unsigned n, bool head)
{
    SP_UNUSED(head);
    sp_conn_t *c = r->client;
    int rc = sp_conn_send(c, bufs, n, h1_written);
    if (rc < 0) {
        r->error = SP_ERR_CLIENT_ABORT;
        sp_conn_close(c);
    }
    return rc;
}

static bool h1_busy(const sp_request_t *r) { return ((const sp_conn_t *)r->client)->writing; }
static void h1_finish(sp_request_t *r) { sp_conn_finish_request(r->client); }
static void h1_close(sp_request_t *r) { sp_conn_close(r->client); }
static void h1_resume_body(sp_request_t *r) { sp_conn_resume_body(r->client); }
static unsigned h1_take_body(sp_request_t *r) { return sp_conn_take_body(r->client); }
static void h1_hold_body(sp_request_t *r) { sp_conn_read_stop(r->client); }
static void h1_start_tunnel(sp_request_t *r) { sp_conn_start_tunnel(r->client); }

static bool h1_last_exchange(const sp_request_t *r)
{
    return sp_conn_last_exchange(r->client);
}

static void h1_fail(sp_request_t *r, int status, const char *msg)
{
    if (r->resp_head_sent)
        sp_conn_close(r->client);
    else
        sp_conn_error_response(r->client, status, msg);
}

static const sp_client_ops_t h1_ops = {
    .send = h1_send,
    .busy = h1_busy,
    .finish = h1_finish,
    .fail = h1_fail,
    .close = h1_close,
    .resume_body = h1_resume_body,
    .take_body = h1_take_body,
    .hold_body = h1_hold_body,
    .last_exchange = h1_last_exchange,
    .start_tunnel = h1_start_tunnel,
};

/* ---------------------------------------------------------------- parser callbacks */

static int cb_message_begin(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    if (c->state != CS_IDLE)
        return 0;
    c->req = sp_request_acquire(c->w);
    c->req->conn = c;
    c->req->client = c;
    c->req->cops = &h1_ops;
    c->req->bytes_in = c->rlen - c->rpos;
    memcpy(c->req->client_ip, c->peer_ip, sizeof c->peer_ip);
    c->req->client_port = c->peer_port;
    c->req->listener = c->listener->name;
    c->state = CS_HEAD;
    conn_timer(c, T_HEADER, sp_cfg.header_timeout);
    return 0;
}

static int head_limit(sp_conn_t *c, size_t add)
{
    sp_request_t *r = c->req;
    if (r->head.len + add + (size_t)r->nhdrs * 4 > (size_t)sp_cfg.max_header_size) {
        c->err_status = 431;
        llhttp_set_error_reason(&c->parser, "request header fields too large");
        return HPE_USER;
    }
    return 0;
}

static int cb_url(llhttp_t *p, const char *at, size_t len)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    if (r->url_len + len > (size_t)sp_cfg.max_url_size) {
        c->err_status = 414;
        llhttp_set_error_reason(p, "request target too long");
        return HPE_USER;
    }
    if (head_limit(c, len))
        return HPE_USER;
    sp_buf_add(&r->head, at, len);
    r->url_len += (uint32_t)len;
    return 0;
}

static int cb_header_field(llhttp_t *p, const char *at, size_t len)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    if (head_limit(c, len))
        return HPE_USER;
    sp_hdr_acc_t a = SP_REQ_HDRS(r);
    if (!sp_hdrs_field(&a, &c->fold, at, len, (uint32_t)sp_cfg.max_headers)) {
        c->err_status = 431;
        llhttp_set_error_reason(p, "too many request headers");
        return HPE_USER;
    }
    return 0;
}

static int cb_header_field_complete(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    sp_hdr_acc_t a = SP_REQ_HDRS(c->req);
    sp_hdrs_field_complete(&a);
    return 0;
}

static int cb_header_value(llhttp_t *p, const char *at, size_t len)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    if (head_limit(c, len))
        return HPE_USER;
    /* llhttp accepts obsolete line folding (also after an empty first line); RFC 9112 lets a
     * server reject it: we do, in every form (sp_fold_value). */
    sp_hdr_acc_t a = SP_REQ_HDRS(r);
    if (!sp_hdrs_value(&a, &c->fold, at, len)) {
        llhttp_set_error_reason(p, "obsolete line folding in a header");
        return HPE_USER;
    }
    return 0;
}

static int cb_headers_complete(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    r->method = (uint8_t)llhttp_get_method(p);
    r->vmajor = llhttp_get_http_major(p);
    r->vminor = llhttp_get_http_minor(p);
    r->keepalive = llhttp_should_keep_alive(p) != 0;
    r->chunked = (p->flags & F_CHUNKED) != 0;
    r->content_length = (p->flags & F_CONTENT_LENGTH) ? p->content_length : 0;
    r->has_body = r->chunked || r->content_length > 0;
    r->upgrade = p->upgrade != 0;
    r->t_head = uv_hrtime();
    return HPE_PAUSED;
}

static int cb_body(llhttp_t *p, const char *at, size_t len)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    r->body_bytes += len;
    if (sp_cfg.max_body_size > 0 && (double)r->body_bytes > sp_cfg.max_body_size) {
        c->err_status = 413;
        llhttp_set_error_reason(p, "request body too large");
        return HPE_USER;
    }
    if (c->state == CS_UPSTREAM) {
        r->iov[r->niov++] = uv_buf_init((char *)at, (unsigned)len);
    } else if (c->state == CS_READ_BODY) {
        if (r->body.len + len > r->body_limit) {
            c->err_status = 413;
            llhttp_set_error_reason(p, "request body too large for the script");
            return HPE_USER;
        }
        sp_buf_add(&r->body, at, len);
    }
    return 0;
}

static int cb_chunk_header(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    if (c->state != CS_UPSTREAM)
        return 0;
    r->chunk_left = p->content_length;
    if (r->chunk_left == 0)
        return 0; /* the last chunk: framed at message complete */
    char *f = r->frames[r->nframes++];
    int n = snprintf(f, 20, "%llx\r\n", (unsigned long long)r->chunk_left);
    r->iov[r->niov++] = uv_buf_init(f, (unsigned)n);
    return 0;
}

/* Chunk extensions are never forwarded (bodies are re-framed), but a client could send
 * megabytes of them: count and cap them. */
static int cb_chunk_ext(llhttp_t *p, const char *at, size_t len)
{
    SP_UNUSED(at);
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    r->chunk_ext_bytes += (uint32_t)len;
    if (r->chunk_ext_bytes > (uint32_t)sp_cfg.max_chunk_extension_size) {
        llhttp_set_error_reason(p, "chunk extensions too long");
        return HPE_USER;
    }
    return 0;
}

static int cb_chunk_complete(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    if (c->state != CS_UPSTREAM || r->chunk_left == 0)
        return 0;
    r->iov[r->niov++] = uv_buf_init("\r\n", 2);
    r->chunk_left = 0;
    /* Leave room for the next chunk (header, body, CRLF) and the final frame. */
    if (r->niov + 5 >= SP_MAX_IOV || r->nframes + 2 >= SP_MAX_IOV)
        return HPE_PAUSED;
    return 0;
}

static int cb_message_complete(llhttp_t *p)
{
    sp_conn_t *c = p->data;
    sp_request_t *r = c->req;
    r->body_done = true;
    if (c->state == CS_UPSTREAM && r->chunked)
        r->iov[r->niov++] = uv_buf_init("0\r\n\r\n", 5);
    return HPE_PAUSED;
}

const llhttp_settings_t sp_request_settings = {
    .on_message_begin = cb_message_begin,
    .on_url = cb_url,
    .on_header_field = cb_header_field,
    .on_header_field_complete = cb_header_field_complete,
    .on_header_value = cb_header_value,
    .on_headers_complete = cb_headers_complete,
    .on_body = cb_body,
    .on_chunk_header = cb_chunk_header,
    .on_chunk_complete = cb_chunk_complete,
    .on_chunk_extension_name = cb_chunk_ext,
    .on_chunk_extension_value = cb_chunk_ext,
    .on_message_complete = cb_message_complete,
};

/* ---------------------------------------------------------------- writing */

/* A staged write that the socket did not take whole waits in libuv: from now on the client
 * has send_timeout to take it. */
static void on_send_queued(uv_write_t *wr)
{
    sp_conn_t *c = wr->data;
    conn_timer(c, T_SEND, sp_cfg.send_timeout);
}

/* sp_conn_write, or with `batch` sp_conn_send (http.h). */
static int conn_write(sp_conn_t *c, uv_buf_t *bufs, unsigned n, uv_write_cb cb, bool batch)
{
    if (c->closing)
        return UV_ECANCELED;
    size_t total = sp_bufs_total(bufs, n);
    if (c->req)
        c->req->bytes_out += total;
    c->wreq.data = c;
    if (batch && sp_wbatch_write(c->w->wb, &c->wreq, (uv_stream_t *)&c->tcp, bufs, n, total,
                                 cb, on_send_queued, false)) {
        c->writing = true;
        /* sent before the loop polls again: no send timeout yet (on_send_queued), and none
         * of another kind either, as a write sent at once would leave it */
        conn_timer(c, T_NONE, 0);
        return 2;
    }
    int w = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
    if (w == UV_EAGAIN || w == UV_ENOSYS)
        w = 0;
    if (w < 0)
        return w;
    if ((size_t)w == total)
        return 0;
    unsigned k = sp_bufs_consume(bufs, n, (size_t)w);
    int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, bufs + k, n - k, cb);
    if (rc < 0)
        return rc;
    c->writing = true;
    conn_timer(c, T_SEND, sp_cfg.send_timeout);
    return 1;
}

int sp_conn_write(sp_conn_t *c, uv_buf_t *bufs, unsigned n, uv_write_cb cb)
{
    return conn_write(c, bufs, n, cb, false);
}

int sp_conn_send(sp_conn_t *c, uv_buf_t *bufs, unsigned n, uv_write_cb cb)
{
    return conn_write(c, bufs, n, cb, true);
}

/* ---------------------------------------------------------------- finishing */

/* The core is done with the request: log it and release the slot (if the script is too). */
static void request_done(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    if (!r)
        return;
    c->req = NULL;
    sp_request_end(r);
}

bool sp_conn_last_exchange(const sp_conn_t *c)
{
    return c->nrequests + 1 >= (uint32_t)sp_cfg.keepalive_requests || c->w->draining;
}

void sp_conn_finish_request(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    bool close = r->close_client || !r->keepalive || r->upgrade || sp_conn_last_exchange(c) ||
                 (r->has_body && !r->body_done);
    c->nrequests++;
    request_done(c);
    if (close) {
        conn_linger_close(c);
        return;
    }
    c->state = CS_IDLE;
    conn_timer(c, T_KEEPALIVE, sp_cfg.keepalive_timeout);
    sp_conn_read_start(c);
    conn_process(c); /* a pipelined request may already be buffered */
}

static void on_local_written(uv_write_t *wr, int status)
{
    sp_conn_t *c = wr->data;
    sp_conn_write_done(c);
    if (c->closing)
        return;
    if (status < 0) {
        if (c->req)
            c->req->error = SP_ERR_CLIENT_ABORT;
        sp_conn_close(c);
        return;
    }
    conn_timer(c, T_NONE, 0);
    sp_request_t *r = c->req;
    if (r && r->has_body && !r->body_done && !r->close_client) {
        c->state = CS_DISCARD;
        conn_timer(c, T_BODY, sp_cfg.body_timeout);
        sp_conn_read_start(c);
        conn_process(c);
        return;
    }
    sp_conn_finish_request(c);
}

/* Sends the local response (head in r->out, body in r->body) and continues when written. */
static void send_local(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    if (sp_conn_last_exchange(c))
        r->close_client = true; /* the response says the connection ends */
    sp_request_local_head(r);
    c->state = CS_RESPOND;
    r->resp_status = r->status;
    r->resp_head_sent = true;
    uv_buf_t b[2] = {uv_buf_init(r->out.p, (unsigned)r->out.len),
                     uv_buf_init(r->body.p, (unsigned)r->body.len)};
    unsigned n = (r->method == HTTP_HEAD || r->body.len == 0) ? 1 : 2;
    int rc = sp_conn_send(c, b, n, on_local_written);
    if (rc == 0) {
        c->wreq.data = c;
        on_local_written(&c->wreq, 0);
    } else if (rc < 0) {
        r->error = SP_ERR_CLIENT_ABORT;
        sp_conn_close(c);
    }
}

/* Sends the response the script decided. */
static void respond_decided(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    /* A body the client holds back (Expect: 100-continue) will not come: close after. */
    if (r->has_body && !r->body_done && r->expect_continue && !r->sent_continue)
        r->close_client = true;
    send_local(c);
}

void sp_conn_error_response(sp_conn_t *c, int status, const char *msg)
{
    sp_request_t *r = c->req;
    if (!r || r->resp_head_sent) {
        sp_conn_close(c);
        return;
    }
    sp_request_error_body(r, status, msg);
    send_local(c);
}

/* ---------------------------------------------------------------- the request hook */

static bool path_ok(const sp_request_t *r)
{
    return r->url_len > 0 && r->head.p[0] == '/';
}

static void act_on_decision(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    switch (r->decision) {
    case SP_DECIDE_RESPOND:
        respond_decided(c);
        break;
    case SP_DECIDE_FORWARD:
        c->state = CS_UPSTREAM;
        sp_upstream_start(r);
        break;
    default:
        if (r->error != SP_ERR_SCRIPT) { /* a script error was logged with its traceback */
            r->error = SP_ERR_SCRIPT;
            SP_STAT_ADD(c->w->stats.script_errors, 1);
            sp_log(SP_LOG_ERROR, "request hook made no decision", "s:request_id", r->id, NULL);
        }
        sp_conn_error_response(c, 500, "internal error");
        break;
    }
}

void sp_request_decided(sp_request_t *r)
{
    if (r->cops == &sp_h2_client_ops) {
        sp_h2_decided(r);
        return;
    }
    sp_conn_t *c = r->conn;
    if (!c || c->closing || c->req != r || c->state != CS_SCRIPT) {
        sp_request_maybe_release(r);
        return;
    }
    act_on_decision(c);
}

static void bad_request(sp_conn_t *c, llhttp_errno_t e);

/* Validates the body bytes that arrived with the head, with a silent copy of the parser, so a
 * malformed body that is already here is refused before anything reaches the sandbox. */
static int probe_ext(llhttp_t *p, const char *at, size_t len)
{
    SP_UNUSED(at);
    uint32_t *n = p->data;
    *n += (uint32_t)len;
    return *n > (uint32_t)sp_cfg.max_chunk_extension_size ? HPE_USER : 0;
}

static bool body_lookahead_ok(sp_conn_t *c)
{
    static const llhttp_settings_t probe_settings = {
        .on_chunk_extension_name = probe_ext,
        .on_chunk_extension_value = probe_ext,
    };
    uint32_t ext = 0;
    llhttp_t probe = c->parser;
    probe.settings = (void *)&probe_settings;
    probe.data = &ext;
    llhttp_errno_t e = llhttp_execute(&probe, c->rbuf + c->rpos, c->rlen - c->rpos);
    if (e == HPE_OK || e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE)
        return true;
    llhttp_set_error_reason(&c->parser, e == HPE_USER ? "chunk extensions too long"
                                                      : llhttp_get_error_reason(&probe));
    return false;
}

static void start_request(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    r->path_len = r->url_len;
    for (uint32_t i = 0; i < r->url_len; i++)
        if (r->head.p[i] == '?') {
            r->path_len = i;
            break;
        }
    conn_timer(c, T_NONE, 0);
    /* Framing and form checks the parser leaves to us. */
    size_t vlen;
    const char *v;
    if (r->vmajor != 1) {
        sp_conn_error_response(c, 400, "unsupported HTTP version");
        return;
    }
    if (!path_ok(r) || r->method == HTTP_CONNECT) {
        sp_conn_error_response(c, 400, "bad request target: expected /{user}/{sandbox}/{path}");
        return;
    }
    if (r->vmajor == 1 && r->vminor == 1 && !sp_request_header(r, "host", 4, &vlen)) {
        sp_conn_error_response(c, 400, "missing Host header");
        return;
    }
    int hosts = 0;
    for (uint32_t i = 0; i < r->nhdrs; i++)
        if (sp_ieq(r->head.p + r->hdrs[i].name_off, r->hdrs[i].name_len, "host"))
            hosts++;
    if (hosts > 1) {
        sp_conn_error_response(c, 400, "duplicate Host header");
        return;
    }
    size_t fl;
    const char *framing = sp_connection_lists_framing(r->head.p, r->hdrs, r->nhdrs, &fl);
    if (framing) {
        /* Dropping it as hop-by-hop while the body is still framed by it would let the body
         * reach the sandbox as a second request: refuse the request instead. */
        sp_log(SP_LOG_WARN, "request refused: Connection lists a framing header", "s:client",
               c->peer_ip, "S:header", framing, SP_MIN(fl, (size_t)64), "s:request_id", r->id,
               NULL);
        sp_conn_error_response(c, 400, "Connection header lists a framing header");
        return;
    }
    if ((c->parser.flags & F_TRANSFER_ENCODING) && !r->chunked) {
        /* RFC 9112 6.3: a request whose final transfer coding is not chunked is refused */
        sp_conn_error_response(c, 400, "unsupported Transfer-Encoding");
        return;
    }
    if (sp_cfg.max_body_size > 0 && (double)r->content_length > sp_cfg.max_body_size) {
        r->error = SP_ERR_BODY_TOO_LARGE;
        sp_conn_error_response(c, 413, "request body too large");
        return;
    }
    v = sp_request_header(r, "expect", 6, &vlen);
    if (v) {
        if (sp_ieq(v, vlen, "100-continue"))
            r->expect_continue = r->has_body;
        else {
            sp_conn_error_response(c, 417, "unsupported expectation");
            return;
        }
    }
    if (r->upgrade && r->has_body) {
        sp_conn_error_response(c, 400, "upgrade request with a body");
        return;
    }
    if (r->upgrade && sp_cfg.max_tunnels > 0 &&
        atomic_load(&sp_open_tunnels) >= sp_cfg.max_tunnels) {
        sp_conn_error_response(c, 503, "too many open tunnels");
        return;
    }
    if (r->has_body && c->rpos < c->rlen && !body_lookahead_ok(c)) {
        bad_request(c, HPE_INVALID_CHUNK_SIZE);
        return;
    }
    c->state = CS_SCRIPT;
    /* Keep reading (into the rest of the buffer) so a client that goes away is noticed. */
    sp_conn_read_start(c);
    r->script_busy = true;
    int decided = c->w->hooks->request(r);
    if (decided) {
        r->script_busy = false;
        if (c->closing || c->req != r)
            return;
        act_on_decision(c);
    }
}

/* ---------------------------------------------------------------- the driver */

static int parse_error_status(sp_conn_t *c, llhttp_errno_t e)
{
    if (e == HPE_USER && c->err_status)
        return c->err_status;
    return 400;
}

static void bad_request(sp_conn_t *c, llhttp_errno_t e)
{
    int status = parse_error_status(c, e);
    SP_STAT_ADD(c->w->stats.parse_errors, 1);
    const char *reason = llhttp_get_error_reason(&c->parser);
    sp_log(SP_LOG_INFO, "bad request", "s:client", c->peer_ip, "i:status", (int64_t)status,
           "s:error", llhttp_errno_name(e), "s:reason", reason ? reason : "", NULL);
    if (!c->req) {
        c->req = sp_request_acquire(c->w);
        c->req->conn = c;
        c->req->client = c;
        c->req->cops = &h1_ops;
        memcpy(c->req->client_ip, c->peer_ip, sizeof c->peer_ip);
        c->req->client_port = c->peer_port;
        c->req->listener = c->listener->name;
    }
    if (status == 413)
        c->req->error = SP_ERR_BODY_TOO_LARGE;
    char msg[160];
    if (status == 400)
        snprintf(msg, sizeof msg, "malformed request: %s",
                 reason && *reason ? reason : llhttp_errno_name(e));
    else
        snprintf(msg, sizeof msg, "%s", reason && *reason ? reason : sp_status_reason(status));
    c->state = CS_HEAD; /* nothing further is parsed on this connection */
    sp_conn_error_response(c, status, msg);
}

/* Runs the parser over buffered bytes. Returns the llhttp result and advances rpos. */
static llhttp_errno_t parse_some(sp_conn_t *c)
{
    const char *start = c->rbuf + c->rpos;
    sp_fold_run(&c->fold, start);
    llhttp_errno_t e = llhttp_execute(&c->parser, start, c->rlen - c->rpos);
    if (e == HPE_OK) {
        if (c->state == CS_HEAD)
            sp_fold_skip(&c->fold, c->rbuf + c->rlen); /* a fold may continue in the next read */
        c->rpos = c->rlen;
    } else if (e == HPE_PAUSED) {
        c->rpos = (uint32_t)(llhttp_get_error_pos(&c->parser) - c->rbuf);
        llhttp_resume(&c->parser);
    } else if (e == HPE_PAUSED_UPGRADE) {
        c->rpos = (uint32_t)(llhttp_get_error_pos(&c->parser) - c->rbuf);
    }
    return e;
}

static void step_head(sp_conn_t *c)
{
    if (!c->rbuf || c->rpos == c->rlen) {
        if (c->state == CS_IDLE)
            release_rbuf_if_empty(c);
        sp_conn_read_start(c);
        return;
    }
    if (c->state == CS_IDLE && c->nrequests == 0 && sp_cfg.http2) {
        /* HTTP/2 with prior knowledge: the client preface instead of a first request */
        int pre = sp_h2_preface(c->rbuf + c->rpos, c->rlen - c->rpos);
        if (pre == 0) {
            sp_conn_read_start(c);
            return;
        }
        if (pre > 0) {
            if (sp_h2_start(c) < 0) {
                sp_conn_close(c);
                return;
            }
            c->state = CS_H2;
            c->process_again = true;
            return;
        }
    }
    const char *chunk = c->rbuf + c->rpos;
    size_t chunk_len = c->rlen - c->rpos;
    llhttp_errno_t e = parse_some(c);
    if (e == HPE_OK && c->state == CS_HEAD && c->parser.http_major == 0 && c->req &&
        c->req->url_len && memchr(chunk, '\n', chunk_len)) {
        /* a request line ended without " HTTP/x.y": HTTP/0.9, which we do not speak */
        llhttp_set_error_reason(&c->parser, "HTTP/0.9 is not supported");
        bad_request(c, HPE_INVALID_VERSION);
        return;
    }
    if (e == HPE_OK) {
        /* Everything consumed (the head bytes were copied); the buffer can be reused. */
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        return;
    }
    if (e == HPE_PAUSED && c->req && c->state == CS_HEAD) {
        if (!c->req->has_body) {
            /* Let the parser complete a bodyless message now, so its end is not seen later
             * while the next request is being parsed. */
            sp_fold_run(&c->fold, c->rbuf + c->rpos);
            llhttp_errno_t e2 = llhttp_execute(&c->parser, c->rbuf + c->rpos, 0);
            if (e2 == HPE_PAUSED)
                llhttp_resume(&c->parser);
        }
        start_request(c);
        c->process_again = true;
        return;
    }
    bad_request(c, e);
}

static void step_body(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    if (r->head_sent && r->body_done && !c->writing && !(r->up && r->up->writing)) {
        /* the body went (perhaps with the head): keep reading to notice a vanished client */
        sp_conn_read_start(c);
        return;
    }
    if (!r->head_sent || r->body_done || c->writing || (r->up && r->up->writing))
        return;
    if (!r->has_body)
        return;
    if (!r->sent_continue && r->expect_continue && c->rpos == c->rlen) {
        /* The client waits for permission before sending the body. */
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        r->sent_continue = true;
        uv_buf_t b = uv_buf_init((char *)cont, sizeof cont - 1);
        int rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (rc != (int)b.len) {
            sp_conn_close(c);
            return;
        }
    }
    if (c->rpos == c->rlen) {
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        if (c->dl.kind != T_BODY)
            conn_timer(c, T_BODY, sp_cfg.body_timeout);
        return;
    }
    r->niov = 0;
    r->nframes = 0;
    llhttp_errno_t e = parse_some(c);
    if (e != HPE_OK && e != HPE_PAUSED) {
        /* A malformed body (bad chunk): the upstream exchange cannot continue. */
        sp_upstream_abort(r);
        if (!r->resp_head_sent)
            bad_request(c, e);
        else
            sp_conn_close(c);
        return;
    }
    if (r->niov) {
        int rc = sp_upstream_write_body(r);
        if (rc == 1) {
            sp_conn_read_stop(c);
            return; /* sp_conn_resume_body continues */
        }
        if (rc < 0)
            return; /* upstream.c has handled the failure */
    }
    if (r->body_done) {
        if (c->dl.kind == T_BODY)
            conn_timer(c, T_NONE, 0);
        /* Keep reading pipelined bytes into the free space, to notice a vanished client. */
        sp_conn_read_start(c);
        return;
    }
    c->process_again = true;
}

unsigned sp_conn_take_body(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    if (!r || !r->has_body || r->body_done || r->body_buffered || c->state != CS_UPSTREAM ||
        !c->rbuf || c->rpos == c->rlen || c->writing || (r->expect_continue && !r->sent_continue))
        return 0;
    r->niov = 0;
    r->nframes = 0;
    llhttp_errno_t e = parse_some(c);
    if (e != HPE_OK && e != HPE_PAUSED) {
        r->niov = 0; /* the error stays in the parser: step_body reports it after the head */
        return 0;
    }
    if (r->body_done && c->dl.kind == T_BODY)
        conn_timer(c, T_NONE, 0);
    return r->niov;
}

void sp_conn_resume_body(sp_conn_t *c)
{
    if (c->closing || !c->req)
        return;
    if (c->state == CS_TUNNEL) {
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        return;
    }
    sp_deadline_touch(&c->dl);
    conn_process(c);
}

static void step_discard(sp_conn_t *c)
{
    if (!c->rbuf || c->rpos == c->rlen) {
        sp_conn_read_start(c);
        return;
    }
    llhttp_errno_t e = parse_some(c);
    if (e == HPE_OK) {
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        return;
    }
    if (e == HPE_PAUSED && c->req->body_done) {
        conn_timer(c, T_NONE, 0);
        sp_conn_finish_request(c);
        return;
    }
    sp_conn_close(c);
}

/* Parses body bytes into req->body for a script waiting in req:read_body. */
static void step_read_body(sp_conn_t *c)
{
    sp_request_t *r = c->req;
    if (!r->body_done && (!c->rbuf || c->rpos == c->rlen)) {
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        if (c->dl.kind != T_BODY)
            conn_timer(c, T_BODY, sp_cfg.body_timeout);
        return;
    }
    llhttp_errno_t e = r->body_done ? HPE_PAUSED : parse_some(c);
    if (e == HPE_OK) {
        c->rpos = c->rlen = 0;
        sp_conn_read_start(c);
        return;
    }
    c->state = CS_SCRIPT;
    conn_timer(c, T_NONE, 0);
    int err = 0;
    if (e == HPE_PAUSED && r->body_done) {
        r->body_buffered = true;
    } else {
        /* over the limit or malformed: the script hears it; the connection closes after */
        err = (e == HPE_USER && c->err_status == 413) ? -E2BIG : -EINVAL;
        r->close_client = true;
        r->body.len = 0;
    }
    c->w->hooks->body_ready(r, err);
}

int sp_request_read_body(sp_request_t *r, uint64_t limit)
{
    if (r->cops == &sp_h2_client_ops)
        return sp_h2_read_body(r, limit);
    sp_conn_t *c = r->conn;
    if (!c || c->closing || c->state != CS_SCRIPT || c->req != r)
        return -ENOTCONN;
    if (r->body_buffered || !r->has_body) {
        if (!r->has_body)
            r->body.len = 0;
        return 1;
    }
    if (!r->chunked && r->content_length > limit)
        return -E2BIG;
    r->body_limit = limit;
    r->body.len = 0;
    if (r->expect_continue && !r->sent_continue) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        uv_buf_t b = uv_buf_init((char *)cont, sizeof cont - 1);
        r->sent_continue = true;
        if (uv_try_write((uv_stream_t *)&c->tcp, &b, 1) != (int)b.len)
            return -ENOTCONN;
    }
    c->state = CS_READ_BODY;
    /* Parse what is buffered now; if that completes the body, answer at once. */
    if (c->rbuf && c->rpos < c->rlen) {
        llhttp_errno_t e = parse_some(c);
        if (e == HPE_PAUSED && r->body_done) {
            c->state = CS_SCRIPT;
            r->body_buffered = true;
            return 1;
        } else if (e != HPE_OK && e != HPE_PAUSED) {
            c->state = CS_SCRIPT;
            r->close_client = true;
            r->body.len = 0;
            return (e == HPE_USER && c->err_status == 413) ? -E2BIG : -EINVAL;
        } else {
            c->rpos = c->rlen = 0;
        }
    }
    sp_conn_read_start(c);
    conn_timer(c, T_BODY, sp_cfg.body_timeout);
    return 0;
}

static void step_tunnel(sp_conn_t *c)
{
    if (!c->rbuf || c->rpos == c->rlen || c->writing)
        return;
    if (c->req->up && c->req->up->writing)
        return;
    uv_buf_t b = uv_buf_init(c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rpos = c->rlen;
    int rc = sp_upstream_tunnel_write(c->req, &b, 1);
    if (rc == 1) {
        sp_conn_read_stop(c);
        return;
    }
    if (rc < 0)
        return;
    c->rpos = c->rlen = 0;
    sp_conn_read_start(c);
}

void sp_conn_start_tunnel(sp_conn_t *c)
{
    c->state = CS_TUNNEL;
    conn_timer(c, T_NONE, 0);
    sp_conn_read_start(c);
    conn_process(c);
}

static void conn_step(sp_conn_t *c)
{
    switch (c->state) {
    case CS_IDLE:
    case CS_HEAD:
        step_head(c);
        break;
    case CS_UPSTREAM:
        step_body(c);
        break;
    case CS_DISCARD:
        step_discard(c);
        break;
    case CS_TUNNEL:
        step_tunnel(c);
        break;
    case CS_READ_BODY:
        step_read_body(c);
        break;
    case CS_H2:
        sp_h2_input(c);
        break;
    case CS_SCRIPT:
        /* Keep reading while there is room, to notice a client that goes away. */
        if (c->rbuf && c->rlen == c->rcap)
            sp_conn_read_stop(c);
        break;
    default:
        break;
    }
}

static void conn_process(sp_conn_t *c)
{
    if (c->in_process) {
        c->process_again = true;
        return;
    }
    c->in_process = true;
    do {
        c->process_again = false;
        if (c->closing)
            break;
        conn_step(c);
    } while (c->process_again && !c->closing);
    c->in_process = false;
}

/* ---------------------------------------------------------------- closing */

static void on_conn_handle_closed(uv_handle_t *h)
{
    sp_conn_t *c = h->data;
    if (--c->handles > 0)
        return;
    sp_worker_t *w = c->w;
    if (c->rbuf)
        sp_pool_put(&w->client_bufs, c->rbuf);
    free(c->h2); /* sp_h2_closed emptied it */
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    w->nconns--;
    atomic_fetch_sub(&sp_open_connections, 1);
    if (c->counted_ip)
        sp_ip_release(c->peer_ip);
    free(c);
}

void sp_conn_close(sp_conn_t *c)
{
    if (c->closing)
        return;
    /* Closing from here on: the abort hook below resumes a waiting script, which may decide
     * (or fail to) at once; that decision must find the connection closing rather than answer
     * on it and close it a second time. */
    c->closing = true;
    sp_request_t *r = c->req;
    if (r) {
        if ((c->state == CS_SCRIPT || c->state == CS_READ_BODY) && r->script_busy) {
            if (r->error == SP_ERR_NONE)
                r->error = SP_ERR_CLIENT_ABORT;
            if (c->w->hooks->abort)
                c->w->hooks->abort(r);
        }
        if (r->tunnel)
            atomic_fetch_sub(&sp_open_tunnels, 1), r->tunnel = false;
    }
    request_done(c);
    if (c->h2)
        sp_h2_closed(c);
    sp_conn_read_stop(c);
    sp_wbatch_settle(c->w->wb, &c->wreq);
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    sp_deadline_close(&c->dl, on_conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *sr, int status)
{
    SP_UNUSED(status);
    sp_conn_t *c = sr->data;
    if (c->closing)
        return;
    if (status < 0 || c->eof)
        sp_conn_close(c);
}

/* Sends FIN after pending writes, then drains the client's input until it closes or the
 * lingering timeout passes, so an error response is not destroyed by a TCP reset. */
static void conn_linger_close(sp_conn_t *c)
{
    if (c->closing)
        return;
    if (c->req)
        request_done(c);
    if (sp_cfg.lingering_timeout <= 0 || c->eof) {
        sp_conn_close(c);
        return;
    }
    c->state = CS_LINGER;
    c->rpos = c->rlen = 0;
    conn_timer(c, T_LINGER, sp_cfg.lingering_timeout);
    c->sreq.data = c;
    sp_wbatch_settle(c->w->wb, &c->wreq);
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        sp_conn_close(c);
        return;
    }
    sp_conn_read_start(c);
}

/* ---------------------------------------------------------------- accepting */

static void conn_start(sp_conn_t *c);

void sp_server_on_connection(uv_stream_t *server, int status)
{
    sp_listener_t *l = server->data;
    sp_worker_t *w = l->w;
    if (status < 0) {
        sp_log(SP_LOG_WARN, "accept failed", "s:error", uv_strerror(status), NULL);
        return;
    }
    sp_conn_t *c = sp_calloc(1, sizeof *c);
    c->w = w;
    c->listener = l;
    uv_tcp_init(&w->loop, &c->tcp);
    c->tcp.data = c;
    c->handles = 1;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        uv_close((uv_handle_t *)&c->tcp, (uv_close_cb)free);
        return;
    }
    conn_start(c);
}

int sp_server_adopt(sp_listener_t *l, int fd)
{
    sp_worker_t *w = l->w;
    sp_conn_t *c = sp_calloc(1, sizeof *c);
    c->w = w;
    c->listener = l;
    uv_tcp_init(&w->loop, &c->tcp);
    c->tcp.data = c;
    c->handles = 1;
    int rc = uv_tcp_open(&c->tcp, fd);
    if (rc < 0) {
        uv_close((uv_handle_t *)&c->tcp, (uv_close_cb)free);
        return rc;
    }
    conn_start(c);
    return 0;
}

/* A new client connection: counted, limited, then reading. */
static void conn_start(sp_conn_t *c)
{
    sp_worker_t *w = c->w;
    int open = atomic_fetch_add(&sp_open_connections, 1) + 1;
    sp_deadline_init(&c->dl, &w->loop, on_conn_timer, c);
    c->handles = 2;
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    w->nconns++;
    if (open > sp_cfg.max_connections || w->draining) {
        static _Atomic uint64_t last_warn;
        uint64_t now = uv_now(&w->loop);
        if (now - atomic_load(&last_warn) > 1000) {
            atomic_store(&last_warn, now);
            sp_log(SP_LOG_WARN, w->draining ? "connection refused: draining"
                                            : "connection refused: max_connections reached",
                   "i:open", (int64_t)open, NULL);
        }
        c->eof = true;
        sp_conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    struct sockaddr_storage ss;
    ss.ss_family = AF_UNSPEC;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            uv_ip4_name(a, c->peer_ip, sizeof c->peer_ip);
            c->peer_port = ntohs(a->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            uv_ip6_name(a, c->peer_ip, sizeof c->peer_ip);
            c->peer_port = ntohs(a->sin6_port);
        }
    }
    /* A trusted proxy (a load balancer) carries many clients: only max_connections bounds it. */
    if (sp_cfg.max_connections_per_ip > 0 &&
        !sp_cidrs_contain(sp_cfg.trusted_nets, sp_cfg.ntrusted, (struct sockaddr *)&ss)) {
        if (!sp_ip_acquire(c->peer_ip, sp_cfg.max_connections_per_ip)) {
            static _Atomic uint64_t last_ip_warn;
            uint64_t now = uv_now(&w->loop);
            if (now - atomic_load(&last_ip_warn) > 1000) {
                atomic_store(&last_ip_warn, now);
                sp_log(SP_LOG_WARN, "connection refused: max_connections_per_ip reached",
                       "s:client", c->peer_ip, "i:limit", (int64_t)sp_cfg.max_connections_per_ip,
                       NULL);
            }
            c->eof = true;
            sp_conn_close(c);
            return;
        }
        c->counted_ip = true;
    }
    llhttp_init(&c->parser, HTTP_REQUEST, &sp_request_settings);
    c->parser.data = c;
    c->state = CS_IDLE;
    conn_timer(c, T_KEEPALIVE, sp_cfg.header_timeout);
    sp_conn_read_start(c);
}
