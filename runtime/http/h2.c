/*
 * h2.c: HTTP/2 on a client connection: h2c with prior knowledge (RFC 9113 3.3) on the same
 * listener as HTTP/1.1, through nghttp2 (the framing, HPACK, flow control and the protocol's
 * state machine are nghttp2's; none is written here). Each stream becomes an sp_request_t that
 * goes through the same hooks, limits, log phase and upstream machinery as an HTTP/1.1 request:
 * this file is the "client side" (sp_client_ops_t) of those requests. Sandboxes are reached
 * over HTTP/1.1 (upstream.c); the response head upstream.c builds as HTTP/1.1 text is turned
 * into a HEADERS frame here, and bodies reach the client de-chunked. gRPC calls are the
 * exception: relayed to the sandbox over h2c, stream to stream (the last section).
 *
 * Memory is bounded per stream and per connection: a stream's request body waits in a buffer
 * of h2_stream_window bytes (its flow-control window is given back only once the bytes went
 * upstream, so a slow sandbox slows that stream's upload), its response in a buffer of about
 * h2_stream_buffer bytes (beyond it the sandbox is not read: a slow reader slows its own
 * stream), and at most h2_max_concurrent_streams streams run at once. The server connection
 * (sp_conn_t, server.c) still owns the socket, the connection limits and the timeouts.
 * It does not do Upgrade: h2c or extended CONNECT.
 */
#include "http/http.h"
#include "http/worker.h"
#include "base/config.h"
#include "base/log.h"
#include "base/netaddr.h"

#include <arpa/inet.h>
#include <nghttp2/nghttp2.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN (sizeof h2_preface - 1)

/* Bytes of frames gathered from nghttp2 before one socket write. */
#define WRITE_CHUNK 65536

typedef struct h2s h2s_t;
typedef struct up2 up2_t;

struct sp_h2 {
    sp_conn_t *c;
    nghttp2_session *s;
    sp_buf_t wbuf;          /* frames handed to the socket: one write at a time */
    h2s_t *streams;         /* open streams */
    uint32_t nstreams;      /* streams whose request head is complete (the idle timer's test) */
    uint32_t nopen;         /* every stream object */
    size_t give_back;       /* DATA bytes of ended streams to return to the connection window */
    bool in_recv;           /* inside nghttp2_session_mem_recv: no mem_send now */
    bool flushing, flush_again;
    bool writing;
    bool pump;              /* some stream has request body bytes to forward */
    bool goaway;            /* draining: GOAWAY sent, streams in flight finish */
    bool dead;              /* a fatal session error: close once the last frames are out */
    bool closed;
    uv_timer_t *sweep;      /* checks the streams' idleness while any is open (own memory: it
                             * closes after the connection may have freed this) */
    bool sweeping;
    bool up_dirty;          /* listed for a flush by an h2c connection to a sandbox */
};

struct h2s {
    sp_h2_t *h;
    int32_t id;
    sp_request_t *r;        /* NULL once the request let go of the stream */
    sp_buf_t authority;     /* :authority, until the head is complete */
    char method[24];
    uint8_t mlen;
    uint32_t hdr_bytes;
    int bad;                /* a status to answer once the head is complete (400, 414, 431) */
    const char *bad_msg;
    bool has_host, headed;
    /* the request body: in[0..in_len) received, in[0..inflight) being written upstream */
    char *in;
    size_t in_len, in_cap, inflight;
    bool in_end;            /* END_STREAM from the client */
    bool too_large;         /* the body passed max_body_size while the script decided */
    bool reading_body;      /* req:read_body waits for the rest */
    bool discard;           /* the body has nowhere to go (a local answer): drop it */
    bool forwarding;
    /* the response: out[out_pos..len) not yet taken by nghttp2 */
    sp_buf_t out;
    size_t out_pos;
    bool submitted, out_end, deferred, up_waiting, notify, sent_end;
    /* h2c towards the sandbox (gRPC): the upstream stream, its trailers, bytes to consume */
    up2_t *up2;
    size_t up_consume;
    sp_buf_t trailers;      /* "name\0value\0" */
    bool has_trailers;
    bool idled;             /* ended by h2_stream_idle_timeout */
    uint64_t active;        /* uv_now (ms) when a byte last moved either way */
    h2s_t *next, *prev;
};

int sp_h2_preface(const char *buf, size_t len)
{
    size_t n = len < PREFACE_LEN ? len : PREFACE_LEN;
    if (memcmp(buf, h2_preface, n) != 0)
        return -1;
    return len >= PREFACE_LEN ? 1 : 0;
}

static void h2_flush(sp_h2_t *h);
static void up2_release(up2_t *up);
static void up2_pump(up2_t *up);
static void up2_consumed(up2_t *up, size_t n);
static bool up2_wanted(const sp_request_t *r);
static void up2_start(h2s_t *s);

/* ---------------------------------------------------------------- streams */

static size_t out_pending(const h2s_t *s) { return s->out.len - s->out_pos; }

/* Bytes moved on the stream: its idle time counts again from now. */
static void touch(h2s_t *s) { s->active = uv_now(&s->h->c->w->loop); }

static void give_back(h2s_t *s, size_t n)
{
    if (n)
        nghttp2_session_consume(s->h->s, s->id, n);
}

/* The stream's request has ended on the client side (response done, reset, connection gone):
 * the request is logged and released; its body bytes not given back return to the connection
 * window. */
static void stream_release_request(h2s_t *s, bool complete)
{
    sp_request_t *r = s->r;
    if (!r)
        return;
    s->r = NULL;
    if (!complete) {
        if (r->script_busy && r->decision == SP_DECIDE_NONE) {
            if (r->error == SP_ERR_NONE)
                r->error = SP_ERR_CLIENT_ABORT;
            if (r->w->hooks->abort) {
                r->client = NULL;
                r->w->hooks->abort(r);
            }
        }
        if (r->error == SP_ERR_NONE)
            r->error = SP_ERR_CLIENT_ABORT;
    }
    sp_request_end(r);
}

static void stream_free(h2s_t *s)
{
    sp_h2_t *h = s->h;
    if (s->up2)
        up2_release(s->up2); /* a client reset cancels the sandbox's stream */
    stream_release_request(s, s->sent_end && out_pending(s) == 0);
    sp_buf_free(&s->trailers);
    h->give_back += s->in_len;
    if (s->prev)
        s->prev->next = s->next;
    else
        h->streams = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->headed)
        h->nstreams--;
    h->nopen--;
    sp_buf_free(&s->authority);
    sp_buf_free(&s->out);
    free(s->in);
    free(s);
    if (h->nstreams == 0 && !h->closed) {
        sp_conn_idle_timer(h->c, true);
        if (h->sweeping) {
            uv_timer_stop(h->sweep);
            h->sweeping = false;
        }
    }
}

/* Resets the stream (its request is over on the client side). */
static void stream_reset(h2s_t *s, uint32_t code)
{
    if (!s->h->closed)
        nghttp2_submit_rst_stream(s->h->s, NGHTTP2_FLAG_NONE, s->id, code);
    h2_flush(s->h);
}

/* ---------------------------------------------------------------- the response */

static ssize_t data_read(nghttp2_session *session, int32_t id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *source, void *ud)
{
    SP_UNUSED(id);
    SP_UNUSED(ud);
    h2s_t *s = source->ptr;
    size_t n = out_pending(s);
    if (n > length)
        n = length;
    if (n) {
        touch(s);
        memcpy(buf, s->out.p + s->out_pos, n);
        s->out_pos += n;
        if (s->out_pos == s->out.len)
            s->out.len = s->out_pos = 0;
        else if (s->out_pos >= 65536 && s->out_pos * 2 >= s->out.len) {
            memmove(s->out.p, s->out.p + s->out_pos, s->out.len - s->out_pos);
            s->out.len -= s->out_pos;
            s->out_pos = 0;
        }
    }
    if (s->up2 && n) {
        s->up_consume += n; /* the sandbox may send as much again (after this send round) */
        s->notify = true;
        s->h->flush_again = true;
    }
    if (s->up_waiting && out_pending(s) * 2 <= (size_t)sp_cfg.h2_stream_buffer) {
        s->notify = true; /* the sandbox may be read again (after this send round) */
        s->h->flush_again = true;
    }
    if (out_pending(s) == 0 && s->out_end) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        s->sent_end = true;
        if (s->has_trailers) {
            /* the sandbox's trailers (grpc-status) end the stream */
            size_t cnt = 0;
            for (size_t i = 0; i < s->trailers.len; i++)
                cnt += s->trailers.p[i] == '\0';
            nghttp2_nv *nv = sp_calloc(cnt / 2 + 1, sizeof *nv);
            size_t k = 0;
            for (size_t i = 0; i < s->trailers.len && k < cnt / 2;) {
                char *nm = s->trailers.p + i;
                size_t nl = strlen(nm);
                char *v = nm + nl + 1;
                size_t vl = strlen(v);
                nv[k++] = (nghttp2_nv){(uint8_t *)nm, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
                i += nl + 1 + vl + 1;
            }
            if (nghttp2_submit_trailer(session, s->id, nv, k) == 0)
                *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            free(nv);
        }
        return (ssize_t)n;
    }
    if (n == 0) {
        s->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

static bool conn_specific(const char *n, size_t l)
{
    return sp_ieq(n, l, "connection") || sp_ieq(n, l, "keep-alive") ||
           sp_ieq(n, l, "proxy-connection") || sp_ieq(n, l, "transfer-encoding") ||
           sp_ieq(n, l, "upgrade") || sp_ieq(n, l, "te");
}

/* Submits the response head given as HTTP/1.1 text (built by upstream.c or server.c: a status
 * line, "Name: value" lines, an empty line). Names are lower-cased in place. */
static int submit_head(h2s_t *s, char *text, size_t len)
{
    if (len < 12 || memcmp(text, "HTTP/1.1 ", 9) != 0)
        return -EINVAL;
    size_t lines = 0;
    for (size_t i = 0; i < len; i++)
        if (text[i] == '\n')
            lines++;
    nghttp2_nv *nv = sp_calloc(lines + 1, sizeof *nv);
    size_t n = 0;
    nv[n++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)text + 9, 7, 3, NGHTTP2_NV_FLAG_NONE};
    char *p = memchr(text, '\n', len);
    char *end = text + len;
    while (p && ++p < end) {
        char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol || eol - p < 2)
            break; /* the empty line */
        char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon) {
            size_t nl = (size_t)(colon - p);
            char *v = colon + 1;
            while (v < eol && *v == ' ')
                v++;
            size_t vl = (size_t)(eol - 1 - v); /* without the CR */
            for (size_t k = 0; k < nl; k++)
                if (p[k] >= 'A' && p[k] <= 'Z')
                    p[k] = (char)(p[k] + 32);
            if (nl && !conn_specific(p, nl))
                nv[n++] = (nghttp2_nv){(uint8_t *)p, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
        }
        p = eol;
    }
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = data_read};
    int rv = nghttp2_submit_response(s->h->s, s->id, nv, n, &prd);
    free(nv);
    if (rv != 0)
        return -EINVAL;
    s->submitted = true;
    return 0;
}

static void resume(h2s_t *s)
{
    if (s->deferred && !s->h->closed) {
        s->deferred = false;
        nghttp2_session_resume_data(s->h->s, s->id);
    }
}

static int h2_send(sp_request_t *r, uv_buf_t *bufs, unsigned n, bool head)
{
    h2s_t *s = r->client;
    sp_h2_t *h = s->h;
    unsigned i = 0;
    if (head) {
        if (submit_head(s, bufs[0].base, bufs[0].len) < 0) {
            sp_log(SP_LOG_WARN, "http2: response head refused", "s:request_id", r->id, NULL);
            r->error = SP_ERR_UPSTREAM_PROTOCOL;
            stream_reset(s, NGHTTP2_INTERNAL_ERROR);
            return UV_EPROTO;
        }
        r->bytes_out += bufs[0].len;
        i = 1;
    }
    for (; i < n; i++) {
        sp_buf_add(&s->out, bufs[i].base, bufs[i].len);
        r->bytes_out += bufs[i].len;
    }
    resume(s);
    h2_flush(h);
    if (h->c->closing || r->client != s)
        return UV_ECONNRESET; /* the stream (and so r) ended meanwhile: s is gone */
    /* beyond the stream's buffer the sandbox is not read until the client takes some */
    if (s->r == r && out_pending(s) > (size_t)sp_cfg.h2_stream_buffer) {
        s->up_waiting = true;
        return 1;
    }
    return 0;
}

static bool h2_busy(const sp_request_t *r) { return ((const h2s_t *)r->client)->up_waiting; }

static void h2_finish(sp_request_t *r)
{
    h2s_t *s = r->client;
    s->out_end = true;
    resume(s);
    h2_flush(s->h);
}

/* True for a gRPC request (content-type application/grpc, +proto, +json...). */
static bool is_grpc(const sp_request_t *r)
{
    size_t n;
    const char *ct = sp_request_header(r, "content-type", 12, &n);
    return ct && n >= 16 && strncasecmp(ct, "application/grpc", 16) == 0 &&
           (n == 16 || ct[16] == '+' || ct[16] == ';');
}

/* The gRPC status for an HTTP status the proxy answers with (the mapping gRPC itself uses for
 * HTTP errors, with the proxy's own cases: 401 UNAUTHENTICATED, 404 NOT_FOUND, 504
 * DEADLINE_EXCEEDED, 429 and 413 RESOURCE_EXHAUSTED). */
static int grpc_status_of(int http)
{
    switch (http) {
    case 400: return 3;  /* INVALID_ARGUMENT */
    case 401: return 16; /* UNAUTHENTICATED */
    case 403: return 7;  /* PERMISSION_DENIED */
    case 404: return 5;  /* NOT_FOUND */
    case 408: return 4;  /* DEADLINE_EXCEEDED */
    case 413:
    case 429: return 8;  /* RESOURCE_EXHAUSTED */
    case 431: return 8;
    case 502:
    case 503: return 14; /* UNAVAILABLE */
    case 504: return 4;  /* DEADLINE_EXCEEDED */
    default: return http >= 500 ? 13 /* INTERNAL */ : 2 /* UNKNOWN */;
    }
}

/* Answers a gRPC request the proxy itself refuses as gRPC does: HTTP 200, a trailers-only
 * response with grpc-status and grpc-message (the JSON error body, percent-encoded). */
static void respond_grpc_error(h2s_t *s)
{
    sp_request_t *r = s->r;
    char code[12], msg[1024];
    snprintf(code, sizeof code, "%d", grpc_status_of(r->status));
    static const char hex[] = "0123456789ABCDEF";
    size_t m = 0;
    for (size_t i = 0; i < r->body.len && m + 3 < sizeof msg; i++) {
        unsigned char ch = (unsigned char)r->body.p[i];
        if (ch >= 0x20 && ch <= 0x7e && ch != '%') {
            msg[m++] = (char)ch;
        } else {
            msg[m++] = '%';
            msg[m++] = hex[ch >> 4];
            msg[m++] = hex[ch & 15];
        }
    }
    nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-status", (uint8_t *)code, 11, strlen(code), NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-message", (uint8_t *)msg, 12, m, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"x-request-id", (uint8_t *)r->id, 12, r->id_len, NGHTTP2_NV_FLAG_NONE},
    };
    r->resp_status = r->status;
    r->resp_head_sent = true;
    s->out_end = s->sent_end = true;
    if (nghttp2_submit_response(s->h->s, s->id, nv, SP_ARRAY_LEN(nv), NULL) != 0)
        stream_reset(s, NGHTTP2_INTERNAL_ERROR);
    h2_flush(s->h);
}

/* Sends the local response in r (status, r->body) on the stream. */
static void respond_local(h2s_t *s)
{
    sp_request_t *r = s->r;
    if (s->forwarding && r->up)
        sp_upstream_abort(r);
    s->forwarding = false;
    if (s->up2)
        up2_release(s->up2);
    /* the body has nowhere to go now: what came is given back, the rest is dropped */
    if (!r->body_buffered) {
        s->discard = true;
        give_back(s, s->in_len - s->inflight);
        s->in_len = s->inflight;
    }
    if (r->status >= 400 && is_grpc(r)) {
        respond_grpc_error(s);
        return;
    }
    sp_request_local_head(r);
    r->resp_status = r->status;
    r->resp_head_sent = true;
    uv_buf_t b[2] = {uv_buf_init(r->out.p, (unsigned)r->out.len),
                     uv_buf_init(r->body.p, (unsigned)r->body.len)};
    unsigned n = (r->method == HTTP_HEAD || r->body.len == 0) ? 1 : 2;
    if (h2_send(r, b, n, true) < 0)
        return;
    if (s->r)
        h2_finish(r);
}

static void h2_fail(sp_request_t *r, int status, const char *msg)
{
    h2s_t *s = r->client;
    if (r->resp_head_sent) {
        stream_reset(s, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    sp_request_error_body(r, status, msg);
    respond_local(s);
}

static void h2_close(sp_request_t *r) { stream_reset(r->client, NGHTTP2_CANCEL); }

/* Forwards the received request body to the sandbox, one write at a time; a stream's window
 * is given back as its bytes leave. */
static void pump_body(h2s_t *s)
{
    if (s->up2) {
        up2_pump(s->up2);
        return;
    }
    sp_request_t *r = s->r;
    if (!r || !s->forwarding || !r->head_sent || r->body_buffered || !r->up || r->up->writing)
        return;
    for (;;) {
        if (s->inflight) {
            give_back(s, s->inflight);
            memmove(s->in, s->in + s->inflight, s->in_len - s->inflight);
            s->in_len -= s->inflight;
            s->inflight = 0;
        }
        if (r->body_done || (s->in_len == 0 && !s->in_end))
            return;
        r->niov = r->nframes = 0;
        size_t n = s->in_len;
        if (r->chunked) {
            if (n) {
                char *f = r->frames[r->nframes++];
                int fl = snprintf(f, 20, "%zx\r\n", n);
                r->iov[r->niov++] = uv_buf_init(f, (unsigned)fl);
                r->iov[r->niov++] = uv_buf_init(s->in, (unsigned)n);
                r->iov[r->niov++] = uv_buf_init("\r\n", 2);
            }
            if (s->in_end)
                r->iov[r->niov++] = uv_buf_init("0\r\n\r\n", 5);
        } else if (n) {
            r->iov[r->niov++] = uv_buf_init(s->in, (unsigned)n);
        }
        if (s->in_end)
            r->body_done = true;
        s->inflight = n;
        if (r->niov == 0)
            return;
        int rc = sp_upstream_write_body(r);
        if (rc != 0 || !s->r)
            return; /* 1: resume_body continues; <0: upstream.c ended the exchange */
    }
}

static void h2_resume_body(sp_request_t *r) { pump_body(r->client); }
static unsigned h2_take_body(sp_request_t *r) { SP_UNUSED(r); return 0; }
static void h2_hold_body(sp_request_t *r) { SP_UNUSED(r); }
static bool h2_last_exchange(const sp_request_t *r) { SP_UNUSED(r); return false; }
static void h2_start_tunnel(sp_request_t *r) { h2_close(r); }

const sp_client_ops_t sp_h2_client_ops = {
    .send = h2_send,
    .busy = h2_busy,
    .finish = h2_finish,
    .fail = h2_fail,
    .close = h2_close,
    .resume_body = h2_resume_body,
    .take_body = h2_take_body,
    .hold_body = h2_hold_body,
    .last_exchange = h2_last_exchange,
    .start_tunnel = h2_start_tunnel,
};

/* ---------------------------------------------------------------- idle streams */

/* A stream that moved no byte either way for h2_stream_idle_timeout: answered 408 (its
 * request body stalled) or 504 (waiting on the sandbox) if nothing was answered yet, else
 * reset with CANCEL; its sandbox stream or connection is cancelled with it. */
static void stream_idle(h2s_t *s)
{
    sp_request_t *r = s->r;
    s->idled = true;
    bool client = !s->in_end || out_pending(s) > 0; /* the client's side stalled */
    sp_log(SP_LOG_INFO, "http2 stream idle timeout", "s:client", s->h->c->peer_ip,
           "s:request_id", r ? r->id : NULL, "s:side", client ? "client" : "sandbox",
           "d:h2_stream_idle_timeout", sp_cfg.h2_stream_idle_timeout, NULL);
    if (!r) {
        stream_reset(s, NGHTTP2_CANCEL);
        return;
    }
    if (r->error == SP_ERR_NONE)
        r->error = client ? SP_ERR_CLIENT_TIMEOUT : SP_ERR_UPSTREAM_IDLE;
    if (r->resp_head_sent || s->reading_body || r->decision == SP_DECIDE_NONE) {
        stream_reset(s, NGHTTP2_CANCEL); /* a waiting script is told by the abort hook */
        return;
    }
    if (!s->in_end)
        sp_request_error_body(r, 408, "request body timeout");
    else
        sp_request_error_body(r, 504, "stream idle timeout");
    respond_local(s);
}

static void on_sweep(uv_timer_t *t)
{
    sp_h2_t *h = t->data;
    if (h->closed || h->c->closing)
        return;
    uint64_t now = uv_now(t->loop);
    uint64_t limit = (uint64_t)(sp_cfg.h2_stream_idle_timeout * 1000.0);
    h->in_recv = true; /* no frames go out (and no stream ends) while the list is walked */
    for (h2s_t *s = h->streams; s; s = s->next) {
        if (!s->headed || s->idled)
            continue;
        if (s->r && s->r->script_busy && !s->reading_body) {
            s->active = now; /* a script deciding (a wake, a lookup) has its own bounds */
            continue;
        }
        if (now - s->active < limit)
            continue;
        stream_idle(s);
        if (h->c->closing)
            return;
    }
    h->in_recv = false;
    h2_flush(h);
}

/* Checks run every quarter of the timeout (between 10 ms and 5 s), while streams are open. */
static void sweep_start(sp_h2_t *h)
{
    if (h->sweeping || !h->sweep)
        return;
    double every = sp_cfg.h2_stream_idle_timeout / 4;
    if (every < 0.01)
        every = 0.01;
    if (every > 5)
        every = 5;
    uint64_t ms = (uint64_t)(every * 1000.0);
    uv_timer_start(h->sweep, on_sweep, ms, ms);
    h->sweeping = true;
}

static void sweep_closed(uv_handle_t *hd) { free(hd); }

/* ---------------------------------------------------------------- deciding */

static void act(h2s_t *s)
{
    sp_request_t *r = s->r;
    touch(s);
    if (s->too_large) {
        sp_request_error_body(r, 413, "request body too large");
        respond_local(s);
        return;
    }
    switch (r->decision) {
    case SP_DECIDE_RESPOND:
        respond_local(s);
        break;
    case SP_DECIDE_FORWARD:
        if (up2_wanted(r)) {
            up2_start(s);
            break;
        }
        s->forwarding = true;
        sp_upstream_start(r);
        break;
    default:
        if (r->error != SP_ERR_SCRIPT) {
            r->error = SP_ERR_SCRIPT;
            SP_STAT_ADD(r->w->stats.script_errors, 1);
            sp_log(SP_LOG_ERROR, "request hook made no decision", "s:request_id", r->id, NULL);
        }
        sp_request_error_body(r, 500, "internal error");
        respond_local(s);
        break;
    }
}

void sp_h2_decided(sp_request_t *r)
{
    h2s_t *s = r->client;
    if (!s || s->r != r) {
        sp_request_maybe_release(r);
        return;
    }
    act(s);
}

int sp_h2_read_body(sp_request_t *r, uint64_t limit)
{
    h2s_t *s = r->client;
    if (!s || s->r != r || r->decision != SP_DECIDE_NONE)
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
    if (s->in_len > limit)
        return -E2BIG;
    sp_buf_add(&r->body, s->in, s->in_len);
    give_back(s, s->in_len);
    s->in_len = 0;
    bool end = s->in_end;
    if (end)
        r->body_buffered = r->body_done = true;
    else
        s->reading_body = true;
    h2_flush(s->h);
    return end ? 1 : 0;
}

static int method_of(const char *m, size_t n)
{
#define XX(num, name, string)                                                                    \
    if (n == sizeof #string - 1 && memcmp(m, #string, n) == 0)                                   \
        return num;
    HTTP_METHOD_MAP(XX)
#undef XX
    return -1;
}

static void add_header(sp_request_t *r, const char *n, size_t nl, const char *v, size_t vl)
{
    if (r->nhdrs == r->hdrs_cap) {
        r->hdrs_cap = r->hdrs_cap ? r->hdrs_cap * 2 : 16;
        r->hdrs = sp_realloc(r->hdrs, r->hdrs_cap * sizeof *r->hdrs);
    }
    sp_hdr_t *hd = &r->hdrs[r->nhdrs++];
    hd->name_off = (uint32_t)r->head.len;
    hd->name_len = (uint32_t)nl;
    sp_buf_add(&r->head, n, nl);
    hd->value_off = (uint32_t)r->head.len;
    hd->value_len = (uint32_t)vl;
    sp_buf_add(&r->head, v, vl);
}

/* HTTP/2 clients may split Cookie into one field per cookie; an HTTP/1.1 sandbox gets them as
 * one header, joined with "; " (RFC 9113 8.2.3). */
static void merge_cookies(sp_request_t *r)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < r->nhdrs; i++)
        n += sp_ieq(r->head.p + r->hdrs[i].name_off, r->hdrs[i].name_len, "cookie");
    if (n < 2)
        return;
    sp_buf_t v = {0};
    uint32_t k = 0;
    for (uint32_t i = 0; i < r->nhdrs; i++) {
        const sp_hdr_t *h = &r->hdrs[i];
        if (sp_ieq(r->head.p + h->name_off, h->name_len, "cookie")) {
            if (v.len)
                sp_buf_lit(&v, "; ");
            sp_buf_add(&v, r->head.p + h->value_off, h->value_len);
        } else {
            r->hdrs[k++] = *h;
        }
    }
    r->nhdrs = k;
    add_header(r, "cookie", 6, v.p, v.len);
    sp_buf_free(&v);
}

/* The request head is complete: the same checks and the same hook as an HTTP/1.1 request. */
static void head_done(h2s_t *s, bool end_stream)
{
    sp_request_t *r = s->r;
    sp_h2_t *h = s->h;
    s->headed = true;
    if (h->nstreams++ == 0) {
        sp_conn_idle_timer(h->c, false);
        sweep_start(h);
    }
    touch(s);
    r->t_head = uv_hrtime();
    if (!s->has_host && s->authority.len && !s->bad)
        add_header(r, "host", 4, s->authority.p, s->authority.len);
    merge_cookies(r);
    sp_buf_free(&s->authority);
    r->path_len = r->url_len;
    for (uint32_t i = 0; i < r->url_len; i++)
        if (r->head.p[i] == '?') {
            r->path_len = i;
            break;
        }
    int m = method_of(s->method, s->mlen);
    r->method = (uint8_t)(m < 0 ? HTTP_GET : m);
    r->has_body = !end_stream;
    s->in_end = end_stream;
    r->body_done = end_stream;
    size_t cl_len;
    const char *cl = sp_request_header(r, "content-length", 14, &cl_len);
    if (cl) {
        uint64_t v = 0;
        for (size_t i = 0; i < cl_len && cl[i] >= '0' && cl[i] <= '9'; i++)
            v = v * 10 + (uint64_t)(cl[i] - '0');
        r->content_length = v;
    }
    r->chunked = r->has_body && !cl;
    const char *bad = s->bad_msg;
    int status = s->bad;
    if (!status && m < 0)
        status = 400, bad = "malformed request: unknown method";
    if (!status && (m == HTTP_CONNECT || r->url_len == 0 || r->head.p[0] != '/'))
        status = 400, bad = "bad request target: expected /{user}/{sandbox}/{path}";
    if (!status && sp_cfg.max_body_size > 0 &&
        (double)r->content_length > sp_cfg.max_body_size) {
        r->error = SP_ERR_BODY_TOO_LARGE;
        status = 413, bad = "request body too large";
    }
    if (status) {
        sp_log(SP_LOG_INFO, "bad request", "s:client", r->client_ip, "i:status", (int64_t)status,
               "s:reason", bad, "s:protocol", "h2", NULL);
        SP_STAT_ADD(r->w->stats.parse_errors, 1);
        sp_request_error_body(r, status, bad);
        respond_local(s);
        return;
    }
    r->script_busy = true;
    int decided = r->w->hooks->request(r);
    if (decided) {
        r->script_busy = false;
        if (r->client == s) /* else the stream ended meanwhile and let go of r */
            act(s);
        else
            sp_request_maybe_release(r);
    }
}

static void body_ended(h2s_t *s)
{
    s->in_end = true;
    sp_request_t *r = s->r;
    if (!r)
        return;
    if (s->reading_body) {
        s->reading_body = false;
        r->body_buffered = r->body_done = true;
        r->w->hooks->body_ready(r, 0);
        return;
    }
    s->h->pump = true;
}

/* ---------------------------------------------------------------- nghttp2 callbacks */

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    sp_h2_t *h = ud;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    sp_conn_t *c = h->c;
    h2s_t *s = sp_calloc(1, sizeof *s);
    s->h = h;
    s->id = frame->hd.stream_id;
    s->next = h->streams;
    if (h->streams)
        h->streams->prev = s;
    h->streams = s;
    h->nopen++;
    nghttp2_session_set_stream_user_data(session, s->id, s);
    sp_request_t *r = sp_request_acquire(c->w);
    s->r = r;
    r->client = s;
    r->cops = &sp_h2_client_ops;
    r->vmajor = 2;
    r->vminor = 0;
    r->keepalive = true;
    memcpy(r->client_ip, c->peer_ip, sizeof c->peer_ip);
    r->client_port = c->peer_port;
    r->listener = c->listener->name;
    return 0;
}

static void mark_bad(h2s_t *s, int status, const char *msg)
{
    if (!s->bad) {
        s->bad = status;
        s->bad_msg = msg;
    }
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud)
{
    SP_UNUSED(flags);
    SP_UNUSED(ud);
    h2s_t *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (!s || !s->r || frame->hd.type != NGHTTP2_HEADERS ||
        frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* trailers are not relayed to an HTTP/1.1 sandbox */
    sp_request_t *r = s->r;
    const char *n = (const char *)name, *v = (const char *)value;
    s->hdr_bytes += (uint32_t)(namelen + valuelen + 4);
    if (s->hdr_bytes > (uint32_t)sp_cfg.max_header_size)
        mark_bad(s, 431, "request header fields too large");
    if (s->bad)
        return 0;
    if (namelen && n[0] == ':') {
        if (sp_ieq(n, namelen, ":method")) {
            if (valuelen >= sizeof s->method)
                mark_bad(s, 400, "malformed request: unknown method");
            else {
                memcpy(s->method, v, valuelen);
                s->mlen = (uint8_t)valuelen;
            }
        } else if (sp_ieq(n, namelen, ":path")) {
            if (valuelen > (size_t)sp_cfg.max_url_size)
                mark_bad(s, 414, "request target too long");
            else if (r->head.len == 0) {
                sp_buf_add(&r->head, v, valuelen);
                r->url_len = (uint32_t)valuelen;
            }
        } else if (sp_ieq(n, namelen, ":authority")) {
            s->authority.len = 0;
            sp_buf_add(&s->authority, v, valuelen);
        }
        return 0;
    }
    if (r->nhdrs >= (uint32_t)sp_cfg.max_headers) {
        mark_bad(s, 431, "too many request headers");
        return 0;
    }
    if (sp_ieq(n, namelen, "host"))
        s->has_host = true;
    add_header(r, n, namelen, v, valuelen);
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
    SP_UNUSED(flags);
    sp_h2_t *h = ud;
    h2s_t *s = nghttp2_session_get_stream_user_data(session, id);
    sp_request_t *r = s ? s->r : NULL;
    if (s)
        touch(s);
    if (!r || s->discard) {
        nghttp2_session_consume(session, id, len);
        return 0;
    }
    r->body_bytes += len;
    r->bytes_in += len;
    if (sp_cfg.max_body_size > 0 && (double)r->body_bytes > sp_cfg.max_body_size) {
        nghttp2_session_consume(session, id, len);
        r->error = SP_ERR_BODY_TOO_LARGE;
        if (s->reading_body) {
            s->reading_body = false;
            s->discard = true;
            r->body.len = 0;
            r->w->hooks->body_ready(r, -E2BIG);
        } else if (r->decision == SP_DECIDE_NONE) {
            s->too_large = s->discard = true; /* answered 413 once the script has decided */
        } else if (!r->resp_head_sent) {
            h2_fail(r, 413, "request body too large");
        } else {
            s->discard = true;
            stream_reset(s, NGHTTP2_CANCEL);
        }
        return 0;
    }
    if (s->reading_body) {
        nghttp2_session_consume(session, id, len);
        if (r->body.len + len > r->body_limit) {
            s->reading_body = false;
            s->discard = true;
            r->body.len = 0;
            r->w->hooks->body_ready(r, -E2BIG);
            return 0;
        }
        sp_buf_add(&r->body, data, len);
        return 0;
    }
    if (s->in_len + len > s->in_cap) {
        /* never more than the stream's window is held; grow only while no write uses it */
        size_t want = (size_t)sp_cfg.h2_stream_window;
        if (s->inflight || s->in_len + len > want) {
            nghttp2_session_consume(session, id, len);
            stream_reset(s, NGHTTP2_FLOW_CONTROL_ERROR);
            return 0;
        }
        s->in = sp_realloc(s->in, want);
        s->in_cap = want;
    }
    memcpy(s->in + s->in_len, data, len);
    s->in_len += len;
    h->pump = true;
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    SP_UNUSED(ud);
    h2s_t *s;
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        if (!s || !s->r)
            break;
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST)
            head_done(s, (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0);
        else if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
            body_ended(s); /* after trailers */
        break;
    case NGHTTP2_DATA:
        s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
        if (s && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
            body_ended(s);
        break;
    default:
        break;
    }
    return 0;
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    SP_UNUSED(ud);
    if ((frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    h2s_t *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    /* the response is complete while the client still sends its body: stop it (RFC 9113 8.1) */
    if (s && !s->in_end)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t id, uint32_t code, void *ud)
{
    SP_UNUSED(code);
    SP_UNUSED(ud);
    h2s_t *s = nghttp2_session_get_stream_user_data(session, id);
    if (s)
        stream_free(s);
    return 0;
}

/* ---------------------------------------------------------------- the connection */

static void on_h2_written(uv_write_t *wr, int status)
{
    sp_conn_t *c = wr->data;
    sp_conn_write_done(c);
    if (c->closing || !c->h2)
        return;
    sp_h2_t *h = c->h2;
    h->writing = false;
    if (status < 0) {
        sp_conn_close(c);
        return;
    }
    if (h->nstreams == 0)
        sp_conn_idle_timer(c, true);
    h2_flush(h);
}

/* Streams whose sandbox waits for room: continue them. */
static void notify_streams(sp_h2_t *h)
{
    for (h2s_t *s = h->streams; s; s = s->next) {
        if (!s->notify)
            continue;
        s->notify = false;
        if (s->up2 && s->up_consume) {
            size_t n = s->up_consume;
            s->up_consume = 0;
            up2_consumed(s->up2, n);
        }
        if (!s->r || !s->up_waiting)
            continue;
        s->up_waiting = false;
        sp_upstream_client_written(s->r);
        if (h->c->closing)
            return;
    }
}

/* Writes what nghttp2 has to send, one socket write at a time; closes the connection once the
 * session is over (GOAWAY sent and no stream left, or a fatal error). */
static void h2_flush(sp_h2_t *h)
{
    if (h->closed || h->in_recv)
        return;
    if (h->flushing) {
        h->flush_again = true;
        return;
    }
    h->flushing = true;
    sp_conn_t *c = h->c;
    do {
        h->flush_again = false;
        if (h->give_back) {
            nghttp2_session_consume_connection(h->s, h->give_back);
            h->give_back = 0;
        }
        if (h->writing)
            break;
        h->wbuf.len = 0;
        while (h->wbuf.len < WRITE_CHUNK) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(h->s, &data);
            if (n < 0) {
                sp_log(SP_LOG_WARN, "http2 session error", "s:client", c->peer_ip, "s:error",
                       nghttp2_strerror((int)n), NULL);
                h->flushing = false;
                sp_conn_close(c);
                return;
            }
            if (n == 0)
                break;
            sp_buf_add(&h->wbuf, data, (size_t)n);
        }
        notify_streams(h);
        if (c->closing)
            return;
        if (h->wbuf.len) {
            uv_buf_t b = uv_buf_init(h->wbuf.p, (unsigned)h->wbuf.len);
            int rc = sp_conn_write(c, &b, 1, on_h2_written);
            if (rc < 0) {
                h->flushing = false;
                sp_conn_close(c);
                return;
            }
            if (rc == 1) {
                h->writing = true;
                break;
            }
            h->flush_again = true;
        }
    } while (h->flush_again && !c->closing);
    h->flushing = false;
    if (c->closing || h->writing)
        return;
    bool over = !nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s);
    if (over || ((h->goaway || h->dead) && h->nopen == 0))
        sp_conn_close(c);
}

void sp_h2_input(sp_conn_t *c)
{
    sp_h2_t *h = c->h2;
    if (!h || h->closed)
        return;
    if (c->rbuf && c->rpos < c->rlen) {
        h->in_recv = true;
        ssize_t n = nghttp2_session_mem_recv(h->s, (const uint8_t *)c->rbuf + c->rpos,
                                             c->rlen - c->rpos);
        h->in_recv = false;
        if (c->closing)
            return;
        c->rpos = c->rlen = 0;
        if (n < 0) {
            sp_log(SP_LOG_WARN, "http2 connection error", "s:client", c->peer_ip, "s:error",
                   nghttp2_strerror((int)n), NULL);
            h->dead = true;
            if (n != NGHTTP2_ERR_BAD_CLIENT_MAGIC)
                nghttp2_session_terminate_session(h->s, n == NGHTTP2_ERR_FLOODED
                                                            ? NGHTTP2_ENHANCE_YOUR_CALM
                                                            : NGHTTP2_PROTOCOL_ERROR);
            else {
                sp_conn_close(c);
                return;
            }
        }
    }
    if (h->pump) {
        h->pump = false;
        h->in_recv = true; /* no frames go out (and no stream ends) while the list is walked */
        for (h2s_t *s = h->streams; s; s = s->next) {
            pump_body(s);
            if (c->closing)
                return;
        }
        h->in_recv = false;
    }
    h2_flush(h);
    if (!c->closing && !h->dead)
        sp_conn_read_start(c);
}

int sp_h2_start(sp_conn_t *c)
{
    sp_h2_t *h = sp_calloc(1, sizeof *h);
    h->c = c;
    nghttp2_session_callbacks *cb;
    if (nghttp2_session_callbacks_new(&cb) != 0) {
        free(h);
        return -ENOMEM;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_option *opt;
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cb);
        free(h);
        return -ENOMEM;
    }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, (size_t)sp_cfg.h2_max_outbound_ack);
    nghttp2_option_set_max_settings(opt, (size_t)sp_cfg.h2_max_settings);
    nghttp2_option_set_stream_reset_rate_limit(opt, (uint64_t)sp_cfg.h2_reset_burst,
                                               (uint64_t)sp_cfg.h2_reset_rate);
    nghttp2_option_set_max_continuations(opt, (size_t)sp_cfg.h2_max_continuations);
    int rv = nghttp2_session_server_new2(&h->s, cb, h, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0) {
        free(h);
        return -ENOMEM;
    }
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, (uint32_t)sp_cfg.h2_max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (uint32_t)sp_cfg.h2_stream_window},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)sp_cfg.max_header_size},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, SP_ARRAY_LEN(iv));
    if (sp_cfg.h2_connection_window > 65535)
        nghttp2_session_set_local_window_size(h->s, NGHTTP2_FLAG_NONE, 0,
                                              sp_cfg.h2_connection_window);
    h->sweep = sp_malloc(sizeof *h->sweep);
    uv_timer_init(&c->w->loop, h->sweep);
    h->sweep->data = h;
    c->h2 = h;
    sp_conn_idle_timer(c, true);
    return 0;
}

void sp_h2_closed(sp_conn_t *c)
{
    sp_h2_t *h = c->h2;
    if (!h || h->closed)
        return;
    h->closed = true;
    if (h->sweep) {
        uv_close((uv_handle_t *)h->sweep, sweep_closed);
        h->sweep = NULL;
    }
    while (h->streams)
        stream_free(h->streams);
    nghttp2_session_del(h->s);
    h->s = NULL;
    sp_buf_free(&h->wbuf); /* a pending write is cancelled with the handle: nothing reads it */
}

void sp_h2_drain(sp_conn_t *c)
{
    sp_h2_t *h = c->h2;
    if (!h || h->closed || c->closing)
        return;
    if (!h->goaway) {
        h->goaway = true;
        nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h->s),
                              NGHTTP2_NO_ERROR, NULL, 0);
    }
    h2_flush(h);
}

/* ---------------------------------------------------------------- h2c towards the sandbox */

/*
 * A gRPC request (content-type application/grpc...) from an HTTP/2 client is relayed to the
 * sandbox over h2c, frames relayed both ways with flow control end to end (the client's request
 * body is given back to its window as the sandbox's window takes it; the sandbox may send at
 * most h2_stream_buffer bytes the client has not taken), trailers relayed, a client reset
 * cancels the sandbox's stream, grpc-timeout bounds the call, and failures become gRPC errors
 * (UNAVAILABLE, DEADLINE_EXCEEDED).
 *
 * Connections to a sandbox address are shared: a call goes on a stream of an open connection
 * to the same host and port (streams from any client connection of the worker, up to
 * h2_max_concurrent_streams and the sandbox's own SETTINGS_MAX_CONCURRENT_STREAMS), or opens a
 * new one; calls waiting for its connect are submitted once it is up. A connection without
 * streams is kept for upstream_keepalive_timeout, then closed; one the sandbox closes or sends
 * GOAWAY on takes no new streams. Its connection window is the sum of its streams' windows, so
 * a stream whose client reads slowly never holds back the others.
 */
typedef struct up2c up2c_t;

struct up2c {
    sp_worker_t *w;
    uv_tcp_t tcp;
    uv_timer_t timer;       /* the connect timeout, then (no stream) the keep-alive timeout */
    uv_getaddrinfo_t gai;   /* resolving the sandbox's name (a serviceFQDN) */
    uv_connect_t creq;
    uv_write_t wreq;
    nghttp2_session *s;     /* once connected */
    sp_buf_t wbuf;
    char *rbuf;
    sp_buf_t dirty;         /* client sessions (sp_h2_t *) to flush after a read */
    char host[256];         /* the key: the address as routed, and the port */
    int port;
    up2_t *streams;         /* its calls, submitted or waiting for the connect */
    uint32_t nstreams;
    int handles;            /* the two handles, and the name lookup while it runs */
    bool resolving, connected, in_recv, flushing, flush_again, writing, closing;
    bool goaway;            /* takes no new streams (GOAWAY, an error): closes once empty */
    up2c_t *next, *prev;    /* the worker's connections */
};

struct up2 {
    up2c_t *conn;           /* NULL once the sandbox's stream is over */
    h2s_t *cs;              /* the client stream; NULL once it let go */
    uv_timer_t timer;       /* waiting for the connection, then first byte or grpc-timeout */
    int32_t sid;            /* 0 until submitted */
    size_t unconsumed;      /* DATA received and not yet given back to the sandbox */
    sp_buf_t hdrs;          /* the response head, "name\0value\0" */
    uint64_t deadline;      /* uv_hrtime when the call's grpc-timeout runs out, 0: none */
    bool got_head, ended, closing;
    up2_t *next, *prev;
};

#define UP2_RBUF 16384

static void up2c_flush(up2c_t *c);
static void up2_submit(up2_t *up);

static up2c_t **up2c_list(sp_worker_t *w) { return (up2c_t **)&w->h2up; }

/* ---- the connection */

/* The client sessions a read touched are flushed once the read is over. */
static void up2c_dirty(up2c_t *c, h2s_t *cs)
{
    sp_h2_t *h = cs->h;
    if (h->up_dirty)
        return;
    h->up_dirty = true;
    sp_buf_add(&c->dirty, &h, sizeof h);
}

static void up2c_flush_clients(up2c_t *c)
{
    while (c->dirty.len >= sizeof(sp_h2_t *)) {
        sp_h2_t *h;
        c->dirty.len -= sizeof h;
        memcpy(&h, c->dirty.p + c->dirty.len, sizeof h);
        h->up_dirty = false;
        if (!h->closed)
            h2_flush(h);
    }
}


static void up2c_unref(up2c_t *c)
{
    if (--c->handles > 0)
        return;
    sp_buf_free(&c->wbuf);
    sp_buf_free(&c->dirty);
    free(c->rbuf);
    free(c);
}

static void up2c_handle_closed(uv_handle_t *hd) { up2c_unref(hd->data); }

/* Closes a connection that has no stream left. */
static void up2c_close(up2c_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    up2c_flush_clients(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        *up2c_list(c->w) = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->resolving)
        uv_cancel((uv_req_t *)&c->gai); /* its callback still runs and drops its reference */
    if (c->s) {
        nghttp2_session_del(c->s);
        c->s = NULL;
    }
    uv_close((uv_handle_t *)&c->tcp, up2c_handle_closed);
    uv_close((uv_handle_t *)&c->timer, up2c_handle_closed);
}

static void up2c_on_timer(uv_timer_t *t);

/* The connection lost its last stream: kept for reuse, or closed if it takes no more. */
static void up2c_idle(up2c_t *c)
{
    if (c->closing || c->nstreams)
        return;
    if (c->goaway || !c->connected) {
        if (!c->in_recv && !c->flushing && !c->writing)
            up2c_close(c);
        return;
    }
    uint64_t ms = (uint64_t)(sp_cfg.upstream_keepalive_timeout * 1000.0);
    uv_timer_start(&c->timer, up2c_on_timer, ms ? ms : 1, 0);
}

/* ---- one call */

static void up2_handle_closed(uv_handle_t *hd)
{
    up2_t *up = hd->data;
    sp_buf_free(&up->hdrs);
    free(up);
}

/* The sandbox's stream is over (or never started): off its connection; what it received and
 * the client has not taken goes back to the connection's window now. */
static void up2_detach(up2_t *up)
{
    up2c_t *c = up->conn;
    if (!c)
        return;
    up->conn = NULL;
    if (up->prev)
        up->prev->next = up->next;
    else
        c->streams = up->next;
    if (up->next)
        up->next->prev = up->prev;
    up->next = up->prev = NULL;
    c->nstreams--;
    if (c->s && up->sid > 0) {
        nghttp2_session_set_stream_user_data(c->s, up->sid, NULL);
        if (up->unconsumed)
            nghttp2_session_consume_connection(c->s, up->unconsumed);
    }
    up->unconsumed = 0;
    up2c_idle(c);
}

/* The client side lets go: the sandbox's stream is reset (cancelled); the connection stays for
 * the other calls. */
static void up2_release(up2_t *up)
{
    if (up->cs) {
        up->cs->up2 = NULL;
        up->cs = NULL;
    }
    if (up->closing)
        return;
    up->closing = true;
    up2c_t *c = up->conn;
    if (c && c->s && up->sid > 0 && nghttp2_session_find_stream(c->s, up->sid))
        nghttp2_submit_rst_stream(c->s, NGHTTP2_FLAG_NONE, up->sid,
                                  up->ended ? NGHTTP2_NO_ERROR : NGHTTP2_CANCEL);
    up2_detach(up);
    uv_close((uv_handle_t *)&up->timer, up2_handle_closed);
    if (c && !c->closing)
        up2c_flush(c); /* the RST goes out (after the current read, inside one) */
}

/* The call failed: a gRPC error (status) when nothing was answered yet, else the client stream
 * is reset. */
static void up2_fail(up2_t *up, sp_error_t err, int status, const char *msg)
{
    h2s_t *cs = up->cs;
    up2_release(up);
    if (!cs || !cs->r)
        return;
    sp_request_t *r = cs->r;
    if (r->error == SP_ERR_NONE)
        r->error = err;
    sp_log(SP_LOG_WARN, "upstream error", "s:request_id", r->id, "s:upstream", r->upstream_addr,
           "s:error", msg, "s:protocol", "h2c", NULL);
    if (!r->resp_head_sent) {
        sp_request_error_body(r, status, msg);
        respond_local(cs);
    } else {
        stream_reset(cs, NGHTTP2_INTERNAL_ERROR);
    }
}

/* The connection failed: every call on it fails, and it closes. */
static void up2c_fail(up2c_t *c, sp_error_t err, int status, const char *msg)
{
    c->goaway = true;
    while (c->streams)
        up2_fail(c->streams, err, status, msg);
    if (!c->closing)
        up2c_close(c);
}

static void up2c_on_timer(uv_timer_t *t)
{
    up2c_t *c = t->data;
    if (c->closing)
        return;
    if (!c->connected)
        up2c_fail(c, SP_ERR_CONNECT_TIMEOUT, 504, "upstream connect timeout");
    else if (!c->nstreams)
        up2c_close(c); /* kept for upstream_keepalive_timeout without a call */
}

static void up2_on_timer(uv_timer_t *t)
{
    up2_t *up = t->data;
    if (up->closing)
        return;
    bool late = up->deadline && uv_hrtime() + 1000000 >= up->deadline;
    if (late)
        up2_fail(up, SP_ERR_FIRST_BYTE_TIMEOUT, 504, "deadline exceeded (grpc-timeout)");
    else if (up->sid <= 0)
        up2_fail(up, SP_ERR_CONNECT_TIMEOUT, 504, "upstream connect timeout");
    else
        up2_fail(up, SP_ERR_FIRST_BYTE_TIMEOUT, 504, "upstream first byte timeout");
}

static void up2c_on_written(uv_write_t *wr, int status)
{
    up2c_t *c = wr->data;
    c->writing = false;
    if (c->closing)
        return;
    if (status < 0) {
        up2c_fail(c, SP_ERR_UPSTREAM_CLOSED, 502, "upstream closed connection");
        return;
    }
    up2c_flush(c);
}

static void up2c_flush(up2c_t *c)
{
    if (c->closing || c->in_recv || !c->s)
        return;
    if (c->flushing) {
        c->flush_again = true;
        return;
    }
    c->flushing = true;
    do {
        c->flush_again = false;
        if (c->writing)
            break;
        c->wbuf.len = 0;
        while (c->wbuf.len < WRITE_CHUNK) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(c->s, &data);
            if (n <= 0)
                break;
            sp_buf_add(&c->wbuf, data, (size_t)n);
        }
        if (!c->wbuf.len)
            break;
        uv_buf_t b = uv_buf_init(c->wbuf.p, (unsigned)c->wbuf.len);
        int w = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (w == UV_EAGAIN || w == UV_ENOSYS)
            w = 0;
        if (w < 0) {
            c->flushing = false;
            up2c_fail(c, SP_ERR_UPSTREAM_CLOSED, 502, "upstream closed connection");
            return;
        }
        if ((size_t)w < b.len) {
            b.base += w;
            b.len -= (unsigned)w;
            c->wreq.data = c;
            if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, up2c_on_written) < 0) {
                c->flushing = false;
                up2c_fail(c, SP_ERR_UPSTREAM_CLOSED, 502, "upstream closed connection");
                return;
            }
            c->writing = true;
            break;
        }
        c->flush_again = true;
    } while (c->flush_again && !c->closing);
    c->flushing = false;
    if (!c->closing && !c->writing && !c->nstreams && (c->goaway || !c->connected))
        up2c_close(c);
    up2c_flush_clients(c); /* a stream nghttp2 closed while sending */
}

/* The client took n bytes of this call's response: the sandbox may send as much again. */
static void up2_consumed(up2_t *up, size_t n)
{
    up2c_t *c = up->conn;
    if (!c || c->closing || !c->s || up->sid <= 0)
        return;
    if (n > up->unconsumed)
        n = up->unconsumed;
    up->unconsumed -= n;
    nghttp2_session_consume(c->s, up->sid, n);
    up2c_flush(c);
}

static void up2_pump(up2_t *up)
{
    up2c_t *c = up->conn;
    if (!c || c->closing || !c->s || up->sid <= 0)
        return;
    nghttp2_session_resume_data(c->s, up->sid);
    up2c_flush(c);
}

/* The request body for the sandbox: taken from the client stream's buffer, which gives the
 * client its window back. */
static ssize_t up2_body_read(nghttp2_session *session, int32_t id, uint8_t *buf, size_t length,
                             uint32_t *flags, nghttp2_data_source *source, void *ud)
{
    SP_UNUSED(source);
    SP_UNUSED(ud);
    up2_t *up = nghttp2_session_get_stream_user_data(session, id);
    h2s_t *cs = up ? up->cs : NULL;
    if (!cs || !cs->r)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* the call is over: reset, never ended */
    size_t n = cs->in_len < length ? cs->in_len : length;
    if (n) {
        memcpy(buf, cs->in, n);
        memmove(cs->in, cs->in + n, cs->in_len - n);
        cs->in_len -= n;
        give_back(cs, n);
        cs->h->flush_again = true;
        cs->r->body_forwarded += n;
        up2c_dirty(up->conn, cs); /* its WINDOW_UPDATE goes out after this send round */
    }
    if (cs->in_end && cs->in_len == 0) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        cs->r->body_done = true;
        return (ssize_t)n;
    }
    return n ? (ssize_t)n : NGHTTP2_ERR_DEFERRED;
}

static int up2_on_header(nghttp2_session *session, const nghttp2_frame *frame,
                         const uint8_t *name, size_t namelen, const uint8_t *value,
                         size_t valuelen, uint8_t flags, void *ud)
{
    SP_UNUSED(flags);
    SP_UNUSED(ud);
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    up2_t *up = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (!up || !up->cs)
        return 0;
    const char *n = (const char *)name;
    if (conn_specific(n, namelen))
        return 0;
    sp_buf_t *b = frame->headers.cat == NGHTTP2_HCAT_HEADERS ? &up->cs->trailers : &up->hdrs;
    sp_buf_add(b, name, namelen);
    sp_buf_addc(b, '\0');
    sp_buf_add(b, value, valuelen);
    sp_buf_addc(b, '\0');
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE && namelen == 7 &&
        memcmp(name, ":status", 7) == 0) {
        int st = 0;
        for (size_t i = 0; i < valuelen; i++)
            st = st * 10 + (value[i] - '0');
        if (up->cs->r)
            up->cs->r->resp_status = st;
    }
    return 0;
}

/* Submits the sandbox's response head (up->hdrs) on the client stream. */
static void up2_head(up2_t *up, bool end_stream)
{
    h2s_t *cs = up->cs;
    sp_request_t *r = cs->r;
    size_t cnt = 1;
    for (size_t i = 0; i < up->hdrs.len; i++)
        cnt += up->hdrs.p[i] == '\0';
    nghttp2_nv *nv = sp_calloc(cnt / 2 + 2, sizeof *nv);
    size_t k = 0;
    for (size_t i = 0; i < up->hdrs.len;) {
        char *nm = up->hdrs.p + i;
        size_t nl = strlen(nm);
        char *v = nm + nl + 1;
        size_t vl = strlen(v);
        if (!(nl == 12 && memcmp(nm, "x-request-id", 12) == 0))
            nv[k++] = (nghttp2_nv){(uint8_t *)nm, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
        i += nl + 1 + vl + 1;
    }
    nv[k++] = (nghttp2_nv){(uint8_t *)"x-request-id", (uint8_t *)r->id, 12, r->id_len,
                           NGHTTP2_NV_FLAG_NONE};
    nghttp2_data_provider prd = {.source.ptr = cs, .read_callback = data_read};
    r->t_first_byte = uv_hrtime();
    r->resp_head_sent = true;
    touch(cs);
    int rv = nghttp2_submit_response(cs->h->s, cs->id, nv, k, end_stream ? NULL : &prd);
    free(nv);
    if (rv != 0) {
        stream_reset(cs, NGHTTP2_INTERNAL_ERROR);
        return;
    }
    cs->submitted = true;
    if (end_stream)
        cs->out_end = cs->sent_end = true;
}

static int up2_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    up2c_t *c = ud;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        c->goaway = true; /* the streams it did not take are closed with REFUSED_STREAM */
        return 0;
    }
    up2_t *up = frame->hd.stream_id ? nghttp2_session_get_stream_user_data(session,
                                                                           frame->hd.stream_id)
                                    : NULL;
    h2s_t *cs = up ? up->cs : NULL;
    if (!cs || !cs->r)
        return 0;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (frame->hd.type == NGHTTP2_HEADERS) {
        if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
            const char *st = up->hdrs.len > 8 ? up->hdrs.p + 8 : "";
            if (st[0] == '1')
                up->hdrs.len = 0; /* an interim response: the real one follows */
            else {
                up->got_head = true;
                if (!up->deadline)
                    uv_timer_stop(&up->timer); /* the first-byte timeout; a deadline stays */
                up2_head(up, end);
            }
        } else if (end) {
            cs->has_trailers = true;
            cs->out_end = true;
            resume(cs);
        }
        up2c_dirty(c, cs);
    } else if (frame->hd.type == NGHTTP2_DATA && end) {
        cs->out_end = true;
        resume(cs);
        up2c_dirty(c, cs);
    }
    if (end)
        up->ended = true;
    return 0;
}

static int up2_on_data(nghttp2_session *session, uint8_t flags, int32_t id, const uint8_t *data,
                       size_t len, void *ud)
{
    SP_UNUSED(flags);
    up2c_t *c = ud;
    up2_t *up = nghttp2_session_get_stream_user_data(session, id);
    h2s_t *cs = up ? up->cs : NULL;
    if (!cs || !cs->r || !cs->submitted) {
        nghttp2_session_consume(session, id, len);
        return 0;
    }
    sp_buf_add(&cs->out, data, len); /* consumed as the client takes it (data_read) */
    up->unconsumed += len;
    cs->r->bytes_out += len;
    resume(cs);
    up2c_dirty(c, cs);
    return 0;
}

static int up2_on_stream_close(nghttp2_session *session, int32_t id, uint32_t code, void *ud)
{
    up2c_t *c = ud;
    up2_t *up = nghttp2_session_get_stream_user_data(session, id);
    if (!up)
        return 0;
    h2s_t *cs = up->cs;
    bool ok = up->ended && code == NGHTTP2_NO_ERROR;
    if (!up->deadline || ok)
        uv_timer_stop(&up->timer);
    up2_detach(up); /* the stream is over: the connection serves others */
    if (cs && cs->r && !ok) {
        up2c_dirty(c, cs);
        if (!cs->r->resp_head_sent) {
            sp_request_t *r = cs->r;
            if (r->error == SP_ERR_NONE)
                r->error = SP_ERR_UPSTREAM_CLOSED;
            up2_release(up);
            sp_request_error_body(r, 502, code == NGHTTP2_REFUSED_STREAM
                                              ? "upstream refused the stream"
                                              : "upstream reset the stream");
            respond_local(cs);
        } else {
            up2_release(up);
            stream_reset(cs, code == NGHTTP2_NO_ERROR ? NGHTTP2_INTERNAL_ERROR : code);
        }
    }
    return 0;
}

static void up2c_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf)
{
    SP_UNUSED(suggested);
    up2c_t *c = hd->data;
    if (!c->rbuf)
        c->rbuf = sp_malloc(UP2_RBUF);
    *buf = uv_buf_init(c->rbuf, UP2_RBUF);
}

static void up2c_on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    up2c_t *c = st->data;
    if (c->closing || nread == 0)
        return;
    if (nread < 0) {
        if (!c->nstreams) {
            up2c_close(c); /* the sandbox closed an idle connection */
            return;
        }
        up2c_fail(c, SP_ERR_UPSTREAM_CLOSED, 502, "upstream closed connection");
        return;
    }
    c->in_recv = true;
    ssize_t n = nghttp2_session_mem_recv(c->s, (const uint8_t *)buf->base, (size_t)nread);
    c->in_recv = false;
    if (n < 0) {
        up2c_flush_clients(c);
        up2c_fail(c, SP_ERR_UPSTREAM_PROTOCOL, 502, "bad HTTP/2 from the sandbox");
        return;
    }
    up2c_flush(c);
    if (!c->closing && !c->nstreams && (c->goaway || !nghttp2_session_want_read(c->s)))
        up2c_close(c);
    up2c_flush_clients(c); /* may end calls, never free c: its memory goes with its handles */
}

static void up2_add(sp_buf_t *b, const char *n, size_t nl, const char *v, size_t vl)
{
    for (size_t i = 0; i < nl; i++)
        sp_buf_addc(b, (n[i] >= 'A' && n[i] <= 'Z') ? (char)(n[i] + 32) : n[i]);
    sp_buf_addc(b, '\0');
    sp_buf_add(b, v, vl);
    sp_buf_addc(b, '\0');
}

static bool up2_edited(const sp_request_t *r, const char *n, size_t l)
{
    for (size_t i = 0; i < r->extra.len;) {
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

/* A grpc-timeout value for ns nanoseconds: at most 8 digits (the gRPC wire format), in the
 * finest unit that holds it, rounded down (the sandbox's deadline is never later than ours). */
static void grpc_timeout_format(char *out, size_t size, uint64_t ns)
{
    static const struct { uint64_t div; char unit; } units[] = {
        {1000, 'u'}, {1000000, 'm'}, {1000000000, 'S'}, {60000000000ull, 'M'},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(units); i++) {
        uint64_t v = ns / units[i].div;
        if (v <= 99999999) {
            snprintf(out, size, "%llu%c", (unsigned long long)(v ? v : 1), units[i].unit);
            return;
        }
    }
    snprintf(out, size, "%lluH", (unsigned long long)(ns / 3600000000000ull));
}

/* Streams per connection to a sandbox: ours and the sandbox's limit. */
static uint32_t up2c_capacity(const up2c_t *c)
{
    uint32_t cap = (uint32_t)sp_cfg.h2_max_concurrent_streams;
    if (c->s) {
        uint32_t theirs = nghttp2_session_get_remote_settings(
            c->s, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
        if (theirs < cap)
            cap = theirs;
    }
    return cap;
}

static void up2c_on_connect(uv_connect_t *cr, int status)
{
    up2c_t *c = cr->data;
    if (c->closing)
        return;
    if (status < 0) {
        up2c_fail(c, SP_ERR_CONNECT, 502, "upstream connect failed");
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_timer_stop(&c->timer);
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, up2_on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, up2_on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, up2_on_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, up2_on_stream_close);
    nghttp2_option *opt;
    nghttp2_option_new(&opt);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, (size_t)sp_cfg.h2_max_outbound_ack);
    int rv = nghttp2_session_client_new2(&c->s, cb, c, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0) {
        c->s = NULL;
        up2c_fail(c, SP_ERR_CONNECT, 502, "upstream connect failed");
        return;
    }
    c->connected = true;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (uint32_t)sp_cfg.h2_stream_buffer},
    };
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, SP_ARRAY_LEN(iv));
    /* room for every stream's window at once: a slow reader never stalls the others */
    uint64_t win = (uint64_t)sp_cfg.h2_stream_buffer * (uint64_t)up2c_capacity(c);
    if (win > 0x7fffffff)
        win = 0x7fffffff;
    if (win > 65535)
        nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, (int32_t)win);
    uv_read_start((uv_stream_t *)&c->tcp, up2c_alloc, up2c_on_read);
    /* the calls that waited for the connection, each looked up anew: answering one (a spent
     * deadline) may end others on this connection */
    for (;;) {
        up2_t *up = c->streams;
        while (up && up->sid != 0)
            up = up->next;
        if (!up)
            break;
        up2_submit(up); /* submitted (sid > 0) or off the list */
        if (c->closing)
            return;
    }
    up2c_flush(c);
    up2c_flush_clients(c);
    up2c_idle(c);
}

/* Sends the call on its (connected) connection: pseudo-headers, the client's headers
 * (hop-by-hop and edited ones out), the proxy's own, the script's additions. */
static void up2_submit(up2_t *up)
{
    h2s_t *cs = up->cs;
    up2c_t *c = up->conn;
    if (!cs || !cs->r) {
        up2_release(up);
        return;
    }
    sp_request_t *r = cs->r;
    r->t_connected = uv_hrtime();
    sp_buf_t b = {0};
    size_t hl = 0;
    const char *host = sp_request_header(r, "host", 4, &hl);
    const char *m = llhttp_method_name((llhttp_method_t)r->method);
    up2_add(&b, ":method", 7, m, strlen(m));
    up2_add(&b, ":scheme", 7, "http", 4);
    up2_add(&b, ":path", 5, r->up_path.p, r->up_path.len);
    if (host)
        up2_add(&b, ":authority", 10, host, hl);
    for (uint32_t i = 0; i < r->nhdrs; i++) {
        const sp_hdr_t *h = &r->hdrs[i];
        const char *n = r->head.p + h->name_off;
        size_t l = h->name_len;
        if (conn_specific(n, l) || sp_ieq(n, l, "host") || sp_ieq(n, l, "x-request-id") ||
            (r->header_edits && up2_edited(r, n, l)) ||
            (up->deadline && sp_ieq(n, l, "grpc-timeout")))
            continue;
        up2_add(&b, n, l, r->head.p + h->value_off, h->value_len);
    }
    uint64_t left = 0;
    if (up->deadline) {
        /* the sandbox gets what is left of the call's budget, not the client's value: the time
         * the request spent in the proxy (a script, a wake, the connect) is spent */
        uint64_t now = uv_hrtime();
        if (now >= up->deadline) {
            sp_buf_free(&b);
            up2_fail(up, SP_ERR_FIRST_BYTE_TIMEOUT, 504, "deadline exceeded (grpc-timeout)");
            return;
        }
        left = up->deadline - now;
        char tv[16];
        grpc_timeout_format(tv, sizeof tv, left);
        up2_add(&b, "grpc-timeout", 12, tv, strlen(tv));
    }
    up2_add(&b, "te", 2, "trailers", 8);
    up2_add(&b, "x-forwarded-for", 15, r->client_ip, strlen(r->client_ip));
    up2_add(&b, "x-forwarded-proto", 17, "http", 4);
    up2_add(&b, "x-request-id", 12, r->id, r->id_len);
    for (size_t i = 0; i < r->extra.len;) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        const char *val = name + nlen + 1;
        size_t vlen = strlen(val);
        if (op == '+' || op == '=')
            up2_add(&b, name, nlen, val, vlen);
        i += 1 + nlen + 1 + vlen + 1;
    }
    size_t cnt = 0;
    for (size_t i = 0; i < b.len; i++)
        cnt += b.p[i] == '\0';
    nghttp2_nv *nv = sp_calloc(cnt / 2 + 1, sizeof *nv);
    size_t k = 0;
    for (size_t i = 0; i < b.len;) {
        char *nm = b.p + i;
        size_t nl = strlen(nm);
        char *v = nm + nl + 1;
        size_t vl = strlen(v);
        nv[k++] = (nghttp2_nv){(uint8_t *)nm, (uint8_t *)v, nl, vl, NGHTTP2_NV_FLAG_NONE};
        i += nl + 1 + vl + 1;
    }
    nghttp2_data_provider prd = {.read_callback = up2_body_read};
    int32_t sid = nghttp2_submit_request(c->s, NULL, nv, k, r->has_body ? &prd : NULL, up);
    free(nv);
    sp_buf_free(&b);
    if (sid < 0) {
        up2_fail(up, SP_ERR_UPSTREAM_PROTOCOL, 502, "upstream request refused");
        return;
    }
    up->sid = sid;
    r->up_sent = true;
    r->head_sent = true;
    if (up->deadline) {
        /* counted from now, not from the loop's cached time (which a long iteration leaves
         * behind: the timer would fire before the deadline, and end the call as a first-byte
         * timeout) */
        uint64_t ms = (left + 999999) / 1000000;
        uv_update_time(&c->w->loop);
        uv_timer_start(&up->timer, up2_on_timer, ms ? ms : 1, 0);
    } else {
        double fb = r->to_first_byte > 0 ? r->to_first_byte : sp_cfg.first_byte_timeout;
        uv_timer_start(&up->timer, up2_on_timer, (uint64_t)(fb * 1000.0), 0);
    }
    up2c_flush(c);
}

/* grpc-timeout ("<digits><unit>", units H M S m u n) in seconds, or 0. */
static double grpc_timeout(const sp_request_t *r)
{
    size_t n;
    const char *v = sp_request_header(r, "grpc-timeout", 12, &n);
    if (!v || n < 2 || n > 9)
        return 0;
    double x = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return 0;
        x = x * 10 + (v[i] - '0');
    }
    switch (v[n - 1]) {
    case 'H': return x * 3600;
    case 'M': return x * 60;
    case 'S': return x;
    case 'm': return x / 1e3;
    case 'u': return x / 1e6;
    case 'n': return x / 1e9;
    default: return 0;
    }
}

/* True when the port is listed in h2c_upstream_ports. */
static bool h2c_port(int port)
{
    const char *p = sp_cfg.h2c_upstream_ports;
    while (p && *p) {
        while (*p == ',' || *p == ' ')
            p++;
        int v = 0;
        bool digits = false;
        while (*p >= '0' && *p <= '9') {
            v = v * 10 + (*p++ - '0');
            digits = true;
            if (v > 65535)
                break;
        }
        if (digits && v == port)
            return true;
        while (*p && *p != ',')
            p++;
    }
    return false;
}

static bool up2_wanted(const sp_request_t *r)
{
    return is_grpc(r) || h2c_port(r->up_port);
}

/* Dials the sandbox's address (a literal, or what its name resolved to), unless no sandbox may
 * have it (the same refusal as HTTP/1.1's, upstream.c). */
static void up2c_dial(up2c_t *c, const struct sockaddr *sa)
{
    const char *why = sp_addr_refusal(sa, sp_cfg.allow_loopback_sandboxes);
    if (why) {
        char msg[96];
        snprintf(msg, sizeof msg, "sandbox address refused: %s", why);
        sp_log(SP_LOG_WARN, "sandbox address refused", "s:upstream", c->host, "i:port",
               (int64_t)c->port, "s:reason", why, NULL);
        up2c_fail(c, SP_ERR_ADDRESS_REFUSED, 503, msg);
        return;
    }
    c->creq.data = c;
    if (uv_tcp_connect(&c->creq, &c->tcp, sa, up2c_on_connect) < 0)
        up2c_fail(c, SP_ERR_CONNECT, 502, "upstream connect failed");
}

/* The sandbox's name (a serviceFQDN) resolved, in libuv's thread pool (the loop never waits on
 * DNS): the first address is dialled, as HTTP/1.1 does (upstream.c). */
static void up2c_on_resolved(uv_getaddrinfo_t *gr, int status, struct addrinfo *res)
{
    up2c_t *c = gr->data;
    c->resolving = false;
    if (c->closing || !c->nstreams) {
        if (res)
            uv_freeaddrinfo(res);
        if (!c->closing)
            up2c_close(c);
        up2c_unref(c); /* the lookup's reference: the last one once the handles closed */
        return;
    }
    c->handles--; /* the lookup's reference; not closing: the handles still hold it */
    if (status < 0 || !res) {
        sp_log(SP_LOG_WARN, "upstream name resolution failed", "s:upstream", c->host, "i:port",
               (int64_t)c->port, "s:error", uv_strerror(status), NULL);
        if (res)
            uv_freeaddrinfo(res);
        up2c_fail(c, SP_ERR_CONNECT, 502, "upstream name resolution failed");
        return;
    }
    struct sockaddr_storage ss;
    sp_addr_with_port(res->ai_addr, res->ai_addrlen, c->port, &ss);
    uv_freeaddrinfo(res);
    up2c_dial(c, (struct sockaddr *)&ss);
}

/* A new connection to host:port, dialled (a literal address) or being resolved (a name). */
static up2c_t *up2c_open(sp_worker_t *w, const char *host, int port, double ct)
{
    up2c_t *c = sp_calloc(1, sizeof *c);
    c->w = w;
    snprintf(c->host, sizeof c->host, "%s", host);
    c->port = port;
    uv_tcp_init(&w->loop, &c->tcp);
    uv_timer_init(&w->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    c->next = *up2c_list(w);
    if (c->next)
        c->next->prev = c;
    *up2c_list(w) = c;
    uint64_t ms = (uint64_t)(ct * 1000.0);
    uv_timer_start(&c->timer, up2c_on_timer, ms ? ms : 1, 0);
    return c;
}

static void up2c_connect(up2c_t *c)
{
    char host[256];
    struct sockaddr_storage ss;
    if (sp_addr_literal(c->host, c->port, &ss, host)) {
        up2c_dial(c, (struct sockaddr *)&ss);
        return;
    }
    /* a name (a serviceFQDN): resolved off the loop; the connect timeout covers both */
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    c->gai.data = c;
    if (uv_getaddrinfo(&c->w->loop, &c->gai, up2c_on_resolved, host, NULL, &hints) < 0) {
        up2c_fail(c, SP_ERR_CONNECT, 502, "upstream name resolution failed");
        return;
    }
    c->resolving = true;
    c->handles++;
}

static void up2_start(h2s_t *s)
{
    sp_request_t *r = s->r;
    sp_worker_t *w = r->w;
    r->up_tried = true;
    r->t_forward = uv_hrtime();
    snprintf(r->upstream_addr, sizeof r->upstream_addr, "%.50s:%d", r->up_host, r->up_port);
    up2_t *up = sp_calloc(1, sizeof *up);
    uv_timer_init(&w->loop, &up->timer);
    up->timer.data = up;
    up->cs = s;
    s->up2 = up;
    double ct = r->to_connect > 0 ? r->to_connect : sp_cfg.connect_timeout;
    double to = grpc_timeout(r);
    if (to > 0) {
        /* the call's deadline counts from when its head arrived, not from now */
        uint64_t t0 = r->t_head ? r->t_head : r->t_forward;
        up->deadline = t0 + (uint64_t)(to * 1e9);
        if (r->t_forward >= up->deadline) {
            up2_fail(up, SP_ERR_FIRST_BYTE_TIMEOUT, 504, "deadline exceeded (grpc-timeout)");
            return;
        }
    }
    /* a connection to the same address with room for one more stream, else a new one */
    up2c_t *c = *up2c_list(w);
    for (; c; c = c->next)
        if (!c->closing && !c->goaway && c->port == r->up_port &&
            strcmp(c->host, r->up_host) == 0 && c->nstreams < up2c_capacity(c))
            break;
    bool fresh = !c;
    if (fresh)
        c = up2c_open(w, r->up_host, r->up_port, ct);
    if (c->connected)
        uv_timer_stop(&c->timer); /* the keep-alive wait of an idle one */
    up->conn = c;
    up->next = c->streams;
    if (c->streams)
        c->streams->prev = up;
    c->streams = up;
    c->nstreams++;
    if (c->connected) {
        up2_submit(up);
        return;
    }
    /* waiting for the connection: this call's own bound is its connect timeout or deadline */
    double wait = ct;
    if (up->deadline) {
        uint64_t now = uv_hrtime();
        double left = now < up->deadline ? (double)(up->deadline - now) / 1e9 : 0;
        if (left < wait)
            wait = left + 0.000999; /* whole ms, rounded up */
        uv_update_time(&w->loop); /* as in up2_submit: counted from now */
    }
    uint64_t ms = (uint64_t)(wait * 1000.0);
    uv_timer_start(&up->timer, up2_on_timer, ms ? ms : 1, 0);
    if (fresh)
        up2c_connect(c);
}

/* Closes the h2c connections to sandboxes that carry no call (drain, stop). */
void sp_h2_upstream_close_idle(sp_worker_t *w)
{
    up2c_t *c = *up2c_list(w);
    while (c) {
        up2c_t *next = c->next;
        if (!c->nstreams && !c->closing)
            up2c_close(c);
        c = next;
    }
}
