/*
 * proxy_head.c: what crosses the proxy in a message head. The upstream request head (the
 * client's headers minus hop-by-hop ones and those its Connection header lists, the script's
 * edits applied, X-Forwarded-* and trace context added) and the response head for the client
 * (the same filtering the other way, framing chosen for the client's HTTP version, the
 * X-Request-Id and the script's added headers, Location and Set-Cookie put back under a
 * response prefix). Builds bytes into r->out; does no I/O.
 */
#include "http/upstream_int.h"
#include "http/worker.h"
#include "http/trace.h"
#include "base/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

void sp_build_request_head(sp_request_t *r)
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
void sp_build_response_head(sp_upconn_t *u)
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
