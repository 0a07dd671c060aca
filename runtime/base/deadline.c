/*
 * deadline.c: a connection's one lazily armed timeout (see deadline.h).
 */
#include "base/deadline.h"

static void on_timer(uv_timer_t *t)
{
    sp_deadline_t *d = (sp_deadline_t *)t; /* the timer is the first member */
    int kind = d->kind;
    if (kind == 0)
        return; /* cleared since it was armed */
    uint64_t now = uv_now(t->loop);
    uint64_t due = (d->idle ? d->last_active : d->start) + d->ms;
    if (now < due) {
        uv_timer_start(t, on_timer, due - now, 0);
        return;
    }
    d->expired(d, kind);
}

void sp_deadline_init(sp_deadline_t *d, uv_loop_t *loop, sp_deadline_fn expired, void *owner)
{
    uv_timer_init(loop, &d->timer);
    d->timer.data = owner;
    d->expired = expired;
    d->kind = 0;
    d->idle = false;
    d->ms = d->start = d->last_active = 0;
}

void sp_deadline_set(sp_deadline_t *d, int kind, double secs, bool idle)
{
    d->kind = kind;
    d->idle = idle;
    d->ms = (uint64_t)(secs * 1000.0);
    if (d->ms == 0)
        d->ms = 1;
    d->last_active = d->start = uv_now(d->timer.loop);
    if (uv_is_active((uv_handle_t *)&d->timer) && uv_timer_get_due_in(&d->timer) <= d->ms)
        return;
    uv_timer_start(&d->timer, on_timer, d->ms, 0);
}

void sp_deadline_close(sp_deadline_t *d, uv_close_cb cb)
{
    d->kind = 0;
    uv_timer_stop(&d->timer);
    uv_close((uv_handle_t *)&d->timer, cb);
}
