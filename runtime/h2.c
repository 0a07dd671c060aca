/*
 * h2.c: HTTP/2 on a client connection: h2c with prior knowledge (RFC 9113 3.3) on the same
 * listener as HTTP/1.1, through nghttp2 (the framing, HPACK, flow control and the protocol's
 * state machine are nghttp2's; none is written here). Each stream becomes an sp_request_t that
 * goes through the same hooks, limits, log phase and upstream machinery as an HTTP/1.1 request:
 * this file is the "client side" (sp_client_ops_t) of those requests. Sandboxes are reached
 * over HTTP/1.1 (upstream.c); the response head upstream.c builds as HTTP/1.1 text is turned
 * into a HEADERS frame here, and bodies reach the client de-chunked.
 *
 * Memory is bounded per stream and per connection: a stream's request body waits in a buffer
 * of h2_stream_window bytes (its flow-control window is given back only once the bytes went
 * upstream, so a slow sandbox slows that stream's upload), its response in a buffer of about
 * h2_stream_buffer bytes (beyond it the sandbox is not read: a slow reader slows its own
 * stream), and at most h2_max_concurrent_streams streams run at once. The server connection
 * (sp_conn_t, server.c) still owns the socket, the connection limits and the timeouts.
 * It does not speak HTTP/2 to sandboxes, Upgrade: h2c, or extended CONNECT.
 */
#include "http.h"
#include "worker.h"
#include "config.h"
#include "log.h"

#include <nghttp2/nghttp2.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN (sizeof h2_preface - 1)

/* Bytes of frames gathered from nghttp2 before one socket write. */
#define WRITE_CHUNK 65536

typedef struct h2s h2s_t;

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

/* ---------------------------------------------------------------- streams */

static size_t out_pending(const h2s_t *s) { return s->out.len - s->out_pos; }

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
    stream_release_request(s, s->sent_end && out_pending(s) == 0);
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
    if (h->nstreams == 0 && !h->closed)
        sp_conn_idle_timer(h->c, true);
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
    SP_UNUSED(session);
    SP_UNUSED(id);
    SP_UNUSED(ud);
    h2s_t *s = source->ptr;
    size_t n = out_pending(s);
    if (n > length)
        n = length;
    if (n) {
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
    if (s->up_waiting && out_pending(s) * 2 <= (size_t)sp_cfg.h2_stream_buffer) {
        s->notify = true; /* the sandbox may be read again (after this send round) */
        s->h->flush_again = true;
    }
    if (out_pending(s) == 0 && s->out_end) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        s->sent_end = true;
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
    if (h->c->closing)
        return UV_ECONNRESET;
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

/* Sends the local response in r (status, r->body) on the stream. */
static void respond_local(h2s_t *s)
{
    sp_request_t *r = s->r;
    if (s->forwarding && r->up)
        sp_upstream_abort(r);
    s->forwarding = false;
    /* the body has nowhere to go now: what came is given back, the rest is dropped */
    if (!r->body_buffered) {
        s->discard = true;
        give_back(s, s->in_len - s->inflight);
        s->in_len = s->inflight;
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

/* ---------------------------------------------------------------- deciding */

static void act(h2s_t *s)
{
    sp_request_t *r = s->r;
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
    h2_flush(s->h);
    if (s->in_end) {
        r->body_buffered = r->body_done = true;
        return 1;
    }
    s->reading_body = true;
    return 0;
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

/* The request head is complete: the same checks and the same hook as an HTTP/1.1 request. */
static void head_done(h2s_t *s, bool end_stream)
{
    sp_request_t *r = s->r;
    sp_h2_t *h = s->h;
    s->headed = true;
    if (h->nstreams++ == 0)
        sp_conn_idle_timer(h->c, false);
    r->t_head = uv_hrtime();
    if (!s->has_host && s->authority.len && !s->bad)
        add_header(r, "host", 4, s->authority.p, s->authority.len);
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
        for (h2s_t *s = h->streams, *next; s; s = next) {
            next = s->next;
            pump_body(s);
            if (c->closing)
                return;
        }
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
