/*
 * kwatch.h: a Kubernetes list+watch of one resource, following the client contract of
 * ../shared/KUBERNETES.md: paginated LIST (restarted on an expired continue token), WATCH from
 * the list's resourceVersion with bookmarks and a jittered timeoutSeconds, resume from the last
 * event or bookmark after a clean end or a dropped connection, a full relist on 410 that
 * delivers DELETED for what vanished, exponential backoff with jitter that honours Retry-After,
 * token re-read on 401, a slow backoff on 403, and a watchdog for silent connections.
 * Objects reach the owner as raw JSON; the engine reads only their metadata.
 */
#ifndef SP_KWATCH_H
#define SP_KWATCH_H

#include "kube/kube.h"

typedef struct sp_kwatch sp_kwatch_t;

typedef struct sp_kwatch_opts {
    const char *group;          /* "" for the core group */
    const char *version;
    const char *resource;       /* plural, e.g. "sandboxes" */
    const char *namespace_;     /* NULL: all namespaces */
    const char *label_selector;
    const char *field_selector;
    int page_size;
    int timeout_base;           /* watch timeoutSeconds is jittered in [base, 2*base) */
    double relist_jitter;       /* a relist after 410 waits a random 0..this seconds */
} sp_kwatch_opts_t;

typedef struct sp_kwatch_cbs {
    /* type: ADDED, MODIFIED or DELETED; obj: the object's JSON (for DELETED after a relist,
     * only {"metadata":{"namespace":..,"name":..}}). */
    void (*event)(void *ud, const char *type, const char *obj, size_t len);
    /* A full list has been delivered (count objects; relist: not the first one). */
    void (*synced)(void *ud, const char *rv, size_t count, bool relist);
    /* Something failed; the engine retries by itself after retry_in seconds. */
    void (*error)(void *ud, long status, const char *reason, const char *message, double retry_in);
} sp_kwatch_cbs_t;

typedef struct sp_kwatch_state {
    bool synced;          /* a full list has been delivered at least once */
    bool watching;        /* a watch stream is open */
    const char *phase;    /* "listing", "watching", "backoff", "stopped" */
    const char *resource_version;
    double last_event;    /* monotonic seconds of the last event or bookmark (0: none) */
    double last_sync;     /* monotonic seconds of the last completed list */
    uint64_t events, bookmarks, lists, relists, watches, errors, list_pages;
    size_t objects;       /* objects currently known */
    long last_status;
    const char *last_error;
} sp_kwatch_state_t;

sp_kwatch_t *sp_kwatch_start(sp_kube_t *k, const sp_kwatch_opts_t *o, const sp_kwatch_cbs_t *cbs,
                             void *ud);
/* Stops (cancels requests and timers) and frees the watch. No callbacks afterwards. */
void sp_kwatch_stop(sp_kwatch_t *w);
void sp_kwatch_get_state(const sp_kwatch_t *w, sp_kwatch_state_t *st);

/* For fuzzing and tests: a watch that makes no requests. Feed it watch-stream bytes (framed
 * into events across arbitrary boundaries; returns 1 when the stream would end: a 410 or an
 * error event) or LIST pages (last: the end of a list, delivering deletions). */
sp_kwatch_t *sp_kwatch_detached(const sp_kwatch_cbs_t *cbs, void *ud);
int sp_kwatch_feed_stream(sp_kwatch_t *w, const char *data, size_t len);
bool sp_kwatch_feed_page(sp_kwatch_t *w, const char *data, size_t len, bool last);
void sp_kwatch_free_detached(sp_kwatch_t *w);

/* The backoff policy shared with one-shot requests: attempt n (0-based) -> seconds, with
 * jitter; retry_after (>= 0) wins when larger. */
double sp_kube_backoff(int attempt, double retry_after, bool forbidden);

#endif
