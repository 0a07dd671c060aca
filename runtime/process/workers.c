/*
 * workers.c: the worker threads. Each worker opens its own SO_REUSEPORT listeners (the sockets are
 * bound by the main thread so errors are reported before anything starts), creates its Lua
 * state, runs its loop, and obeys commands from the main thread: drain (stop accepting, let
 * in-flight requests and tunnels finish), stop (close everything) and reload (issue: scripts).
 */
#define _GNU_SOURCE /* accept4 */
#include "process/workers.h"
#include "base/config.h"
#include "base/log.h"
#include "http/wbatch.h"
#include "lua/lua_vm.h"
#include "process/otlp.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static sp_worker_t *workers;
static int nworkers;
static int nstarted; /* threads created (joinable) */
static uv_sem_t started;
static uv_mutex_t cmd_mu; /* sp_workers_command vs. a worker closing its async handle */
static uv_async_t *exit_notify;

typedef struct listen_set {
    const char *name;
    int *fds; /* one per worker */
    int port;
} listen_set_t;

static listen_set_t lsets[3];
static int nlsets;

int sp_workers_started(void) { return nstarted; }

void sp_workers_set_listeners(int n, const char **names, int **fds, const int *ports)
{
    nlsets = n;
    for (int i = 0; i < n; i++) {
        lsets[i].name = names[i];
        lsets[i].fds = fds[i];
        lsets[i].port = ports[i];
    }
}

void sp_workers_set_exit_notify(uv_async_t *a) { exit_notify = a; }

/* Takes the connections already queued on a listener (the kernel completed their handshake;
 * closing the socket would reset them), so a drain serves them instead. */
static void drain_backlog(sp_listener_t *l)
{
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&l->tcp, &fd) != 0)
        return;
    for (int i = 0; i < 4096; i++) {
        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
            break;
        if (sp_server_adopt(l, cfd) != 0)
            close(cfd);
    }
}

static void close_listeners(sp_worker_t *w)
{
    for (int i = 0; i < w->nlisteners; i++) {
        uv_handle_t *h = (uv_handle_t *)&w->listeners[i].tcp;
        if (!uv_is_closing(h)) {
            drain_backlog(&w->listeners[i]);
            uv_close(h, NULL);
        }
    }
}


/* While draining, a keep-alive connection that has been idle this long is closed; a busier one
 * gets `Connection: close` on its next response instead, so a client sending its next request
 * does not race with the close. */
#define DRAIN_IDLE_MS 500

/* Closes client connections that are between requests; the others finish first. */
static void close_idle_conns(sp_worker_t *w)
{
    uint64_t now = uv_now(&w->loop);
    sp_conn_t *c = w->conns;
    while (c) {
        sp_conn_t *next = c->next;
        if (c->h2) {
            sp_h2_drain(c); /* GOAWAY; closes once its streams in flight are done */
            c = next;
            continue;
        }
        if (!c->req && !c->closing && c->rpos == c->rlen &&
            (w->stopping || now - c->dl.last_active >= DRAIN_IDLE_MS))
            sp_conn_close(c);
        c = next;
    }
}

static void stop_loop_when_idle(uv_timer_t *t)
{
    sp_worker_t *w = t->data;
    close_idle_conns(w);
    sp_upstream_close_idle(w);
    sp_h2_upstream_close_idle(w);
    if (w->nconns == 0 || w->stopping) {
        uv_timer_stop(t);
        uv_stop(&w->loop);
    }
}

#define RETIRE_GRACE_NS (60ull * 1000000000ull) /* how long a replaced state may keep tasks */

/* Destroys replaced states once nothing runs in them (or after the grace period). */
static void on_retire_timer(uv_timer_t *t)
{
    sp_worker_t *w = t->data;
    struct sp_vm **pp = &w->retired;
    uint64_t now = uv_hrtime();
    while (*pp) {
        struct sp_vm *vm = *pp;
        bool expired = now - vm->retire_started > RETIRE_GRACE_NS;
        if (sp_vm_idle(vm) || expired || w->stopping) {
            if (!sp_vm_idle(vm))
                sp_vm_abandon_tasks(vm);
            *pp = vm->next_retired;
            sp_vm_destroy(vm);
            continue;
        }
        pp = &vm->next_retired;
    }
    if (!w->retired)
        uv_timer_stop(t);
}

/* Loads the scripts into a new state; on success it replaces the current one (which finishes
 * its suspended tasks), on failure the current one stays and the error is logged. */
static void reload(sp_worker_t *w)
{
    char err[2048];
    uint64_t t0 = uv_hrtime();
    struct sp_vm *nvm = sp_vm_create(w, "init", err, sizeof err);
    if (!nvm) {
        w->reload_failures++;
        sp_log(SP_LOG_ERROR, "reload rejected: the new scripts failed to load; the previous "
               "scripts stay live", "i:worker", (int64_t)w->id, "s:error", err, NULL);
        return;
    }
    struct sp_vm *old = w->vm;
    sp_vm_retire(old);
    old->next_retired = w->retired;
    w->retired = old;
    w->vm = nvm;
    w->reloads++;
    sp_vm_start(nvm);
    uv_timer_start(&w->retire_timer, on_retire_timer, 100, 100);
    sp_log(SP_LOG_INFO, "scripts reloaded", "i:worker", (int64_t)w->id, "d:ms",
           (double)(uv_hrtime() - t0) / 1e6, NULL);
}

static void on_command(uv_async_t *a)
{
    sp_worker_t *w = a->data;
    sp_sync_drain_inbox(w); /* messages from other workers (core.post) */
    int bits = atomic_exchange(&w->command, 0);
    /* several commands may arrive at once: the strongest wins (stop > drain > reload) */
    int cmd = (bits & (1 << SP_CMD_STOP))    ? SP_CMD_STOP
              : (bits & (1 << SP_CMD_DRAIN)) ? SP_CMD_DRAIN
              : (bits & (1 << SP_CMD_RELOAD)) ? SP_CMD_RELOAD
                                             : SP_CMD_NONE;
    switch (cmd) {
    case SP_CMD_DRAIN:
        if (w->draining)
            break;
        w->draining = true;
        close_listeners(w);
        uv_timer_start(&w->drain_timer, stop_loop_when_idle, 0, 50);
        break;
    case SP_CMD_STOP:
        w->stopping = true;
        w->draining = true;
        close_listeners(w);
        for (sp_conn_t *c = w->conns; c;) {
            sp_conn_t *n = c->next;
            if (c->req && c->req->error == SP_ERR_NONE)
                c->req->error = SP_ERR_DRAIN;
            sp_conn_close(c);
            c = n;
        }
        uv_timer_start(&w->drain_timer, stop_loop_when_idle, 0, 50);
        break;
    case SP_CMD_RELOAD:
        if (!w->draining && w->vm)
            reload(w);
        break;
    default:
        break;
    }
}


static void close_walk(uv_handle_t *h, void *arg)
{
    SP_UNUSED(arg);
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static int open_listeners(sp_worker_t *w, char *err, size_t errlen)
{
    for (int i = 0; i < nlsets; i++) {
        sp_listener_t *l = &w->listeners[w->nlisteners];
        uv_tcp_init(&w->loop, &l->tcp);
        l->tcp.data = l;
        l->w = w;
        l->name = lsets[i].name;
        l->port = lsets[i].port;
        w->nlisteners++;
        int rc = uv_tcp_open(&l->tcp, lsets[i].fds[w->id]);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&l->tcp, 1024, sp_server_on_connection);
        if (rc < 0) {
            snprintf(err, errlen, "listen (%s): %s", l->name, uv_strerror(rc));
            return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- the watchdog */

static void on_heartbeat(uv_timer_t *t)
{
    sp_worker_t *w = t->data;
    atomic_store_explicit(&w->heartbeat_ns, uv_hrtime(), memory_order_relaxed);
}

/* How often a worker's loop proves it turns: a quarter of the stall timeout, 20 ms to 1 s. */
static uint64_t heartbeat_ms(void)
{
    double ms = sp_cfg.worker_stall_timeout * 1000 / 4;
    return (uint64_t)(ms < 20 ? 20 : ms > 1000 ? 1000 : ms);
}

int sp_workers_watch(int *running)
{
    uint64_t now = uv_hrtime();
    uint64_t limit = (uint64_t)(sp_cfg.worker_stall_timeout * 1e9);
    int nstuck = 0, nrunning = 0;
    for (int i = 0; i < nstarted; i++) {
        sp_worker_t *w = &workers[i];
        if (w->startup_error || atomic_load(&w->exited))
            continue;
        uint64_t hb = atomic_load_explicit(&w->heartbeat_ns, memory_order_relaxed);
        bool stalled = hb && now > hb && now - hb > limit;
        bool was = atomic_load(&w->stuck);
        if (stalled && !was) {
            atomic_store(&w->stuck, true);
            uint64_t since = atomic_load_explicit(&w->script_since_ns, memory_order_acquire);
            char what[sizeof w->script_what];
            snprintf(what, sizeof what, "%s", since ? w->script_what : "");
            sp_log(SP_LOG_ERROR, "worker stuck: its loop has made no progress; /live fails "
                   "until it recovers (a JIT-compiled endless loop cannot be interrupted: fix "
                   "the script and restart)",
                   "i:worker", (int64_t)w->id, "d:stalled_s", (double)(now - hb) / 1e9,
                   "s:running", since ? what : "no script task (C code or a script callback)",
                   "d:script_running_s", since ? (double)(now - since) / 1e9 : 0.0, NULL);
        } else if (!stalled && was) {
            atomic_store(&w->stuck, false);
            sp_log(SP_LOG_WARN, "worker recovered: its loop turns again", "i:worker",
                   (int64_t)w->id, NULL);
        }
        if (stalled)
            nstuck++;
        else
            nrunning++;
    }
    if (running)
        *running = nrunning;
    return nstuck;
}

static void worker_main(void *arg)
{
    sp_worker_t *w = arg;
    char err[1024] = "";
    uv_loop_init(&w->loop);
    w->loop.data = w;
    sp_worker_buffers_init(w, 256, 128);
    w->wb = sp_wbatch_new(&w->loop, &w->stats.write_batches, &w->stats.batched_writes);
    unsigned seed = (unsigned)(uv_hrtime() ^ ((uint64_t)w->id << 32) ^ (uint64_t)getpid());
    snprintf(w->id_prefix, sizeof w->id_prefix, "%06x", (rand_r(&seed) ^ (w->id << 20)) & 0xffffff);
    uv_async_init(&w->loop, &w->async, on_command);
    w->async.data = w;
    uv_timer_init(&w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    uv_timer_init(&w->loop, &w->retire_timer);
    w->retire_timer.data = w;
    atomic_store(&w->heartbeat_ns, uv_hrtime());
    uv_timer_init(&w->loop, &w->heartbeat_timer);
    w->heartbeat_timer.data = w;
    uv_timer_start(&w->heartbeat_timer, on_heartbeat, heartbeat_ms(), heartbeat_ms());
    uv_unref((uv_handle_t *)&w->heartbeat_timer);
    w->hooks = &sp_vm_hooks;
    sp_alog_start(w);
    sp_otlp_start(w);
    if (open_listeners(w, err, sizeof err) == 0) {
        w->vm = sp_vm_create(w, "init", err, sizeof err);
    }
    if (!w->vm) {
        sp_log(SP_LOG_ERROR, "worker failed to start", "i:worker", (int64_t)w->id, "s:error", err,
               NULL);
        w->startup_error = 1;
        uv_sem_post(&started);
    } else {
        uv_sem_post(&started);
        sp_vm_start(w->vm);
        atomic_store(&w->heartbeat_ns, uv_hrtime());
        uv_run(&w->loop, UV_RUN_DEFAULT);
    }
    /* No command may be sent to the async handle once it is being closed. */
    uv_mutex_lock(&cmd_mu);
    w->cmd_closed = true;
    uv_mutex_unlock(&cmd_mu);
    uv_timer_stop(&w->heartbeat_timer);
    /* Shutdown: scripts first (their timers and watches), then every remaining handle. */
    while (w->retired) {
        struct sp_vm *vm = w->retired;
        w->retired = vm->next_retired;
        sp_vm_destroy(vm);
    }
    sp_vm_destroy(w->vm);
    w->vm = NULL;
    for (sp_conn_t *c = w->conns; c;) {
        sp_conn_t *n = c->next;
        sp_conn_close(c);
        c = n;
    }
    sp_upstream_close_idle(w);
    sp_alog_stop(w);
    sp_otlp_stop(w);
    uv_walk(&w->loop, close_walk, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->loop);
    sp_wbatch_free(w->wb);
    w->wb = NULL;
    sp_alog_finish(w);
    sp_upstream_pool_destroy(w);
    for (uint32_t i = 0; i < w->nslots; i++) {
        sp_request_t *r = w->slots[i];
        sp_buf_free(&r->head);
        sp_buf_free(&r->out);
        sp_buf_free(&r->body);
        sp_buf_free(&r->extra);
        sp_buf_free(&r->resp_head);
        sp_buf_free(&r->up_path);
        free(r->hdrs);
        free(r->rhdrs);
        free(r);
    }
    free(w->slots);
    free(w->free_slots);
    sp_worker_buffers_free(w);
    atomic_store(&w->exited, true);
    if (exit_notify)
        uv_async_send(exit_notify);
}

int sp_workers_start(int n)
{
    nworkers = n;
    workers = sp_calloc((size_t)n, sizeof *workers);
    uv_sem_init(&started, 0);
    uv_mutex_init(&cmd_mu);
    for (int i = 0; i < n; i++)
        workers[i].id = i;
    sp_workers_register(workers, n);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        uv_thread_options_t opts = {UV_THREAD_HAS_STACK_SIZE, 8 << 20};
        if (uv_thread_create_ex(&workers[i].thread, &opts, worker_main, &workers[i]) != 0) {
            sp_log(SP_LOG_ERROR, "cannot start worker thread", "i:worker", (int64_t)i, NULL);
            return -1;
        }
        nstarted++;
        uv_sem_wait(&started); /* one at a time: scripts log their start-up in order */
        failed |= workers[i].startup_error;
        if (failed)
            break;
    }
    return failed ? -1 : 0;
}

void sp_workers_command(int cmd)
{
    /* A worker that has left its loop (stopped, or failed to start) has closed, or is closing,
     * its async handle: sending to it would abort the process. */
    uv_mutex_lock(&cmd_mu);
    for (int i = 0; i < nstarted; i++) {
        if (workers[i].startup_error || workers[i].cmd_closed)
            continue;
        atomic_fetch_or(&workers[i].command, 1 << cmd);
        uv_async_send(&workers[i].async);
    }
    uv_mutex_unlock(&cmd_mu);
}

void sp_workers_join(void)
{
    for (int i = 0; i < nstarted; i++)
        uv_thread_join(&workers[i].thread);
    nstarted = 0;
    sp_workers_register(NULL, 0);
    free(workers);
    workers = NULL;
    nworkers = 0;
    uv_sem_destroy(&started);
    uv_mutex_destroy(&cmd_mu);
}
