/*
 * otlp.c: the OpenTelemetry span exporter (OTLP/HTTP JSON; see otlp.h). One queue per worker
 * (spans as JSON text, joined by commas), sent by a timer through the libcurl multi transport
 * of kube/kube.c on the worker's loop. It is the worker's span sink: the HTTP core hands it each
 * finished request (w->tracer) and never sees the transport. No Lua runs here.
 */
#include "process/otlp.h"
#include "base/config.h"
#include "base/log.h"
#include "http/trace.h"
#include "kube/kube.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void request_done(sp_span_sink_t *sink, sp_request_t *r);


struct sp_tracer {
    sp_span_sink_t sink;  /* first: w->tracer points here */
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

void sp_otlp_start(sp_worker_t *w)
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
    t->sink.request_done = request_done;
    w->tracer = &t->sink;
}

static void on_timer_closed(uv_handle_t *h) { free(h->data); }

/* Before the loop's handles are closed: spans still queued are dropped (counted). The
 * tracer is freed once its timer has closed. */
void sp_otlp_stop(sp_worker_t *w)
{
    struct sp_tracer *t = (struct sp_tracer *)w->tracer;
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

static void request_done(sp_span_sink_t *sink, sp_request_t *r)
{
    struct sp_tracer *t = (struct sp_tracer *)sink;
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
        sp_trace_random_id(id);
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
