/*
 * fswatch.c: the change watcher (see fswatch.h).
 */
#include "base/fswatch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define SP_FSWATCH_SETTLE_MAX 10

struct sp_fswatch {
    uv_fs_event_t ev[SP_FSWATCH_MAX_DIRS];
    uv_timer_t debounce;
    uv_timer_t poll;
    int nev;
    int handles;   /* open handles; freed at 0 */
    bool stopped;
    unsigned debounce_ms;
    uint64_t burst_start; /* uv_now ms of the first event of the burst being settled */
    uint64_t last;
    sp_fswatch_sig_fn sig;
    sp_fswatch_fn changed;
    void *ud;
};

static void check(sp_fswatch_t *w)
{
    if (w->stopped)
        return;
    uint64_t s = w->sig(w->ud);
    if (s == w->last)
        return;
    w->last = s;
    w->changed(w->ud);
}

static void on_settled(uv_timer_t *t) { check(t->data); }

/* The poll changes nothing itself: a difference it sees settles like an event's. */
static void on_poll(uv_timer_t *t)
{
    sp_fswatch_t *w = t->data;
    if (!w->stopped && !uv_is_active((uv_handle_t *)&w->debounce) && w->sig(w->ud) != w->last) {
        w->burst_start = uv_now(t->loop);
        uv_timer_start(&w->debounce, on_settled, w->debounce_ms, 0);
    }
}

static void on_event(uv_fs_event_t *h, const char *file, int events, int status)
{
    SP_UNUSED(file);
    SP_UNUSED(events);
    SP_UNUSED(status);
    sp_fswatch_t *w = h->data;
    if (w->stopped)
        return;
    /* Changes come in bursts (a ConfigMap update is several renames): each event moves the
     * check later, but a burst that never ends (a log file written in the same directory) is
     * checked SP_FSWATCH_SETTLE_MAX times debounce_ms after it began. */
    uint64_t now = uv_now(h->loop);
    if (!uv_is_active((uv_handle_t *)&w->debounce))
        w->burst_start = now;
    if (now - w->burst_start < (uint64_t)w->debounce_ms * SP_FSWATCH_SETTLE_MAX)
        uv_timer_start(&w->debounce, on_settled, w->debounce_ms, 0);
}

sp_fswatch_t *sp_fswatch_start(uv_loop_t *loop, const char *const *dirs, int ndirs,
                               unsigned debounce_ms, unsigned poll_ms, sp_fswatch_sig_fn sig,
                               sp_fswatch_fn changed, void *ud)
{
    sp_fswatch_t *w = sp_calloc(1, sizeof *w);
    w->sig = sig;
    w->changed = changed;
    w->ud = ud;
    w->debounce_ms = debounce_ms;
    w->last = sig(ud);
    uv_timer_init(loop, &w->debounce);
    uv_timer_init(loop, &w->poll);
    w->debounce.data = w->poll.data = w;
    w->handles = 2;
    for (int i = 0; i < ndirs && i < SP_FSWATCH_MAX_DIRS; i++) {
        uv_fs_event_init(loop, &w->ev[i]);
        w->ev[i].data = w;
        w->handles++;
        w->nev++;
        uv_fs_event_start(&w->ev[i], on_event, dirs[i], 0);
    }
    if (poll_ms)
        uv_timer_start(&w->poll, on_poll, poll_ms, poll_ms);
    return w;
}

void sp_fswatch_rebase(sp_fswatch_t *w) { w->last = w->sig(w->ud); }

static void on_closed(uv_handle_t *h)
{
    sp_fswatch_t *w = h->data;
    if (--w->handles == 0)
        free(w);
}

void sp_fswatch_stop(sp_fswatch_t *w)
{
    if (!w || w->stopped)
        return;
    w->stopped = true;
    uv_close((uv_handle_t *)&w->debounce, on_closed);
    uv_close((uv_handle_t *)&w->poll, on_closed);
    for (int i = 0; i < w->nev; i++)
        uv_close((uv_handle_t *)&w->ev[i], on_closed);
}

static uint64_t mix(uint64_t h, uint64_t v) { return sp_hash_more(h, &v, sizeof v); }

uint64_t sp_stat_sig(uint64_t h, const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return mix(h, 1);
    h = mix(h, (uint64_t)st.st_ino);
    h = mix(h, (uint64_t)st.st_dev);
    h = mix(h, (uint64_t)st.st_size);
    h = mix(h, (uint64_t)st.st_mtim.tv_sec * 1000000000ull + (uint64_t)st.st_mtim.tv_nsec);
    h = mix(h, (uint64_t)st.st_ctim.tv_sec * 1000000000ull + (uint64_t)st.st_ctim.tv_nsec);
    return h;
}

void sp_dir_of(const char *path, char *out, size_t size)
{
    struct stat st;
    snprintf(out, size, "%s", path);
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return;
    char *slash = strrchr(out, '/');
    if (slash == out)
        out[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(out, size, ".");
}
