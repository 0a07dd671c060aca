/*
 * accesslog.c: the buffered access-log writer, one per worker. Scripts append complete JSON
 * lines (core.access_log); they are written to stdout by libuv's thread pool, so a slow
 * reader of stdout never blocks a loop. Lines collect while a write is in flight; past 16x
 * access_log_buffer they are dropped and counted (accesslog_dropped) rather than block. A
 * timer flushes every access_log_flush seconds, and shutdown writes what is left.
 */
#include "http/worker.h"
#include "base/config.h"
#include "base/log.h"

#include <stdlib.h>

struct sp_alog {
    sp_worker_t *w;
    sp_buf_t buf;      /* lines being collected */
    sp_buf_t inflight; /* lines the thread pool is writing */
    uv_work_t work;
    uv_timer_t timer;
    bool busy;
    bool closed;
};

static void write_work(uv_work_t *req)
{
    struct sp_alog *a = req->data;
    sp_log_raw(1, a->inflight.p, a->inflight.len);
}

static void flush(struct sp_alog *a);

static void after_write(uv_work_t *req, int status)
{
    SP_UNUSED(status);
    struct sp_alog *a = req->data;
    a->busy = false;
    a->inflight.len = 0;
    if (a->buf.len >= (size_t)sp_cfg.access_log_buffer)
        flush(a);
}

static void flush(struct sp_alog *a)
{
    if (a->busy || a->buf.len == 0 || a->closed)
        return;
    sp_buf_t t = a->inflight;
    a->inflight = a->buf;
    a->buf = t;
    a->buf.len = 0;
    a->busy = true;
    a->work.data = a;
    if (uv_queue_work(&a->w->loop, &a->work, write_work, after_write) != 0) {
        /* no thread pool: write here (never expected) */
        sp_log_raw(1, a->inflight.p, a->inflight.len);
        a->inflight.len = 0;
        a->busy = false;
    }
}

static void on_timer(uv_timer_t *t) { flush(t->data); }

void sp_alog_start(sp_worker_t *w)
{
    struct sp_alog *a = sp_calloc(1, sizeof *a);
    a->w = w;
    uv_timer_init(&w->loop, &a->timer);
    a->timer.data = a;
    uint64_t ms = (uint64_t)(sp_cfg.access_log_flush * 1000);
    if (ms == 0)
        ms = 1;
    uv_timer_start(&a->timer, on_timer, ms, ms);
    uv_unref((uv_handle_t *)&a->timer);
    w->alog = a;
}

void sp_alog_append(sp_worker_t *w, const char *line, size_t len)
{
    struct sp_alog *a = w->alog;
    if (!a)
        return;
    if (a->buf.len + len + 1 > (size_t)sp_cfg.access_log_buffer * 16) {
        SP_STAT_ADD(w->stats.accesslog_dropped, 1);
        return;
    }
    sp_buf_add(&a->buf, line, len);
    sp_buf_addc(&a->buf, '\n');
    if (a->buf.len >= (size_t)sp_cfg.access_log_buffer)
        flush(a);
}

/* Stops the timer; call before closing the loop's handles. The in-flight write completes
 * while the loop runs down; sp_alog_finish writes the rest. */
void sp_alog_stop(sp_worker_t *w)
{
    struct sp_alog *a = w->alog;
    if (!a)
        return;
    a->closed = true;
    uv_timer_stop(&a->timer);
}

/* After the loop has stopped: writes what is left and frees the writer. */
void sp_alog_finish(sp_worker_t *w)
{
    struct sp_alog *a = w->alog;
    if (!a)
        return;
    if (a->inflight.len && !a->busy)
        sp_log_raw(1, a->inflight.p, a->inflight.len);
    if (a->buf.len)
        sp_log_raw(1, a->buf.p, a->buf.len);
    sp_buf_free(&a->buf);
    sp_buf_free(&a->inflight);
    free(a);
    w->alog = NULL;
}
