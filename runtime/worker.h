/*
 * worker.h: a worker is one thread with its own libuv loop, Lua state, buffer pools, request
 * slots, upstream connection pools and SO_REUSEPORT listeners. Workers share only the route
 * table, the shared dicts, counters and the log. Worker 0 also runs the discovery sources.
 */
#ifndef SP_WORKER_H
#define SP_WORKER_H

#include <stdatomic.h>
#include <uv.h>

#include "http.h"

struct sp_vm;

typedef struct sp_worker_stats {
    uint64_t requests;
    uint64_t by_class[6]; /* 1xx..5xx by status/100, [0] none */
    uint64_t upstream_connect_errors;
    uint64_t upstream_timeouts;
    uint64_t script_errors;
    uint64_t parse_errors;
} sp_worker_stats_t;

struct sp_worker {
    int id;
    uv_loop_t loop;
    uv_thread_t thread;
    uv_async_t async;          /* commands from the main thread (stop, reload, drain) */
    atomic_int command;
    sp_listener_t listeners[3];
    int nlisteners;
    sp_pool_t client_bufs;
    sp_pool_t upstream_bufs;
    sp_request_t **slots;      /* every slot ever made, by index */
    uint32_t nslots, slots_cap;
    sp_request_t **free_slots;
    uint32_t nfree;
    struct sp_upkey **upkeys;  /* upstream pools by host:port */
    uint32_t nupkeys_cap, nupkeys;
    sp_conn_t *conns;          /* open client connections */
    uint32_t nconns;
    uint32_t active_requests;
    uint64_t req_counter;
    char id_prefix[12];
    struct sp_vm *vm;
    const sp_hooks_t *hooks;
    bool draining;
    bool stopping;
    atomic_bool exited;        /* the thread has finished (read by the main thread) */
    int startup_error;
    sp_worker_stats_t stats;
    uint64_t tunnels_open;
    struct sp_worker_ext *ext; /* per-worker state of optional modules (timers, fs watches) */
};

/* Process-wide counters shared by every worker. */
extern atomic_int sp_open_connections;
extern atomic_int sp_open_tunnels;

/* Commands sent to workers through their async handle. */
enum { SP_CMD_NONE = 0, SP_CMD_STOP, SP_CMD_DRAIN, SP_CMD_RELOAD };

/* Hands the bound listening sockets to the workers: n sets, each with one fd per worker. */
void sp_workers_set_listeners(int n, const char **names, int **fds, const int *ports);
/* The async handle (on the main loop) each worker signals when its thread ends. */
void sp_workers_set_exit_notify(uv_async_t *a);
/* Starts n workers one by one; returns -1 if any failed (those started keep running). */
int sp_workers_start(int n);
void sp_workers_command(int cmd);
void sp_workers_join(void);
int sp_workers_count(void);
/* Threads created by sp_workers_start (some may have failed and exited). */
int sp_workers_started(void);
sp_worker_t *sp_worker_get(int i);

/* Request slots (server.c uses these). */
sp_request_t *sp_request_acquire(sp_worker_t *w);
/* Returns the slot to the pool once both the core and the scripting layer are done. */
void sp_request_maybe_release(sp_request_t *req);

#endif
