/*
 * json_scan.c: see json_scan.h. A recursive-descent validator (RFC 8259 grammar) whose only
 * output is positions; strings are unescaped on request.
 */
#include "base/json_scan.h"

#include <stdarg.h>
#include <stdlib.h>

#define MAX_DEPTH 512

const char *sp_json_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static const char *skip_string(const char *p, const char *end)
{
    if (p >= end || *p != '"')
        return NULL;
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c < 0x20)
            return NULL;
        if (c == '\\') {
            p++;
            if (p >= end)
                return NULL;
            switch (*p) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p++;
                break;
            case 'u':
                if (end - p < 5)
                    return NULL;
                for (int i = 1; i <= 4; i++)
                    if (hexval(p[i]) < 0)
                        return NULL;
                p += 5;
                break;
            default:
                return NULL;
            }
            continue;
        }
        p++;
    }
    return NULL;
}

static const char *skip_number(const char *p, const char *end)
{
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return NULL;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return NULL;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    return p;
}

static const char *skip_lit(const char *p, const char *end, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0)
        return NULL;
    return p + n;
}

static const char *skip_value(const char *p, const char *end, int depth)
{
    p = sp_json_ws(p, end);
    if (p >= end || depth > MAX_DEPTH)
        return NULL;
    switch (*p) {
    case '"': return skip_string(p, end);
    case 't': return skip_lit(p, end, "true");
    case 'f': return skip_lit(p, end, "false");
    case 'n': return skip_lit(p, end, "null");
    case '{': {
        p = sp_json_ws(p + 1, end);
        if (p < end && *p == '}')
            return p + 1;
        for (;;) {
            p = skip_string(sp_json_ws(p, end), end);
            if (!p)
                return NULL;
            p = sp_json_ws(p, end);
            if (p >= end || *p != ':')
                return NULL;
            p = skip_value(p + 1, end, depth + 1);
            if (!p)
                return NULL;
            p = sp_json_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == '}')
                return p + 1;
            return NULL;
        }
    }
    case '[': {
        p = sp_json_ws(p + 1, end);
        if (p < end && *p == ']')
            return p + 1;
        for (;;) {
            p = skip_value(p, end, depth + 1);
            if (!p)
                return NULL;
            p = sp_json_ws(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == ']')
                return p + 1;
            return NULL;
        }
    }
    default: return skip_number(p, end);
    }
}

const char *sp_json_skip(const char *p, const char *end) { return skip_value(p, end, 0); }

/* Compares the JSON string at p (escapes allowed) with key. */
static bool key_equals(const char *p, const char *kend, const char *key)
{
    /* fast path: no escapes */
    size_t n = strlen(key);
    const char *s = p + 1;
    const char *e = kend - 1; /* closing quote */
    if ((size_t)(e - s) == n && memcmp(s, key, n) == 0)
        return true;
    if (!memchr(s, '\\', (size_t)(e - s)))
        return false;
    char tmp[256];
    sp_buf_t b = SP_BUF_ON(tmp);
    bool eq = sp_json_string(p, kend, &b) == 0 && b.len == n && memcmp(b.p, key, n) == 0;
    sp_buf_free(&b);
    return eq;
}

const char *sp_json_get(const char *p, const char *end, const char *key)
{
    p = sp_json_ws(p, end);
    if (p >= end || *p != '{')
        return NULL;
    p = sp_json_ws(p + 1, end);
    if (p < end && *p == '}')
        return NULL;
    for (;;) {
        const char *k = sp_json_ws(p, end);
        const char *kend = skip_string(k, end);
        if (!kend)
            return NULL;
        p = sp_json_ws(kend, end);
        if (p >= end || *p != ':')
            return NULL;
        const char *v = sp_json_ws(p + 1, end);
        if (key_equals(k, kend, key))
            return v;
        p = skip_value(v, end, 1);
        if (!p)
            return NULL;
        p = sp_json_ws(p, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        return NULL;
    }
}

const char *sp_json_path(const char *p, const char *end, ...)
{
    va_list ap;
    va_start(ap, end);
    const char *key;
    while (p && (key = va_arg(ap, const char *)) != NULL)
        p = sp_json_get(p, end, key);
    va_end(ap);
    return p;
}

static void put_utf8(sp_buf_t *out, unsigned cp)
{
    char b[4];
    if (cp < 0x80) {
        sp_buf_addc(out, (char)cp);
    } else if (cp < 0x800) {
        b[0] = (char)(0xc0 | (cp >> 6));
        b[1] = (char)(0x80 | (cp & 0x3f));
        sp_buf_add(out, b, 2);
    } else if (cp < 0x10000) {
        b[0] = (char)(0xe0 | (cp >> 12));
        b[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        b[2] = (char)(0x80 | (cp & 0x3f));
        sp_buf_add(out, b, 3);
    } else {
        b[0] = (char)(0xf0 | (cp >> 18));
        b[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        b[3] = (char)(0x80 | (cp & 0x3f));
        sp_buf_add(out, b, 4);
    }
}

static unsigned hex4(const char *p)
{
    return (unsigned)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

int sp_json_string(const char *p, const char *end, sp_buf_t *out)
{
    p = sp_json_ws(p, end);
    const char *e = skip_string(p, end);
    if (!e)
        return -1;
    const char *s = p + 1;
    e--; /* the closing quote */
    while (s < e) {
        const char *bs = memchr(s, '\\', (size_t)(e - s));
        if (!bs) {
            sp_buf_add(out, s, (size_t)(e - s));
            break;
        }
        sp_buf_add(out, s, (size_t)(bs - s));
        s = bs + 1;
        switch (*s) {
        case 'b': sp_buf_addc(out, '\b'); s++; break;
        case 'f': sp_buf_addc(out, '\f'); s++; break;
        case 'n': sp_buf_addc(out, '\n'); s++; break;
        case 'r': sp_buf_addc(out, '\r'); s++; break;
        case 't': sp_buf_addc(out, '\t'); s++; break;
        case 'u': {
            unsigned cp = hex4(s + 1);
            s += 5;
            if (cp >= 0xd800 && cp < 0xdc00 && e - s >= 6 && s[0] == '\\' && s[1] == 'u') {
                unsigned lo = hex4(s + 2);
                if (lo >= 0xdc00 && lo < 0xe000) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    s += 6;
                }
            }
            put_utf8(out, cp);
            break;
        }
        default: sp_buf_addc(out, *s); s++; break;
        }
    }
    return 0;
}

const char *sp_json_array_first(const char *p, const char *end)
{
    p = sp_json_ws(p, end);
    if (p >= end || *p != '[')
        return NULL;
    p = sp_json_ws(p + 1, end);
    if (p >= end || *p == ']')
        return NULL;
    return p;
}

const char *sp_json_array_next(const char *elem, const char *end)
{
    const char *p = skip_value(elem, end, 1);
    if (!p)
        return NULL;
    p = sp_json_ws(p, end);
    if (p < end && *p == ',')
        return sp_json_ws(p + 1, end);
    return NULL;
}

int sp_json_int(const char *p, const char *end, long long *out)
{
    p = sp_json_ws(p, end);
    const char *e = skip_number(p, end);
    if (!e || e - p > 20)
        return -1;
    char tmp[24];
    memcpy(tmp, p, (size_t)(e - p));
    tmp[e - p] = '\0';
    char *x;
    *out = strtoll(tmp, &x, 10);
    return *x == '\0' ? 0 : -1;
}
