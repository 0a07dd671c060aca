/*
 * request.c: the request slot and what the scripting layer does to it, whichever protocol the
 * client speaks (HTTP/1 in server.c, HTTP/2 in h2.c): acquiring and releasing slots, status
 * texts, the header lookups, checks and edits a script makes (request headers to send upstream,
 * response headers to add), the decisions (respond locally, forward), the counters held for
 * the exchange (sp_request_hold), building local and error responses, and the end of an
 * exchange (its log line and metrics). It does no I/O.
 */
#include "http/http.h"
#include "http/worker.h"
#include "http/trace.h"
#include "http/server_int.h"
#include "base/config.h"
#include "state/shdict.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void release_holds(sp_request_t *r);

/* ---------------------------------------------------------------- request slots */

sp_request_t *sp_request_acquire(sp_worker_t *w)
{
    sp_request_t *r;
    if (w->nfree) {
        r = w->free_slots[--w->nfree];
    } else {
        r = sp_calloc(1, sizeof *r);
        r->w = w;
        if (w->nslots == w->slots_cap) {
            w->slots_cap = w->slots_cap ? w->slots_cap * 2 : 64;
            w->slots = sp_realloc(w->slots, w->slots_cap * sizeof *w->slots);
            w->free_slots = sp_realloc(w->free_slots, w->slots_cap * sizeof *w->free_slots);
        }
        r->slot = w->nslots;
        w->slots[w->nslots++] = r;
    }
    r->gen++;
    /* the slot's storage is reused (buffers keep their capacity); the exchange starts at zero */
    r->head.len = r->out.len = r->body.len = r->extra.len = r->up_path.len = r->resp_head.len = 0;
    memset(&r->conn, 0, sizeof *r - offsetof(sp_request_t, conn));
    r->t_start = uv_hrtime();
    r->listener = "";
    uint64_t n = ++w->req_counter;
    /* id = the worker's 6 hex digits, then the request counter in 10 (no printf per request) */
    static const char hex[] = "0123456789abcdef";
    memcpy(r->id, w->id_prefix, 6);
    for (int i = 15; i >= 6; i--, n >>= 4)
        r->id[i] = hex[n & 15];
    r->id[16] = '\0';
    r->id_len = 16;
    SP_STAT_ADD(w->active_requests, 1);
    return r;
}

static void trim_buf(sp_buf_t *b, size_t keep)
{
    if (b->cap > keep) {
        sp_buf_free(b);
    }
}

void sp_request_maybe_release(sp_request_t *r)
{
    if (!r->core_done || r->script_busy)
        return;
    release_holds(r); /* a script still running when the exchange ended may have taken some */
    sp_worker_t *w = r->w;
    if (w->hooks && w->hooks->release)
        w->hooks->release(r);
    r->gen++;
    /* Keep the buffers' capacity for the next request unless one grew unusually large. */
    trim_buf(&r->head, 65536);
    trim_buf(&r->out, 262144);
    trim_buf(&r->body, 262144);
    trim_buf(&r->extra, 16384);
    trim_buf(&r->resp_head, 131072);
    trim_buf(&r->up_path, 16384);
    SP_STAT_ADD(w->active_requests, (uint64_t)-1);
    w->free_slots[w->nfree++] = r;
}

/* ---------------------------------------------------------------- helpers */

const char *sp_status_reason(int s)
{
    switch (s) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
    }
}

/* Byte classes for header names and values a script supplies: 1 = a token character
 * (RFC 9110 tchar, allowed in names), 2 = allowed in values (anything but CR, LF and NUL). */
#define HC_TCHAR(c)                                                                              \
    (((c) >= '0' && (c) <= '9') || ((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') ||  \
     (c) == '!' || (c) == '#' || (c) == '$' || (c) == '%' || (c) == '&' || (c) == '\'' ||        \
     (c) == '*' || (c) == '+' || (c) == '-' || (c) == '.' || (c) == '^' || (c) == '_' ||          \
     (c) == '`' || (c) == '|' || (c) == '~')
#define HC(c) (uint8_t)((HC_TCHAR(c) ? 1 : 0) | (((c) == '\r' || (c) == '\n' || (c) == 0) ? 0 : 2))
#define HC4(c) HC(c), HC((c) + 1), HC((c) + 2), HC((c) + 3)
#define HC16(c) HC4(c), HC4((c) + 4), HC4((c) + 8), HC4((c) + 12)
#define HC64(c) HC16(c), HC16((c) + 16), HC16((c) + 32), HC16((c) + 48)
static const uint8_t hdr_class[256] = {HC64(0), HC64(64), HC64(128), HC64(192)};

static bool header_bytes_ok(const char *s, size_t n, bool name)
{
    uint8_t want = name ? 1 : 2;
    for (size_t i = 0; i < n; i++)
        if (!(hdr_class[(unsigned char)s[i]] & want))
            return false;
    return !name || n > 0;
}

const char *sp_request_header(const sp_request_t *r, const char *name, size_t nlen, size_t *vlen)
{
    for (uint32_t i = 0; i < r->nhdrs; i++) {
        const sp_hdr_t *h = &r->hdrs[i];
        if (h->name_len != nlen)
            continue;
        const char *hn = r->head.p + h->name_off;
        size_t k = 0;
        while (k < nlen) {
            char a = hn[k], b = name[k];
            if (a >= 'A' && a <= 'Z')
                a = (char)(a + 32);
            if (b >= 'A' && b <= 'Z')
                b = (char)(b + 32);
            if (a != b)
                break;
            k++;
        }
        if (k == nlen) {
            *vlen = h->value_len;
            return r->head.p + h->value_off;
        }
    }
    return NULL;
}

static void add_hdr_entry(sp_buf_t *extra, char op, const char *name, size_t nlen, const char *val,
                          size_t vlen)
{
    sp_buf_addc(extra, op);
    sp_buf_add(extra, name, nlen);
    sp_buf_addc(extra, '\0');
    sp_buf_add(extra, val, vlen);
    sp_buf_addc(extra, '\0');
}

int sp_request_add_header(sp_request_t *r, const char *name, size_t nlen, const char *val,
                          size_t vlen)
{
    if (!header_bytes_ok(name, nlen, true) || !header_bytes_ok(val, vlen, false))
        return -EINVAL;
    add_hdr_entry(&r->extra, '>', name, nlen, val, vlen);
    return 0;
}

int sp_request_edit_header(sp_request_t *r, char op, const char *name, size_t nlen,
                           const char *val, size_t vlen)
{
    if (!header_bytes_ok(name, nlen, true) || (op != '-' && !header_bytes_ok(val, vlen, false)))
        return -EINVAL;
    add_hdr_entry(&r->extra, op, name, nlen, op == '-' ? "" : val, op == '-' ? 0 : vlen);
    if (op == '-' || op == '=')
        r->header_edits = true;
    return 0;
}

void sp_request_emit_response_headers(const sp_request_t *r, sp_buf_t *o)
{
    size_t i = 0;
    while (i < r->extra.len) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        const char *val = name + nlen + 1;
        size_t vlen = strlen(val);
        if (op == '>') {
            sp_buf_add(o, name, nlen);
            sp_buf_lit(o, ": ");
            sp_buf_add(o, val, vlen);
            sp_buf_lit(o, "\r\n");
        }
        i += 1 + nlen + 1 + vlen + 1;
    }
}

/* Builds the head of a local response into r->out; the body is r->body. */
static void build_local_head(sp_request_t *r, int status)
{
    sp_buf_t *o = &r->out;
    o->len = 0;
    sp_buf_lit(o, "HTTP/1.1 ");
    sp_buf_addu(o, (uint64_t)status);
    sp_buf_addc(o, ' ');
    sp_buf_adds(o, sp_status_reason(status));
    sp_buf_lit(o, "\r\n");
    if (status >= 200 && status != 204 && status != 304) {
        sp_buf_lit(o, "Content-Length: ");
        sp_buf_addu(o, r->body.len);
        sp_buf_lit(o, "\r\n");
    }
    sp_buf_lit(o, "X-Request-Id: ");
    sp_buf_add(o, r->id, r->id_len);
    sp_buf_lit(o, "\r\n");
    sp_request_emit_response_headers(r, o);
    if (r->close_client)
        sp_buf_lit(o, "Connection: close\r\n");
    else if (r->vmajor == 1 && r->vminor == 0)
        sp_buf_lit(o, "Connection: keep-alive\r\n");
    sp_buf_lit(o, "\r\n");
}

void sp_request_local_head(sp_request_t *r) { build_local_head(r, r->status); }

int sp_request_respond(sp_request_t *r, int status, const char *ctype, size_t ctlen,
                       const char *body, size_t blen)
{
    if (r->decision != SP_DECIDE_NONE)
        return -EINVAL;
    if (status < 200 || status > 599 || !header_bytes_ok(ctype, ctlen, false))
        return -EINVAL;
    r->decision = SP_DECIDE_RESPOND;
    r->status = status;
    if (ctlen)
        add_hdr_entry(&r->extra, '>', "Content-Type", 12, ctype, ctlen);
    r->body.len = 0;
    sp_buf_add(&r->body, body, blen); /* copied: the script's string may not outlive this */
    return 0;
}

int sp_request_forward(sp_request_t *r, const char *host, size_t hlen, int port, const char *path,
                       size_t plen)
{
    if (r->decision != SP_DECIDE_NONE)
        return -EINVAL;
    if (hlen == 0 || hlen >= sizeof r->up_host || port <= 0 || port > 65535)
        return -EINVAL;
    for (size_t i = 0; i < hlen; i++) {
        unsigned char ch = (unsigned char)host[i];
        if (ch <= ' ' || ch >= 0x7f || ch == '/' || ch == '@' || ch == '?' || ch == '#')
            return -EINVAL;
    }
    if (plen == 0 || path[0] != '/' || !header_bytes_ok(path, plen, false))
        return -EINVAL;
    for (size_t i = 0; i < plen; i++)
        if (path[i] == ' ' || path[i] == '\t')
            return -EINVAL;
    memcpy(r->up_host, host, hlen);
    r->up_host[hlen] = '\0';
    r->up_port = port;
    r->up_path.len = 0;
    sp_buf_add(&r->up_path, path, plen);
    r->decision = SP_DECIDE_FORWARD;
    return 0;
}

/* ---------------------------------------------------------------- local and error responses */

/* Drops everything from r->extra but the script's response headers (rate-limit headers stay
 * on a 502), and any Content-Type among them (the error body is JSON). */
static void keep_response_headers(sp_request_t *r)
{
    size_t i = 0, o = 0;
    while (i < r->extra.len) {
        char op = r->extra.p[i];
        const char *name = r->extra.p + i + 1;
        size_t nlen = strlen(name);
        size_t n = 1 + nlen + 1 + strlen(name + nlen + 1) + 1;
        if (op == '>' && !sp_ieq(name, nlen, "content-type")) {
            memmove(r->extra.p + o, r->extra.p + i, n);
            o += n;
        }
        i += n;
    }
    r->extra.len = o;
}

void sp_request_error_body(sp_request_t *r, int status, const char *msg)
{
    r->body.len = 0;
    sp_buf_addc(&r->body, '{');
    if (r->up_tried && r->err_subject[0]) {
        /* the agent-sandbox router's error shape (req:set_error_detail) */
        const char *what = r->error == SP_ERR_CONNECT ? "Could not connect to the backend sandbox"
                           : (r->error == SP_ERR_CONNECT_TIMEOUT ||
                              r->error == SP_ERR_FIRST_BYTE_TIMEOUT ||
                              r->error == SP_ERR_UPSTREAM_IDLE)
                               ? "Timed out waiting for the backend sandbox"
                               : "Lost the connection to the backend sandbox";
        char detail[160];
        int n = snprintf(detail, sizeof detail, "%s: %s", what, r->err_subject);
        sp_buf_lit(&r->body, "\"detail\":");
        sp_buf_json_str(&r->body, detail, n > 0 && (size_t)n < sizeof detail ? (size_t)n : 0);
        sp_buf_addc(&r->body, ',');
    }
    sp_buf_lit(&r->body, "\"error\":");
    sp_buf_json_str(&r->body, msg, strlen(msg));
    if (r->up_tried) {
        /* did any byte of the request reach the sandbox? false: retrying cannot run it twice */
        if (r->up_sent)
            sp_buf_lit(&r->body, ",\"delivered\":true");
        else
            sp_buf_lit(&r->body, ",\"delivered\":false");
    }
    sp_buf_lit(&r->body, ",\"request_id\":");
    sp_buf_json_str(&r->body, r->id, r->id_len);
    sp_buf_lit(&r->body, "}");
    r->close_client = true;
    keep_response_headers(r);
    add_hdr_entry(&r->extra, '>', "Content-Type", 12, "application/json", 16);
    r->status = status;
    r->decision = SP_DECIDE_RESPOND;
}

/* ---------------------------------------------------------------- finishing */

static void run_log(sp_request_t *r)
{
    if (r->logged)
        return;
    r->logged = true;
    if (!r->t_end)
        r->t_end = uv_hrtime();
    sp_worker_t *w = r->w;
    SP_STAT_ADD(w->stats.requests, 1);
    int cls = r->resp_status / 100;
    if (cls < 0 || cls > 5)
        cls = 0;
    int m;
    switch (r->method) {
    case HTTP_GET: m = SP_M_GET; break;
    case HTTP_HEAD: m = SP_M_HEAD; break;
    case HTTP_POST: m = SP_M_POST; break;
    case HTTP_PUT: m = SP_M_PUT; break;
    case HTTP_PATCH: m = SP_M_PATCH; break;
    case HTTP_DELETE: m = SP_M_DELETE; break;
    case HTTP_OPTIONS: m = SP_M_OPTIONS; break;
    default: m = SP_M_OTHER; break;
    }
    SP_STAT_ADD(w->stats.by_method_class[m][cls], 1);
    double secs = (double)(r->t_end - r->t_start) / 1e9;
    int b = 0;
    while (b < SP_LAT_BUCKETS && secs > sp_latency_bounds[b])
        b++;
    SP_STAT_ADD(w->stats.latency[b], 1);
    SP_STAT_ADD(w->stats.latency_sum_us, (uint64_t)(secs * 1e6));
    if (w->hooks && w->hooks->log)
        w->hooks->log(r);
    if (w->tracer)
        w->tracer->request_done(w->tracer, r);
}

int sp_request_hold(sp_request_t *r, sp_shdict_t *d, const char *key, size_t klen, double limit)
{
    if (r->nholds >= SP_ARRAY_LEN(r->holds) || klen >= sizeof r->holds[0].key || r->core_done)
        return -E2BIG;
    if (!sp_shdict_acquire(d, key, klen, limit))
        return 0;
    r->holds[r->nholds].dict = d;
    memcpy(r->holds[r->nholds].key, key, klen);
    r->holds[r->nholds].klen = (uint8_t)klen;
    r->nholds++;
    return 1;
}

/* Gives back the counters the exchange held: this runs however the exchange ends. */
static void release_holds(sp_request_t *r)
{
    for (unsigned i = 0; i < r->nholds; i++) {
        double left;
        sp_shdict_incr(r->holds[i].dict, r->holds[i].key, r->holds[i].klen, -1, false, 0, 0,
                       &left);
    }
    r->nholds = 0;
}

void sp_request_end(sp_request_t *r)
{
    release_holds(r);
    r->conn = NULL;
    r->client = NULL;
    if (r->up)
        sp_upstream_abort(r);
    run_log(r);
    r->core_done = true;
    sp_request_maybe_release(r);
}
