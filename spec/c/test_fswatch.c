/*
 * test_fswatch.c: unit tests of base/fswatch on a real loop and a temporary directory: a
 * change of the watched file calls back once; a change that leaves the signature as it was does
 * not; and a neighbour file written every 50 ms (a log next to the config file) does not
 * postpone the check for ever. A 10 s guard ends a loop that never called back.
 */
#include "test.h"

#include "base/fswatch.h"

#include <stdlib.h>
#include <unistd.h>

typedef struct fw_probe {
    char dir[64], file[96], noise[96];
    sp_fswatch_t *w;
    uv_timer_t guard, act, noise_timer;
    int changes, noise_writes;
    bool guard_hit;
    const char *content; /* what act writes to file */
} fw_probe_t;

static void put(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static uint64_t file_sig(void *ud) { return sp_stat_sig(SP_HASH_INIT, ((fw_probe_t *)ud)->file); }

static void stop_all(fw_probe_t *p)
{
    uv_timer_stop(&p->guard);
    uv_timer_stop(&p->act);
    uv_timer_stop(&p->noise_timer);
    sp_fswatch_stop(p->w);
    p->w = NULL;
}

static void on_change(void *ud)
{
    fw_probe_t *p = ud;
    p->changes++;
    stop_all(p);
}

static void on_guard(uv_timer_t *t)
{
    fw_probe_t *p = t->data;
    p->guard_hit = true;
    stop_all(p);
}

static void on_act(uv_timer_t *t)
{
    fw_probe_t *p = t->data;
    if (p->content)
        put(p->file, p->content);
}

static void on_noise(uv_timer_t *t)
{
    fw_probe_t *p = t->data;
    char line[32];
    snprintf(line, sizeof line, "%d\n", ++p->noise_writes);
    put(p->noise, line);
}

static void run_probe(fw_probe_t *p, uv_loop_t *loop, const char *content, bool noise,
                      uint64_t guard_ms)
{
    snprintf(p->dir, sizeof p->dir, "/tmp/sp-fswatch-XXXXXX");
    CHECK(mkdtemp(p->dir) != NULL);
    snprintf(p->file, sizeof p->file, "%s/config.lua", p->dir);
    snprintf(p->noise, sizeof p->noise, "%s/stderr.log", p->dir);
    put(p->file, "return {}\n");
    p->content = content;
    const char *dirs[1] = {p->dir};
    p->w = sp_fswatch_start(loop, dirs, 1, 100, 0, file_sig, on_change, p);
    uv_timer_init(loop, &p->guard);
    uv_timer_init(loop, &p->act);
    uv_timer_init(loop, &p->noise_timer);
    p->guard.data = p->act.data = p->noise_timer.data = p;
    uv_timer_start(&p->guard, on_guard, guard_ms, 0);
    uv_timer_start(&p->act, on_act, 150, 0);
    if (noise)
        uv_timer_start(&p->noise_timer, on_noise, 0, 50);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&p->guard, NULL);
    uv_close((uv_handle_t *)&p->act, NULL);
    uv_close((uv_handle_t *)&p->noise_timer, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    unlink(p->file);
    unlink(p->noise);
    rmdir(p->dir);
}

void suite_fswatch(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    fw_probe_t p;

    memset(&p, 0, sizeof p); /* a change calls back once */
    run_probe(&p, &loop, "return { changed = true }\n", false, 10000);
    CHECK(!p.guard_hit);
    CHECK_INT(p.changes, 1);

    memset(&p, 0, sizeof p); /* events in the directory without a change of the file: none */
    run_probe(&p, &loop, NULL, true, 1500);
    CHECK(p.guard_hit);
    CHECK_INT(p.changes, 0);
    CHECK(p.noise_writes > 5);

    memset(&p, 0, sizeof p); /* a neighbour written every 50 ms does not hold the check back */
    run_probe(&p, &loop, "return { changed = true }\n", true, 10000);
    CHECK(!p.guard_hit);
    CHECK_INT(p.changes, 1);
    g_tests += 3;
    CHECK_INT(uv_loop_close(&loop), 0);
}
