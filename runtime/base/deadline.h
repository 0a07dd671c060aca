/*
 * deadline.h: a connection's one timeout, armed lazily (deadline.c). Client and sandbox
 * connections each hold one. Setting a deadline records it; the libuv timer is re-armed only
 * when the new deadline is earlier than the armed one, and when it fires it re-arms itself for
 * the real deadline or does nothing (cleared since). A keep-alive exchange then touches no
 * timer heap at all. An "idle" deadline counts from the last activity (sp_deadline_touch), the
 * others from when they were set.
 */
#ifndef SP_DEADLINE_H
#define SP_DEADLINE_H

#include <uv.h>

#include "base/sp.h"

typedef struct sp_deadline sp_deadline_t;
/* Called on the loop when a deadline of `kind` has passed (d->kind stays set until the owner
 * sets or clears it; the timer is not armed again). */
typedef void (*sp_deadline_fn)(sp_deadline_t *d, int kind);

struct sp_deadline {
    uv_timer_t timer; /* its data is the owner's (close callbacks use it) */
    sp_deadline_fn expired;
    int kind;         /* 0: none */
    bool idle;
    uint64_t ms;      /* the timeout */
    uint64_t start;   /* uv_now ms when it was set */
    uint64_t last_active;
};

/* Initialises d on loop; owner goes into d->timer.data. */
void sp_deadline_init(sp_deadline_t *d, uv_loop_t *loop, sp_deadline_fn expired, void *owner);
/* Sets the one deadline: `kind` (non-zero) after secs (at least 1 ms), counted from now, or from
 * the last activity when idle. */
void sp_deadline_set(sp_deadline_t *d, int kind, double secs, bool idle);
static inline void sp_deadline_clear(sp_deadline_t *d) { d->kind = 0; }
/* Activity: an idle deadline counts again from now. */
static inline void sp_deadline_touch(sp_deadline_t *d)
{
    d->last_active = uv_now(d->timer.loop);
}
/* Stops and closes the timer (cb gets &d->timer). */
void sp_deadline_close(sp_deadline_t *d, uv_close_cb cb);

#endif
