/*
 * worker.c: the worker record's registry, buffers and script-call marks (worker.h). The
 * threads are process/workers.c's.
 */
#include "http/worker.h"
#include "base/config.h"

#include <stdlib.h>
#include <string.h>

static sp_worker_t *all;
static int nall;

void sp_workers_register(sp_worker_t *w, int n)
{
    all = w;
    nall = n;
}

int sp_workers_count(void) { return nall; }
sp_worker_t *sp_worker_get(int i) { return (i >= 0 && i < nall) ? &all[i] : NULL; }

int sp_workers_stuck(int *ids, int max)
{
    int n = 0;
    for (int i = 0; i < nall && n < max; i++)
        if (!atomic_load(&all[i].exited) && atomic_load(&all[i].stuck))
            ids[n++] = all[i].id;
    return n;
}

void sp_worker_buffers_init(sp_worker_t *w, size_t client_keep, size_t upstream_keep)
{
    sp_pool_init(&w->client_bufs, (size_t)sp_cfg.client_buffer_size, client_keep);
    w->read_scratch = sp_malloc((size_t)sp_cfg.client_buffer_size);
    sp_pool_init(&w->upstream_bufs, (size_t)sp_cfg.upstream_buffer_size, upstream_keep);
    /* few kept: a block is touched through (large bodies), unlike the head-sized ones */
    size_t body_keep = upstream_keep < 16 ? upstream_keep : 16;
    sp_pool_init(&w->upstream_body_bufs, (size_t)sp_cfg.upstream_body_buffer_size, body_keep);
}

void sp_worker_buffers_free(sp_worker_t *w)
{
    sp_pool_destroy(&w->client_bufs);
    free(w->read_scratch);
    w->read_scratch = NULL;
    sp_pool_destroy(&w->upstream_bufs);
    sp_pool_destroy(&w->upstream_body_bufs);
}

void sp_worker_script_begin(sp_worker_t *w, const char *what, size_t len)
{
    if (w->script_depth++ > 0)
        return; /* a nested resume is part of the outer call */
    if (len >= sizeof w->script_what)
        len = sizeof w->script_what - 1;
    memcpy(w->script_what, what, len);
    w->script_what[len] = '\0';
    atomic_store_explicit(&w->script_since_ns, uv_hrtime(), memory_order_release);
}

void sp_worker_script_end(sp_worker_t *w)
{
    if (--w->script_depth == 0)
        atomic_store_explicit(&w->script_since_ns, 0, memory_order_relaxed);
}

