/*
 * otlp.h: the optional OpenTelemetry span export (otlp.c). With otlp_endpoint set, each sampled
 * request's spans (the request; as its children the wake of a held request, marked by
 * req:wake_begin/_end, and the upstream exchange) are queued per worker
 * (otlp_queue_size; beyond: dropped and counted) and POSTed in one batch every
 * otlp_batch_interval seconds (at once when the queue is full and no POST is under way),
 * through the same libcurl-on-libuv transport as the Kubernetes client.
 */
#ifndef SP_OTLP_H
#define SP_OTLP_H

#include "http/worker.h"

/* Per worker: installs the exporter as w->tracer (nothing without otlp_endpoint). */
void sp_otlp_start(sp_worker_t *w);
/* Before the loop's handles are closed: spans still queued are dropped (counted). */
void sp_otlp_stop(sp_worker_t *w);

#endif
