/*
 * trace.h: W3C Trace Context (traceparent / tracestate) for the proxy's hop, and the optional
 * OpenTelemetry span export (OTLP/HTTP JSON, process/otlp.c). Both are computed in C, only
 * when a knob asks:
 *   trace_propagation (default on): the sandbox receives a traceparent with the client's trace
 *     id (a new trace when the client sent none or a malformed one) and the proxy's upstream
 *     span as its parent; tracestate passes on only with a valid traceparent;
 *   otlp_endpoint (default unset): each sampled request's spans (the request; as its children
 *     the wake of a held request, marked by req:wake_begin/_end, and the upstream exchange)
 *     are queued per worker (otlp_queue_size; beyond: dropped and counted) and POSTed in one
 *     batch every otlp_batch_interval seconds (at once when the queue is full and no POST is
 *     under way), through the same libcurl-on-libuv transport as the Kubernetes client.
 * With both off nothing here runs for a request.
 */
#ifndef SP_TRACE_H
#define SP_TRACE_H

#include "http/http.h"

/* Is any tracing on (propagation or export)? */
bool sp_trace_enabled(void);
/* Computes the request's trace context once (parses the client's traceparent, makes the span
 * ids). Cheap; a no-op after the first call for the request. */
void sp_trace_ensure(sp_request_t *r);
/* A new random non-zero span id (16 hex digits), e.g. for a span beyond the two the request
 * carries (the wake span of process/otlp.c). */
void sp_trace_random_id(char out[16]);
/* Appends "traceparent: ...\r\n" for the upstream request (after sp_trace_ensure). */
void sp_trace_write_header(sp_request_t *r, sp_buf_t *o);
/* A worker's span sink (w->tracer; process/otlp.c installs one when otlp_endpoint is set):
 * the log phase hands it each finished request. */
typedef struct sp_span_sink {
    void (*request_done)(struct sp_span_sink *sink, sp_request_t *r);
} sp_span_sink_t;

/* Validates a traceparent value (W3C Trace Context level 1). On success fills trace_id (32
 * hex), parent_id (16 hex) and flags and returns true. Exposed for the C unit tests. */
bool sp_trace_parse(const char *v, size_t len, char trace_id[32], char parent_id[16],
                    uint8_t *flags);

#endif
