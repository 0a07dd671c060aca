/*
 * lua_request.c: the C functions behind the request object of scripts. They are exported
 * (SP_EXPORT) and bound with the LuaJIT FFI by runtime/lua/sp/request.lua, so the hot path
 * (reading the path, a header, deciding) compiles under the JIT. They take plain arguments and
 * caller-owned buffers; validity (the generation check) is done on the Lua side.
 */
#include "http/http.h"
#include "base/log.h"
#include "http/worker.h"
#include "http/trace.h"
#include "base/config.h"

#include <errno.h>

SP_EXPORT uint32_t sp_req_gen(const sp_request_t *r) { return r->gen; }

SP_EXPORT const char *sp_req_method(const sp_request_t *r)
{
    return llhttp_method_name((llhttp_method_t)r->method);
}

SP_EXPORT const char *sp_req_target(const sp_request_t *r, size_t *len)
{
    *len = r->url_len;
    return r->head.p;
}

SP_EXPORT size_t sp_req_path_len(const sp_request_t *r) { return r->path_len; }

SP_EXPORT const char *sp_req_header(const sp_request_t *r, const char *name, size_t nlen,
                                    size_t *vlen)
{
    return sp_request_header(r, name, nlen, vlen);
}

SP_EXPORT int sp_req_header_count(const sp_request_t *r) { return (int)r->nhdrs; }

SP_EXPORT const char *sp_req_header_at(const sp_request_t *r, int i, size_t *nlen,
                                       const char **val, size_t *vlen)
{
    if (i < 0 || (uint32_t)i >= r->nhdrs)
        return NULL;
    const sp_hdr_t *h = &r->hdrs[i];
    *nlen = h->name_len;
    *val = r->head.p + h->value_off;
    *vlen = h->value_len;
    return r->head.p + h->name_off;
}

SP_EXPORT const char *sp_req_client_ip(const sp_request_t *r) { return r->client_ip; }

SP_EXPORT int sp_req_client_port(const sp_request_t *r) { return r->client_port; }

SP_EXPORT const char *sp_req_id(const sp_request_t *r, size_t *len)
{
    *len = r->id_len;
    return r->id;
}

SP_EXPORT const char *sp_req_listener(const sp_request_t *r) { return r->listener; }

SP_EXPORT int sp_req_http_version(const sp_request_t *r) { return r->vmajor * 10 + r->vminor; }

SP_EXPORT int sp_req_body_info(const sp_request_t *r, double *length)
{
    *length = r->chunked ? -1 : (double)r->content_length;
    return r->has_body;
}

SP_EXPORT int sp_req_is_upgrade(const sp_request_t *r) { return r->upgrade; }

SP_EXPORT int sp_req_connected(const sp_request_t *r) { return r->conn != NULL && !r->conn->closing; }

SP_EXPORT int sp_req_respond(sp_request_t *r, int status, const char *ct, size_t ctlen,
                             const char *body, size_t blen)
{
    return sp_request_respond(r, status, ct, ctlen, body, blen);
}

SP_EXPORT int sp_req_add_header(sp_request_t *r, const char *n, size_t nl, const char *v, size_t vl)
{
    if (r->resp_head_sent)
        return -EINVAL;
    return sp_request_add_header(r, n, nl, v, vl);
}

/* A response header whose value is a whole number 0 <= v < 1e14, written in digits as Lua's
 * tostring would write it, without formatting a double in Lua (RateLimit-* on every request). */
SP_EXPORT int sp_req_add_header_u(sp_request_t *r, const char *n, size_t nl, double v)
{
    if (r->resp_head_sent || !(v >= 0 && v < 1e14))
        return -EINVAL;
    char d[24];
    sp_buf_t b = SP_BUF_ON(d);
    sp_buf_addu(&b, (uint64_t)v);
    return sp_request_add_header(r, n, nl, b.p, b.len);
}

SP_EXPORT int sp_req_edit_header(sp_request_t *r, int op, const char *n, size_t nl, const char *v,
                                 size_t vl)
{
    return sp_request_edit_header(r, (char)op, n, nl, v, vl);
}

SP_EXPORT int sp_req_forward(sp_request_t *r, const char *host, size_t hl, int port,
                             const char *path, size_t pl)
{
    return sp_request_forward(r, host, hl, port, path, pl);
}

SP_EXPORT void sp_req_set_timeouts(sp_request_t *r, double connect, double first_byte, double idle)
{
    if (connect > 0)
        r->to_connect = connect;
    if (first_byte > 0)
        r->to_first_byte = first_byte;
    if (idle > 0)
        r->to_idle = idle;
}

SP_EXPORT int sp_req_decision(const sp_request_t *r) { return (int)r->decision; }

/* Upstream error bodies of this request get {"detail": "<what happened>: <subject>"} (the
 * agent-sandbox router's shape) besides "error"; an empty subject restores the plain shape. */
SP_EXPORT void sp_req_set_error_detail(sp_request_t *r, const char *s, size_t len)
{
    if (len >= sizeof r->err_subject)
        len = sizeof r->err_subject - 1;
    memcpy(r->err_subject, s, len);
    r->err_subject[len] = '\0';
}

/* 1 if request bytes were handed to a connected upstream socket, 0 if not, -1 if the request
 * was never forwarded. */
SP_EXPORT int sp_req_delivered(const sp_request_t *r)
{
    return r->up_tried ? (r->up_sent ? 1 : 0) : -1;
}

/* ---- the record of the exchange (log phase) */

SP_EXPORT int sp_req_status(const sp_request_t *r) { return r->resp_status; }
SP_EXPORT double sp_req_bytes_in(const sp_request_t *r) { return (double)r->bytes_in; }
SP_EXPORT double sp_req_bytes_out(const sp_request_t *r) { return (double)r->bytes_out; }

static double span(uint64_t a, uint64_t b) { return (a && b && b >= a) ? (double)(b - a) / 1e9 : -1; }

SP_EXPORT double sp_req_duration(const sp_request_t *r)
{
    return span(r->t_start, r->t_end ? r->t_end : uv_hrtime());
}
SP_EXPORT double sp_req_connect_time(const sp_request_t *r) { return span(r->t_head, r->t_connected); }
SP_EXPORT double sp_req_first_byte_time(const sp_request_t *r)
{
    return span(r->t_head, r->t_first_byte);
}
SP_EXPORT const char *sp_req_upstream_addr(const sp_request_t *r) { return r->upstream_addr; }
SP_EXPORT const char *sp_req_error(const sp_request_t *r) { return sp_error_names[r->error]; }
SP_EXPORT int sp_req_worker(const sp_request_t *r) { return r->w->id; }

/* The wake span: phase 0 marks the start of the hold (the first call only), phase 1 its end
 * with the outcome (up to 15 bytes kept), whether this request's wake sent the PATCH, and the
 * refused PATCH's status. Only wake.lua's held requests call it. */
SP_EXPORT void sp_req_wake_mark(sp_request_t *r, int phase, const char *outcome, size_t olen,
                                int patched, int status)
{
    if (phase == 0) {
        if (!r->t_wake_start) {
            r->t_wake_start = uv_hrtime();
            r->t_wake_end = 0;
            r->wake_outcome[0] = '\0';
            r->wake_patched = false;
            r->wake_status = 0;
        }
        return;
    }
    if (!r->t_wake_start)
        return;
    r->t_wake_end = uv_hrtime();
    if (olen >= sizeof r->wake_outcome)
        olen = sizeof r->wake_outcome - 1;
    memcpy(r->wake_outcome, outcome, olen);
    r->wake_outcome[olen] = '\0';
    r->wake_patched = patched != 0;
    r->wake_status = status;
}

/* The trace id (32 hex digits, not terminated) into out; 0 while tracing is off. */
SP_EXPORT int sp_req_trace_id(sp_request_t *r, char *out)
{
    if (!sp_trace_enabled())
        return 0;
    sp_trace_ensure(r);
    memcpy(out, r->trace_id, 32);
    return 1;
}

/* ---- the access-log line, built here: the scripts pick the fields, the core writes bytes */

enum {
    LF_TIME = 1 << 0,
    LF_REQUEST_ID = 1 << 1,
    LF_CLIENT = 1 << 2,
    LF_METHOD = 1 << 3,
    LF_PATH = 1 << 4,
    LF_QUERY = 1 << 5,
    LF_STATUS = 1 << 6,
    LF_BYTES_IN = 1 << 7,
    LF_BYTES_OUT = 1 << 8,
    LF_DURATION = 1 << 9,
    LF_UPSTREAM_CONNECT = 1 << 10,
    LF_UPSTREAM_FIRST_BYTE = 1 << 11,
    LF_UPSTREAM = 1 << 12,
    LF_ERROR = 1 << 13,
    LF_WORKER = 1 << 14,
    LF_TRACE_ID = 1 << 15,
};

/* The access-log line's fields in line order: the one definition. The runtime writes the
 * fields with a bit (when the mask has it); the entry without one is where the script's
 * name/value pairs go. sp.request builds LOG_LINE, LOG_FIELDS and LOG_ORDER from this table
 * (sp_req_log_field). */
static const struct {
    const char *name;
    uint32_t bit;
} LOG_LINE[] = {
    {"time", LF_TIME},
    {"request_id", LF_REQUEST_ID},
    {"client", LF_CLIENT},
    {"method", LF_METHOD},
    {"path", LF_PATH},
    {"query", LF_QUERY},
    {"status", LF_STATUS},
    {"bytes_in", LF_BYTES_IN},
    {"bytes_out", LF_BYTES_OUT},
    {"duration", LF_DURATION},
    {"upstream_connect", LF_UPSTREAM_CONNECT},
    {"upstream_first_byte", LF_UPSTREAM_FIRST_BYTE},
    {"upstream", LF_UPSTREAM},
    {"trace_id", LF_TRACE_ID},
    {"error", LF_ERROR},
    {NULL, 0}, /* the script's pairs */
    {"worker", LF_WORKER},
};

/* The i-th entry of LOG_LINE (0-based): its name (NULL for the scripts' place) and bit;
 * returns 0 past the end. */
SP_EXPORT int sp_req_log_field(int i, const char **name, uint32_t *bit)
{
    if (i < 0 || (size_t)i >= SP_ARRAY_LEN(LOG_LINE))
        return 0;
    *name = LOG_LINE[i].name;
    *bit = LOG_LINE[i].bit;
    return 1;
}

static void lf_name(sp_buf_t *b, const char *name, size_t n)
{
    if (b->len > 1)
        sp_buf_addc(b, ','); /* not the first field */
    sp_buf_addc(b, '"');
    sp_buf_add(b, name, n);
    sp_buf_lit(b, "\":");
}
#define LF_NAME(b, lit) lf_name((b), "" lit, sizeof(lit) - 1)

/* Seconds from nanoseconds, with microsecond precision ("0.000236"). */
static void lf_seconds(sp_buf_t *b, uint64_t ns)
{
    uint64_t us = (ns + 500) / 1000;
    sp_buf_addu(b, us / 1000000);
    char frac[7];
    uint64_t f = us % 1000000;
    for (int i = 5; i >= 0; i--, f /= 10)
        frac[i + 1] = (char)('0' + f % 10);
    frac[0] = '.';
    sp_buf_add(b, frac, sizeof frac);
}

static void lf_span(sp_buf_t *b, const char *name, size_t n, uint64_t a, uint64_t z)
{
    if (!a || !z || z < a)
        return;
    lf_name(b, name, n);
    lf_seconds(b, z - a);
}

/* Appends one JSON line for the exchange to the worker's access log: the fields of `mask` in a
 * fixed order, then the script's name/value string pairs (a NULL value skips its pair). */
SP_EXPORT int sp_req_access_log(const sp_request_t *r, uint32_t mask, const char *k1,
                                const char *v1, const char *k2, const char *v2, const char *k3,
                                const char *v3, const char *k4, const char *v4, const char *k5,
                                const char *v5, const char *k6, const char *v6)
{
    char storage[1024];
    sp_buf_t b = SP_BUF_ON(storage);
    sp_buf_addc(&b, '{');
    for (size_t i = 0; i < SP_ARRAY_LEN(LOG_LINE); i++) {
        uint32_t bit = LOG_LINE[i].bit;
        if (bit && !(mask & bit))
            continue;
        switch (bit) {
        case 0: { /* the script's pairs */
            const char *kv[12] = {k1, v1, k2, v2, k3, v3, k4, v4, k5, v5, k6, v6};
            for (int j = 0; j < 12; j += 2) {
                if (!kv[j] || !kv[j + 1])
                    continue;
                if (b.len > 1)
                    sp_buf_addc(&b, ',');
                sp_buf_json_str(&b, kv[j], strlen(kv[j]));
                sp_buf_addc(&b, ':');
                sp_buf_json_str(&b, kv[j + 1], strlen(kv[j + 1]));
            }
            break;
        }
        case LF_TIME: {
            char t[32];
            sp_iso8601(sp_wall_time(), t);
            LF_NAME(&b, "time");
            sp_buf_addc(&b, '"');
            sp_buf_add(&b, t, 24);
            sp_buf_addc(&b, '"');
            break;
        }
        case LF_REQUEST_ID:
            LF_NAME(&b, "request_id");
            sp_buf_json_str(&b, r->id, r->id_len);
            break;
        case LF_CLIENT:
            LF_NAME(&b, "client");
            sp_buf_json_str(&b, r->client_ip, strlen(r->client_ip));
            break;
        case LF_METHOD: {
            const char *m = llhttp_method_name((llhttp_method_t)r->method);
            LF_NAME(&b, "method");
            sp_buf_json_str(&b, m, strlen(m));
            break;
        }
        case LF_PATH:
            LF_NAME(&b, "path");
            sp_buf_json_str(&b, r->head.p, r->path_len);
            break;
        case LF_QUERY:
            if (r->path_len + 1 < r->url_len) {
                LF_NAME(&b, "query");
                sp_buf_json_str(&b, r->head.p + r->path_len + 1, r->url_len - r->path_len - 1);
            }
            break;
        case LF_STATUS:
            LF_NAME(&b, "status");
            sp_buf_addu(&b, (uint64_t)(r->resp_status > 0 ? r->resp_status : 0));
            break;
        case LF_BYTES_IN:
            LF_NAME(&b, "bytes_in");
            sp_buf_addu(&b, r->bytes_in);
            break;
        case LF_BYTES_OUT:
            LF_NAME(&b, "bytes_out");
            sp_buf_addu(&b, r->bytes_out);
            break;
        case LF_DURATION:
            lf_span(&b, "duration", 8, r->t_start, r->t_end ? r->t_end : uv_hrtime());
            break;
        case LF_UPSTREAM_CONNECT:
            lf_span(&b, "upstream_connect", 16, r->t_head, r->t_connected);
            break;
        case LF_UPSTREAM_FIRST_BYTE:
            lf_span(&b, "upstream_first_byte", 19, r->t_head, r->t_first_byte);
            break;
        case LF_UPSTREAM:
            if (r->upstream_addr[0]) {
                LF_NAME(&b, "upstream");
                sp_buf_json_str(&b, r->upstream_addr, strlen(r->upstream_addr));
            }
            break;
        case LF_TRACE_ID:
            if (sp_trace_enabled()) {
                sp_trace_ensure((sp_request_t *)r);
                LF_NAME(&b, "trace_id");
                sp_buf_addc(&b, '"');
                sp_buf_add(&b, r->trace_id, 32);
                sp_buf_addc(&b, '"');
            }
            break;
        case LF_ERROR:
            if (sp_error_names[r->error][0]) {
                const char *e = sp_error_names[r->error];
                LF_NAME(&b, "error");
                sp_buf_json_str(&b, e, strlen(e));
                if (r->up_tried) {
                    /* a forwarded request that failed: did any of it reach the sandbox? */
                    LF_NAME(&b, "delivered");
                    if (r->up_sent)
                        sp_buf_lit(&b, "true");
                    else
                        sp_buf_lit(&b, "false");
                }
            }
            break;
        case LF_WORKER:
            LF_NAME(&b, "worker");
            sp_buf_addu(&b, (uint64_t)r->w->id);
            break;
        }
    }
    sp_buf_addc(&b, '}');
    if (r->w->alog) {
        sp_alog_append(r->w, b.p, b.len);
    } else {
        sp_buf_addc(&b, '\n');
        sp_log_raw(1, b.p, b.len);
    }
    sp_buf_free(&b);
    return 0;
}

/* req:set_response_prefix(prefix): the proxied response's Location (a path-absolute one, or an
 * absolute URL on the request's own Host) and Set-Cookie Path get `prefix` put in front of
 * their path unless it is already under it; "" turns it off. Kept as a 'P' entry of r->extra
 * (no allocation of its own); the core looks at it only when resp_prefix is set. */
SP_EXPORT int sp_req_set_response_prefix(sp_request_t *r, const char *p, size_t len)
{
    if (r->resp_head_sent || r->decision != SP_DECIDE_NONE)
        return -EINVAL;
    if (len == 0) {
        r->resp_prefix = false;
        return 0;
    }
    if (p[0] != '/' || p[len - 1] == '/' || len > 1024)
        return -EINVAL;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)p[i] <= 0x20 || p[i] == 0x7f || p[i] == ';' || p[i] == ',')
            return -EINVAL;
    sp_buf_addc(&r->extra, 'P');
    sp_buf_addc(&r->extra, '\0');
    sp_buf_add(&r->extra, p, len);
    sp_buf_addc(&r->extra, '\0');
    r->resp_prefix = true;
    return 0;
}
