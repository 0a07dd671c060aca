/*
 * test_deadline.c: unit tests of base/deadline (the lazily armed per-connection timeout) on a
 * real libuv loop: it fires once its time has passed, never for a cleared deadline, re-arms
 * for an earlier deadline and waits for a later one, counts an idle deadline from the last
 * activity, and closes. Lower bounds only (a timer never fires early); a 5 s guard timer ends
 * a loop whose deadline never fired.
 */
#include "test.h"

#include "base/deadline.h"

typedef struct probe {
    sp_deadline_t d; /* first */
    uv_timer_t guard, poke;
    int fired, kind;
    uint64_t t0, at;
    bool guard_hit, closed;
} probe_t;

static void on_expired(sp_deadline_t *d, int kind)
{
    probe_t *p = (probe_t *)d;
    p->fired++;
    p->kind = kind;
    p->at = uv_now(d->timer.loop);
    uv_timer_stop(&p->guard);
}

static void on_guard(uv_timer_t *t)
{
    probe_t *p = t->data;
    p->guard_hit = true;
    sp_deadline_clear(&p->d);
    uv_timer_stop(&p->d.timer);
}

static void on_closed(uv_handle_t *h)
{
    probe_t *p = h->data;
    p->closed = true;
}

static void on_guard_closed(uv_handle_t *h) { (void)h; }

static void probe_init(probe_t *p, uv_loop_t *loop)
{
    memset(p, 0, sizeof *p);
    sp_deadline_init(&p->d, loop, on_expired, p);
    uv_timer_init(loop, &p->guard);
    uv_timer_init(loop, &p->poke);
    p->guard.data = p->poke.data = p;
    uv_update_time(loop);
    p->t0 = uv_now(loop);
    uv_timer_start(&p->guard, on_guard, 5000, 0);
}

static void probe_done(probe_t *p, uv_loop_t *loop)
{
    sp_deadline_close(&p->d, on_closed);
    uv_close((uv_handle_t *)&p->guard, on_guard_closed);
    uv_close((uv_handle_t *)&p->poke, on_guard_closed);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(p->closed);
}

static void test_fires_after_its_time(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 3, 0.03, false);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 1);
    CHECK_INT(p.kind, 3);
    CHECK(!p.guard_hit);
    CHECK(p.at - p.t0 >= 30);
    probe_done(&p, loop);
}

static void test_cleared_never_fires(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    uv_timer_stop(&p.guard); /* the armed timer fires and finds nothing to do */
    sp_deadline_set(&p.d, 1, 0.02, false);
    sp_deadline_clear(&p.d);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 0);
    probe_done(&p, loop);
}

static void test_earlier_rearms(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 1, 60, false);  /* a minute */
    sp_deadline_set(&p.d, 2, 0.01, false); /* then 10 ms: must re-arm */
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK(!p.guard_hit);
    CHECK_INT(p.fired, 1);
    CHECK_INT(p.kind, 2);
    probe_done(&p, loop);
}

static void test_later_waits(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 1, 0.01, false);
    sp_deadline_set(&p.d, 4, 0.06, false); /* later: recorded only; the armed timer re-arms */
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 1);
    CHECK_INT(p.kind, 4);
    CHECK(p.at - p.t0 >= 60);
    probe_done(&p, loop);
}

static void on_poke(uv_timer_t *t)
{
    probe_t *p = t->data;
    sp_deadline_touch(&p->d);
}

static void test_idle_counts_from_activity(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 5, 0.04, true);
    uv_timer_start(&p.poke, on_poke, 30, 0); /* activity at 30 ms: due at 70 ms or later */
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 1);
    CHECK(p.at - p.t0 >= 70);
    probe_done(&p, loop);

    /* the same without idle: activity does not move it (due at 40 ms) */
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 5, 0.04, false);
    uv_timer_start(&p.poke, on_poke, 30, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 1);
    CHECK(p.at - p.t0 >= 40);
    CHECK(p.at >= p.d.last_active);
    probe_done(&p, loop);
}

static void test_zero_is_one_ms(uv_loop_t *loop)
{
    probe_t p;
    probe_init(&p, loop);
    sp_deadline_set(&p.d, 1, 0, false);
    CHECK_INT(p.d.ms, 1);
    uv_run(loop, UV_RUN_DEFAULT);
    CHECK_INT(p.fired, 1);
    probe_done(&p, loop);
}

void suite_deadline(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    test_fires_after_its_time(&loop);
    test_cleared_never_fires(&loop);
    test_earlier_rearms(&loop);
    test_later_waits(&loop);
    test_idle_counts_from_activity(&loop);
    test_zero_is_one_ms(&loop);
    g_tests += 6;
    CHECK_INT(uv_loop_close(&loop), 0);
}
