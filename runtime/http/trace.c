/*
 * trace.c: W3C Trace Context for the proxy's hop (see trace.h). Span ids come from a
 * per-thread xorshift generator seeded from the kernel. The span exporter is the process
 * layer's (process/otlp.c), reached through the worker's span sink. No Lua runs here.
 */
#include "http/trace.h"
#include "base/config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

static const char HEX[] = "0123456789abcdef";

bool sp_trace_enabled(void) { return sp_cfg.trace_propagation || sp_cfg.otlp_endpoint; }

/* ------------------------------------------------------------------ ids */

static _Thread_local uint64_t rng_s[2];

static uint64_t rng_next(void)
{
    if (!rng_s[0] && !rng_s[1]) {
        if (getrandom(rng_s, sizeof rng_s, 0) != (ssize_t)sizeof rng_s || (!rng_s[0] && !rng_s[1])) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            rng_s[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)&ts;
            rng_s[1] = (uint64_t)ts.tv_sec ^ 0xd1b54a32d192ed03ULL;
        }
    }
    /* xorshift128+ */
    uint64_t s1 = rng_s[0];
    const uint64_t s0 = rng_s[1];
    rng_s[0] = s0;
    s1 ^= s1 << 23;
    rng_s[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return rng_s[1] + s0;
}

/* 16 hex digits of a random non-zero 64-bit id. */
static void random_id(char out[16])
{
    uint64_t v;
    do
        v = rng_next();
    while (v == 0);
    for (int i = 15; i >= 0; i--) {
        out[i] = HEX[v & 15];
        v >>= 4;
    }
}

void sp_trace_random_id(char out[16]) { random_id(out); }

static bool lower_hex(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
            return false;
    return true;
}

static bool all_zero(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != '0')
            return false;
    return true;
}

static int hexval(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

/* version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2 = 55 bytes. Version 00 is
 * exactly that; a later version may append "-..." (read as 00); ff is invalid. */
bool sp_trace_parse(const char *v, size_t len, char trace_id[32], char parent_id[16],
                    uint8_t *flags)
{
    /* surrounding optional whitespace is not part of the value */
    while (len && (v[0] == ' ' || v[0] == '\t'))
        v++, len--;
    while (len && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (len < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-')
        return false;
    if (!lower_hex(v, 2) || (v[0] == 'f' && v[1] == 'f'))
        return false;
    bool v00 = v[0] == '0' && v[1] == '0';
    if ((v00 && len != 55) || (!v00 && len > 55 && v[55] != '-'))
        return false;
    if (!lower_hex(v + 3, 32) || all_zero(v + 3, 32) || !lower_hex(v + 36, 16) ||
        all_zero(v + 36, 16) || !lower_hex(v + 53, 2))
        return false;
    memcpy(trace_id, v + 3, 32);
    memcpy(parent_id, v + 36, 16);
    *flags = (uint8_t)(hexval(v[53]) << 4 | hexval(v[54]));
    return true;
}

void sp_trace_ensure(sp_request_t *r)
{
    if (r->trace_ready)
        return;
    r->trace_ready = true;
    size_t len = 0;
    const char *v = sp_request_header(r, "traceparent", 11, &len);
    if (v && sp_trace_parse(v, len, r->trace_id, r->trace_parent, &r->trace_flags)) {
        r->trace_has_parent = true;
    } else {
        r->trace_has_parent = false;
        random_id(r->trace_id);
        random_id(r->trace_id + 16);
        /* a trace we start is sampled when we export it */
        r->trace_flags = sp_cfg.otlp_endpoint ? 1 : 0;
    }
    random_id(r->span_id);
    random_id(r->up_span_id);
}

void sp_trace_write_header(sp_request_t *r, sp_buf_t *o)
{
    char line[13 + 55 + 2];
    memcpy(line, "traceparent: 00-", 16);
    memcpy(line + 16, r->trace_id, 32);
    line[48] = '-';
    memcpy(line + 49, r->up_span_id, 16);
    line[65] = '-';
    line[66] = HEX[(r->trace_flags >> 4) & 15];
    line[67] = HEX[r->trace_flags & 15];
    line[68] = '\r';
    line[69] = '\n';
    sp_buf_add(o, line, 70);
}
