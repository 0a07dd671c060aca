/*
 * trace.c: W3C Trace Context for the proxy's hop and the OTLP/HTTP JSON span exporter (see
 * trace.h). Span ids come from a per-thread xorshift generator seeded from the kernel; the
 * exporter is one queue per worker (spans as JSON text, joined by commas), sent by a timer
 * through the libcurl multi transport of kube.c on the worker's loop. No Lua runs here.
 */
#include "trace.h"
#include "config.h"
#include "kube.h"
#include "log.h"
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

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

/* ------------------------------------------------------------------ the exporter */

struct sp_tracer {
    sp_worker_t *w;
    sp_kube_t *http;
    char *path;           /* the endpoint's path (after host:port) */
    sp_buf_t queue;       /* span objects joined by ',' */
    uint32_t nqueued;
    uint32_t ninflight;   /* spans in the POST under way */
    sp_kreq_t *inflight;
    uv_timer_t timer;
    int64_t wall_offset_ns; /* unix time ns - uv_hrtime */
    bool failing;         /* the last export failed (one log line per failure streak) */
};

static void on_export_done(sp_kreq_t *kr, int curl_code, const char *curl_error, long status,
                           void *ud)
{
    SP_UNUSED(kr);
    struct sp_tracer *t = ud;
    uint32_t n = t->ninflight;
    t->inflight = NULL;
    t->ninflight = 0;
    if (curl_code == 0 && status >= 200 && status < 300) {
        SP_STAT_ADD(t->w->stats.trace_spans_exported, n);
        if (t->failing)
            sp_log(SP_LOG_INFO, "span export recovered", "i:worker", (int64_t)t->w->id, NULL);
        t->failing = false;
        return;
    }
    SP_STAT_ADD(t->w->stats.trace_spans_dropped, n);
    if (!t->failing)
        sp_log(SP_LOG_WARN, "span export failed: spans dropped", "i:worker", (int64_t)t->w->id,
               "i:status", (int64_t)status, "s:error", curl_code ? curl_error : "", "i:spans",
               (int64_t)n, NULL);
    t->failing = true;
}

static void export_batch(struct sp_tracer *t)
{
    if (t->inflight || t->nqueued == 0)
        return;
    sp_buf_t body = {0};
    sp_buf_lit(&body, "{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\","
                      "\"value\":{\"stringValue\":");
    const char *svc = sp_cfg.otlp_service_name ? sp_cfg.otlp_service_name : "sandbox-proxy";
    sp_buf_json_str(&body, svc, strlen(svc));
    sp_buf_lit(&body, "}}]},\"scopeSpans\":[{\"scope\":{\"name\":\"sandbox-proxy\",\"version\":\"" SP_VERSION
                      "\"},\"spans\":[");
    sp_buf_add(&body, t->queue.p, t->queue.len);
    sp_buf_lit(&body, "]}]}]}");
    t->ninflight = t->nqueued;
    t->nqueued = 0;
    t->queue.len = 0;
    t->inflight = sp_kube_request(t->http, "POST", t->path, "application/json", body.p, body.len,
                                  (long)(sp_cfg.otlp_timeout * 1000), NULL, on_export_done, t);
    sp_buf_free(&body);
    if (!t->inflight) {
        SP_STAT_ADD(t->w->stats.trace_spans_dropped, t->ninflight);
        t->ninflight = 0;
    }
}

static void on_timer(uv_timer_t *h) { export_batch(h->data); }

void sp_trace_worker_start(sp_worker_t *w)
{
    const char *ep = sp_cfg.otlp_endpoint;
    if (!ep || !*ep)
        return;
    /* split http://host:port/path */
    const char *scheme_end = strstr(ep, "://");
    const char *slash = scheme_end ? strchr(scheme_end + 3, '/') : NULL;
    char server[512];
    size_t sl = slash ? (size_t)(slash - ep) : strlen(ep);
    if (sl >= sizeof server) {
        sp_log(SP_LOG_ERROR, "otlp_endpoint too long: span export off", NULL);
        return;
    }
    memcpy(server, ep, sl);
    server[sl] = '\0';
    sp_kube_conf_t conf = {.server = server};
    char err[256];
    sp_kube_t *http = sp_kube_new(&w->loop, &conf, err);
    if (!http) {
        sp_log(SP_LOG_ERROR, "otlp_endpoint: span export off", "s:error", err, NULL);
        return;
    }
    struct sp_tracer *t = sp_calloc(1, sizeof *t);
    t->w = w;
    t->http = http;
    t->path = sp_strdup(slash ? slash : "/v1/traces");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    t->wall_offset_ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec - (int64_t)uv_hrtime();
    uv_timer_init(&w->loop, &t->timer);
    t->timer.data = t;
    uint64_t ms = (uint64_t)(sp_cfg.otlp_batch_interval * 1000);
    if (ms == 0)
        ms = 1;
    uv_timer_start(&t->timer, on_timer, ms, ms);
    uv_unref((uv_handle_t *)&t->timer);
    w->tracer = t;
}

static void on_timer_closed(uv_handle_t *h) { free(h->data); }

/* Before the loop's handles are closed: spans still queued are dropped (counted). The
 * tracer is freed once its timer has closed. */
void sp_trace_worker_stop(sp_worker_t *w)
{
    struct sp_tracer *t = w->tracer;
    if (!t)
        return;
    w->tracer = NULL;
    SP_STAT_ADD(w->stats.trace_spans_dropped, t->nqueued + t->ninflight);
    sp_kube_free(t->http); /* cancels the POST under way: no callback */
    sp_buf_free(&t->queue);
    free(t->path);
    uv_timer_stop(&t->timer);
    uv_close((uv_handle_t *)&t->timer, on_timer_closed);
}

static void attr_str(sp_buf_t *b, const char *key, const char *v, size_t n, bool first)
{
    if (!first)
        sp_buf_addc(b, ',');
    sp_buf_lit(b, "{\"key\":\"");
    sp_buf_adds(b, key);
    sp_buf_lit(b, "\",\"value\":{\"stringValue\":");
    sp_buf_json_str(b, v, n);
    sp_buf_lit(b, "}}");
}

static void attr_int(sp_buf_t *b, const char *key, uint64_t v)
{
    sp_buf_lit(b, ",{\"key\":\"");
    sp_buf_adds(b, key);
    sp_buf_lit(b, "\",\"value\":{\"intValue\":\"");
    sp_buf_addu(b, v);
    sp_buf_lit(b, "\"}}");
}

static void attr_bool(sp_buf_t *b, const char *key, bool v)
{
    sp_buf_lit(b, ",{\"key\":\"");
    sp_buf_adds(b, key);
    sp_buf_lit(b, "\",\"value\":{\"boolValue\":");
    if (v)
        sp_buf_lit(b, "true}}");
    else
        sp_buf_lit(b, "false}}");
}

static void span_head(sp_buf_t *b, const sp_request_t *r, const char *span, const char *parent,
                      const char *name, int kind, uint64_t t0, uint64_t t1, int64_t off)
{
    sp_buf_lit(b, "{\"traceId\":\"");
    sp_buf_add(b, r->trace_id, 32);
    sp_buf_lit(b, "\",\"spanId\":\"");
    sp_buf_add(b, span, 16);
    sp_buf_lit(b, "\",");
    if (parent) {
        sp_buf_lit(b, "\"parentSpanId\":\"");
        sp_buf_add(b, parent, 16);
        sp_buf_lit(b, "\",");
    }
    sp_buf_lit(b, "\"name\":");
    sp_buf_json_str(b, name, strlen(name));
    sp_buf_lit(b, ",\"kind\":");
    sp_buf_addu(b, (uint64_t)kind);
    sp_buf_lit(b, ",\"startTimeUnixNano\":\"");
    sp_buf_addu(b, (uint64_t)((int64_t)t0 + off));
    sp_buf_lit(b, "\",\"endTimeUnixNano\":\"");
    sp_buf_addu(b, (uint64_t)((int64_t)t1 + off));
    sp_buf_lit(b, "\",\"attributes\":[");
}

static void span_status(sp_buf_t *b, bool error)
{
    sp_buf_lit(b, "],\"status\":{\"code\":");
    sp_buf_addc(b, error ? '2' : '0');
    sp_buf_lit(b, "}}");
}

/* Room for one span in the queue. A full queue goes out at once when no POST is under way
 * (so the rate of spans is bounded by the receiver, not by the timer); with a POST under way
 * the span is dropped and counted. */
static bool room(struct sp_tracer *t)
{
    if (t->nqueued >= (uint32_t)sp_cfg.otlp_queue_size) {
        if (!t->inflight)
            export_batch(t);
        if (t->nqueued >= (uint32_t)sp_cfg.otlp_queue_size) {
            SP_STAT_ADD(t->w->stats.trace_spans_dropped, 1);
            return false;
        }
    }
    if (t->nqueued)
        sp_buf_addc(&t->queue, ',');
    t->nqueued++;
    return true;
}

void sp_trace_request_done(sp_request_t *r)
{
    struct sp_tracer *t = r->w->tracer;
    if (!t)
        return;
    /* the main listener only: scrapes of a separate metrics listener are not traced */
    if (!r->listener || strcmp(r->listener, "main") != 0)
        return;
    sp_trace_ensure(r);
    if (!(r->trace_flags & 1))
        return; /* the caller's trace is not sampled */
    const char *method = llhttp_method_name((llhttp_method_t)r->method);
    uint64_t t_end = r->t_end ? r->t_end : uv_hrtime();
    int status = r->resp_status > 0 ? r->resp_status : 0;
    bool err = status >= 500 || status == 0;
    if (room(t)) {
        sp_buf_t *b = &t->queue;
        span_head(b, r, r->span_id, r->trace_has_parent ? r->trace_parent : NULL, method, 2,
                  r->t_start, t_end, t->wall_offset_ns);
        attr_str(b, "http.request.method", method, strlen(method), true);
        attr_str(b, "url.path", r->head.p, r->path_len, false);
        attr_str(b, "client.address", r->client_ip, strlen(r->client_ip), false);
        attr_str(b, "sandbox_proxy.request_id", r->id, r->id_len, false);
        if (status)
            attr_int(b, "http.response.status_code", (uint64_t)status);
        if (sp_error_names[r->error][0])
            attr_str(b, "error.type", sp_error_names[r->error], strlen(sp_error_names[r->error]),
                     false);
        if (r->t_forward && r->t_forward > r->t_start)
            attr_int(b, "sandbox_proxy.before_upstream_ns", r->t_forward - r->t_start);
        span_status(b, err);
    }
    if (r->t_wake_start && room(t)) {
        /* the hold while the sandbox woke or started: a child of the request span, before the
         * upstream span */
        sp_buf_t *b = &t->queue;
        char id[16];
        random_id(id);
        uint64_t t1 = r->t_wake_end ? r->t_wake_end : (r->t_forward ? r->t_forward : t_end);
        const char *outcome = r->t_wake_end ? r->wake_outcome : "unfinished";
        span_head(b, r, id, r->span_id, "wake", 1, r->t_wake_start, t1, t->wall_offset_ns);
        attr_str(b, "sandbox_proxy.wake.outcome", outcome, strlen(outcome), true);
        attr_bool(b, "sandbox_proxy.wake.patched", r->wake_patched);
        if (r->wake_status)
            attr_int(b, "sandbox_proxy.wake.patch_status", (uint64_t)r->wake_status);
        span_status(b, strcmp(outcome, "ready") != 0);
    }
    if (r->t_forward && room(t)) {
        sp_buf_t *b = &t->queue;
        char name[32];
        snprintf(name, sizeof name, "upstream %s", method);
        span_head(b, r, r->up_span_id, r->span_id, name, 3, r->t_forward, t_end,
                  t->wall_offset_ns);
        attr_str(b, "server.address", r->up_host, strlen(r->up_host), true);
        attr_int(b, "server.port", (uint64_t)(r->up_port > 0 ? r->up_port : 0));
        if (r->t_connected && r->t_connected >= r->t_forward)
            attr_int(b, "sandbox_proxy.connect_ns", r->t_connected - r->t_forward);
        if (r->t_first_byte && r->t_first_byte >= r->t_forward)
            attr_int(b, "sandbox_proxy.first_byte_ns", r->t_first_byte - r->t_forward);
        if (status && r->head_sent)
            attr_int(b, "http.response.status_code", (uint64_t)status);
        if (sp_error_names[r->error][0])
            attr_str(b, "error.type", sp_error_names[r->error], strlen(sp_error_names[r->error]),
                     false);
        span_status(b, err);
    }
}
