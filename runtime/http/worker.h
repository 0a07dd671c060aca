/*
 * worker.h: the worker record. A worker is one thread with its own libuv loop, Lua state,
 * buffer pools, request slots, upstream connection pools and SO_REUSEPORT listeners. Workers
 * share only the route table, the shared dicts, counters and the log. Worker 0 also runs the
 * discovery sources. The record, its registry and its buffers are here (worker.c); the threads
 * that run workers are the process layer's (process/workers.c). The Lua state is an opaque
 * pointer here: the HTTP core reaches scripts only through the hook table (sp_hooks_t).
 */
#ifndef SP_WORKER_H
#define SP_WORKER_H

#include <stdatomic.h>
#include <uv.h>

#include "http/http.h"

struct sp_vm;
struct sp_span_sink;

/* Counters: written only by their worker (SP_STAT_ADD), read by any (metrics), hence relaxed
 * atomics: no lock and no lock prefix on the hot path. */
typedef _Atomic uint64_t sp_counter_t;
#define SP_STAT_ADD(c, n)                                                                         \
    atomic_store_explicit(&(c), atomic_load_explicit(&(c), memory_order_relaxed) + (n),           \
                          memory_order_relaxed)
#define SP_STAT_GET(c) atomic_load_explicit(&(c), memory_order_relaxed)

enum { SP_M_GET, SP_M_HEAD, SP_M_POST, SP_M_PUT, SP_M_PATCH, SP_M_DELETE, SP_M_OPTIONS,
       SP_M_OTHER, SP_M_COUNT };
#define SP_LAT_BUCKETS 13
extern const double sp_latency_bounds[SP_LAT_BUCKETS];
/* Upstream timing histograms (upper bounds in ns, +Inf last): connect (a new connection,
 * refused-connect retries included) and first byte (the response head), both measured from
 * the moment forwarding began (r->t_forward). */
#define SP_UPC_BUCKETS 14
#define SP_UPF_BUCKETS 16
extern const uint64_t sp_upconnect_bounds_ns[SP_UPC_BUCKETS];
extern const uint64_t sp_upfirst_bounds_ns[SP_UPF_BUCKETS];
extern const char *const sp_method_names[SP_M_COUNT];

typedef struct sp_worker_stats {
    sp_counter_t requests;
    sp_counter_t by_method_class[SP_M_COUNT][6]; /* [method][status/100], [..][0]: no status */
    sp_counter_t latency[SP_LAT_BUCKETS + 1];    /* requests by duration bucket (+Inf last) */
    sp_counter_t latency_sum_us;
    sp_counter_t upstream_connect_errors;
    sp_counter_t upstream_timeouts;
    sp_counter_t upconnect[SP_UPC_BUCKETS + 1]; /* new upstream connections by connect time */
    sp_counter_t upconnect_sum_us;
    sp_counter_t upfirst[SP_UPF_BUCKETS + 1];   /* forwarded requests by time to response head */
    sp_counter_t upfirst_sum_us;
    sp_counter_t script_errors;
    sp_counter_t parse_errors;
    sp_counter_t accesslog_dropped;
    sp_counter_t trace_spans_exported; /* spans the OTLP receiver accepted */
    sp_counter_t trace_spans_dropped;  /* spans dropped: queue full or a failed export */
    sp_counter_t write_batches;  /* io_uring_enter calls that sent staged writes (wbatch.c) */
    sp_counter_t batched_writes; /* the writes they sent */
} sp_worker_stats_t;

/* Adds one observation of ns nanoseconds to a histogram of n bounds (buckets[n]: +Inf). A few
 * integer compares and two relaxed stores: no lock, no allocation. */
static inline void sp_stat_observe(sp_counter_t *buckets, const uint64_t *bounds_ns, int n,
                                   sp_counter_t *sum_us, uint64_t ns)
{
    int b = 0;
    while (b < n && ns > bounds_ns[b])
        b++;
    SP_STAT_ADD(buckets[b], 1);
    SP_STAT_ADD(*sum_us, ns / 1000);
}

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
    sp_pool_t upstream_body_bufs; /* upstream_body_buffer_size blocks (large response bodies) */
    char *read_scratch;        /* client reads land here while a connection has no buffer */
    struct sp_wbatch *wb;      /* small writes sent together per loop iteration (NULL: off) */
    sp_request_t **slots;      /* every slot ever made, by index */
    uint32_t nslots, slots_cap;
    sp_request_t **free_slots;
    uint32_t nfree;
    struct sp_upkey **upkeys;  /* upstream pools by host:port */
    uint32_t nupkeys_cap, nupkeys;
    void *h2up;                /* h2c connections to sandboxes (h2.c) */
    sp_conn_t *conns;          /* open client connections */
    uint32_t nconns;
    sp_counter_t active_requests; /* request slots in use (read by metrics) */
    uint64_t req_counter;
    char id_prefix[12];
    struct sp_vm *vm;
    struct sp_vm *retired;     /* states replaced by reloads, finishing their tasks */
    uv_timer_t retire_timer;
    uv_timer_t drain_timer;    /* while draining or stopping: stops the loop once idle */
    uint64_t reloads, reload_failures;
    const sp_hooks_t *hooks;
    bool draining;
    bool stopping;
    atomic_bool exited;        /* the thread has finished (read by the main thread) */
    bool cmd_closed;           /* left its loop: takes no more commands (under the command lock) */
    /* The watchdog (sp_workers_watch, main thread): the loop stores the time on every tick of
     * heartbeat_timer; a worker whose heartbeat is older than worker_stall_timeout is stuck. */
    uv_timer_t heartbeat_timer;
    _Atomic uint64_t heartbeat_ns;
    atomic_bool stuck;
    /* The outermost script call running now (0: none) and what it is, for the stuck report.
     * script_what is written before script_since_ns is set, and read only once stuck. */
    _Atomic uint64_t script_since_ns;
    int script_depth;
    char script_what[160];
    int startup_error;
    sp_worker_stats_t stats;
    uint64_t tunnels_open;
    struct sp_alog *alog;      /* the access-log writer (accesslog.c) */
    struct sp_span_sink *tracer; /* the span exporter (process/otlp.c), NULL when export is off */
};

/* Process-wide counters shared by every worker. */
extern atomic_int sp_open_connections;
extern atomic_int sp_open_tunnels;

/* The registry of workers (process/workers.c registers them before any thread starts).
 * Any thread may read it. */
void sp_workers_register(sp_worker_t *all, int n);
int sp_workers_count(void);
/* Ids of stuck workers (up to max) into ids; returns the count. Any thread. */
int sp_workers_stuck(int *ids, int max);
/* A script call begins / ends on w (lua_vm.c): what describes it (the hook, the request). */
void sp_worker_script_begin(sp_worker_t *w, const char *what, size_t len);
void sp_worker_script_end(sp_worker_t *w);
sp_worker_t *sp_worker_get(int i);
/* A worker's buffers: the client and upstream pools (keeping up to *_keep free blocks) and
 * the scratch that idle client connections read into. Every loop that runs the server needs
 * them (the workers, the fuzz harness). */
void sp_worker_buffers_init(sp_worker_t *w, size_t client_keep, size_t upstream_keep);
void sp_worker_buffers_free(sp_worker_t *w);

/* The access-log writer (accesslog.c). */
void sp_alog_start(sp_worker_t *w);
void sp_alog_append(sp_worker_t *w, const char *line, size_t len);
void sp_alog_stop(sp_worker_t *w);
void sp_alog_finish(sp_worker_t *w);

/* Request slots (server.c uses these). */
sp_request_t *sp_request_acquire(sp_worker_t *w);
/* Returns the slot to the pool once both the core and the scripting layer are done. */
void sp_request_maybe_release(sp_request_t *req);

#endif
