/*
 * kwatch.c: the list+watch engine (see kwatch.h). One request is in flight at a time: a LIST
 * page or a WATCH stream. Between them: a backoff timer. A watchdog closes a watch that has
 * been silent (no event, no bookmark, no byte) for longer than its timeout plus a margin.
 * The set of known object keys (namespace/name) lets a relist deliver deletions.
 */
#define _GNU_SOURCE /* memmem */
#include "kube/kwatch.h"
#include "base/buf.h"
#include "base/json_scan.h"
#include "base/log.h"

#include <stdio.h>
#include <stdlib.h>

enum { M_IDLE, M_LIST, M_WATCH, M_BACKOFF, M_STOPPED };
static const char *const phase_names[] = {"starting", "listing", "watching", "backoff", "stopped"};

#define MAX_LIST_BYTES (512u << 20)  /* one LIST page */
#define MAX_LINE_BYTES (64u << 20)   /* one watch event */
#define WATCHDOG_MARGIN 30.0         /* seconds of silence beyond timeoutSeconds */

typedef struct kentry {
    struct kentry *next;
    uint64_t hash;
    uint32_t gen;
    char key[];
} kentry_t;

struct sp_kwatch {
    sp_kube_t *k;
    uv_loop_t *loop_unused;
    char *group, *version, *resource, *ns, *label_selector, *field_selector;
    int page_size, timeout_base;
    double relist_jitter;
    sp_kwatch_cbs_t cbs;
    void *ud;
    uv_timer_t timer;     /* backoff */
    uv_timer_t watchdog;
    int handles;
    sp_kreq_t *req;
    int mode;
    sp_buf_t body;        /* a LIST page being received */
    sp_buf_t pending;     /* a received LIST page whose items are still to be delivered */
    bool pending_last;    /* it is the last page of its list */
    uv_timer_t deliver;   /* delivers `pending` on the next loop turn */
    sp_buf_t line;        /* a partial watch line */
    char *rv;             /* where a watch resumes */
    char *cont;           /* the next page's continue token */
    char *list_rv;
    bool relist_needed;
    bool listed_once;
    bool next_is_list;    /* what the backoff timer starts */
    bool watch_had_event;
    bool watch_error;     /* an ERROR event other than 410 ended the stream */
    bool detached;        /* fed by sp_kwatch_feed_*: makes no requests */
    bool freeing;
    uint32_t gen;
    kentry_t **buckets;
    size_t nbuckets, nkeys;
    int attempt;
    int busy;             /* inside a callback to the owner */
    bool stopping;
    double last_event, last_sync, last_data, watch_started;
    uint64_t events, bookmarks, lists, relists, watches, errors, list_pages;
    size_t page_count;    /* objects in the current list */
    long last_status;
    char last_error[512];
};

static double now_s(void) { return (double)uv_hrtime() / 1e9; }

static double jitter(void) { return (double)rand() / ((double)RAND_MAX + 1.0); }

double sp_kube_backoff(int attempt, double retry_after, bool forbidden)
{
    double base = forbidden ? 10.0 : 0.8;
    double cap = forbidden ? 120.0 : 30.0;
    double d = base;
    for (int i = 0; i < attempt && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    d *= 0.75 + 0.5 * jitter();
    if (retry_after > d)
        d = retry_after;
    return d;
}

/* ---------------------------------------------------------------- keys */

static kentry_t **kfind(sp_kwatch_t *w, const char *key, size_t n, uint64_t h)
{
    kentry_t **pp = &w->buckets[h & (w->nbuckets - 1)];
    while (*pp && !((*pp)->hash == h && strlen((*pp)->key) == n && memcmp((*pp)->key, key, n) == 0))
        pp = &(*pp)->next;
    return pp;
}

/* Marks key as present in generation gen. Returns true if it was known before. */
static bool kput(sp_kwatch_t *w, const char *key, size_t n)
{
    uint64_t h = sp_hash(key, n);
    kentry_t **pp = kfind(w, key, n, h);
    if (*pp) {
        (*pp)->gen = w->gen;
        return true;
    }
    kentry_t *e = sp_malloc(sizeof *e + n + 1);
    e->next = NULL;
    e->hash = h;
    e->gen = w->gen;
    memcpy(e->key, key, n);
    e->key[n] = '\0';
    *pp = e;
    if (++w->nkeys > w->nbuckets * 2) {
        size_t nb = w->nbuckets * 4;
        kentry_t **b = sp_calloc(nb, sizeof *b);
        for (size_t i = 0; i < w->nbuckets; i++)
            for (kentry_t *x = w->buckets[i], *nx; x; x = nx) {
                nx = x->next;
                x->next = b[x->hash & (nb - 1)];
                b[x->hash & (nb - 1)] = x;
            }
        free(w->buckets);
        w->buckets = b;
        w->nbuckets = nb;
    }
    return false;
}

static void kdel(sp_kwatch_t *w, const char *key, size_t n)
{
    kentry_t **pp = kfind(w, key, n, sp_hash(key, n));
    if (*pp) {
        kentry_t *e = *pp;
        *pp = e->next;
        free(e);
        w->nkeys--;
    }
}

/* Builds "namespace/name" of an object into out. Returns false without a name. */
static bool object_key(const char *obj, const char *end, sp_buf_t *out)
{
    out->len = 0;
    const char *meta = sp_json_get(obj, end, "metadata");
    if (!meta)
        return false;
    const char *ns = sp_json_get(meta, end, "namespace");
    if (ns && *ns == '"')
        sp_json_string(ns, end, out);
    sp_buf_addc(out, '/');
    size_t before = out->len;
    const char *name = sp_json_get(meta, end, "name");
    if (!name || *name != '"' || sp_json_string(name, end, out) != 0 || out->len == before)
        return false;
    return true;
}

static void set_str(char **dst, const char *s, size_t n)
{
    free(*dst);
    *dst = s ? sp_strndup(s, n) : NULL;
}

/* Reads metadata.resourceVersion of obj into *dst (unchanged when absent). */
static void take_rv(char **dst, const char *obj, const char *end)
{
    const char *v = sp_json_path(obj, end, "metadata", "resourceVersion", NULL);
    if (!v || *v != '"')
        return;
    char tmp[128];
    sp_buf_t b = SP_BUF_ON(tmp);
    if (sp_json_string(v, end, &b) == 0 && b.len)
        set_str(dst, b.p, b.len);
    sp_buf_free(&b);
}

/* ---------------------------------------------------------------- requests */

static void urlenc(sp_buf_t *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '_' || c == '.' || c == '~') {
            sp_buf_addc(b, (char)c);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            sp_buf_add(b, e, 3);
        }
    }
}

static void base_path(sp_kwatch_t *w, sp_buf_t *b)
{
    b->len = 0;
    if (w->group && *w->group)
        sp_buf_addf(b, "/apis/%s/%s", w->group, w->version);
    else
        sp_buf_addf(b, "/api/%s", w->version);
    if (w->ns && *w->ns) {
        sp_buf_adds(b, "/namespaces/");
        urlenc(b, w->ns);
    }
    sp_buf_addc(b, '/');
    sp_buf_adds(b, w->resource);
    sp_buf_addc(b, '?');
    if (w->label_selector && *w->label_selector) {
        sp_buf_adds(b, "labelSelector=");
        urlenc(b, w->label_selector);
        sp_buf_addc(b, '&');
    }
    if (w->field_selector && *w->field_selector) {
        sp_buf_adds(b, "fieldSelector=");
        urlenc(b, w->field_selector);
        sp_buf_addc(b, '&');
    }
}

static void start_list(sp_kwatch_t *w);
static void start_watch(sp_kwatch_t *w);
static void maybe_free(sp_kwatch_t *w);

static void on_backoff_timer(uv_timer_t *t)
{
    sp_kwatch_t *w = t->data;
    if (w->stopping)
        return;
    if (w->next_is_list)
        start_list(w);
    else
        start_watch(w);
}

/* Reports an error and schedules the next attempt. */
static void fail(sp_kwatch_t *w, long status, const char *reason, const char *message,
                 double retry_after, bool list_next)
{
    bool forbidden = status == 403;
    double d = sp_kube_backoff(w->attempt, retry_after, forbidden);
    w->attempt++;
    w->errors++;
    w->last_status = status;
    snprintf(w->last_error, sizeof w->last_error, "%s: %s", reason, message ? message : "");
    w->mode = M_BACKOFF;
    w->next_is_list = list_next;
    if (forbidden)
        sp_log(SP_LOG_ERROR, "Kubernetes API forbids the watch: the service account needs get, "
               "list and watch on this resource (see k8s/base/rbac.yaml)", "s:resource",
               w->resource, "s:group", w->group, "s:message", message ? message : "", "d:retry_in",
               d, NULL);
    else
        sp_log(SP_LOG_WARN, "Kubernetes API error", "s:resource", w->resource, "i:status",
               (int64_t)status, "s:reason", reason, "s:message", message ? message : "",
               "d:retry_in", d, NULL);
    if (w->cbs.error) {
        w->busy++;
        w->cbs.error(w->ud, status, reason, message, d);
        w->busy--;
    }
    if (w->stopping) {
        maybe_free(w);
        return;
    }
    uv_timer_start(&w->timer, on_backoff_timer, (uint64_t)(d * 1000), 0);
}

/* Extracts reason and message from a Status body (best effort) into the buffers. */
static void status_text(const char *body, size_t len, char reason[64], char message[256])
{
    const char *end = body + len;
    reason[0] = message[0] = '\0';
    char tmp[256];
    sp_buf_t b = SP_BUF_ON(tmp);
    const char *r = sp_json_get(body, end, "reason");
    if (r && sp_json_string(r, end, &b) == 0)
        snprintf(reason, 64, "%.*s", (int)b.len, b.p);
    b.len = 0;
    const char *m = sp_json_get(body, end, "message");
    if (m && sp_json_string(m, end, &b) == 0)
        snprintf(message, 256, "%.*s", (int)b.len, b.p);
    sp_buf_free(&b);
}

/* Handles a non-200 answer or a transport error. list_next: what to retry. */
static void handle_failure(sp_kwatch_t *w, int code, const char *cerr, long status,
                           double retry_after, bool list_next)
{
    char reason[64], message[256];
    status_text(w->body.p ? w->body.p : "", w->body.len, reason, message);
    if (code != 0 && status == 0) {
        fail(w, 0, "connection", cerr, retry_after, list_next);
        return;
    }
    if (status == 401) {
        sp_kube_token_stale(w->k);
        fail(w, status, reason[0] ? reason : "Unauthorized", message, w->attempt == 0 ? 0.05 : -1,
             list_next);
        return;
    }
    fail(w, status, reason[0] ? reason : "error", message[0] ? message : cerr, retry_after,
         list_next);
}

/* ---------------------------------------------------------------- LIST */

static int on_list_data(sp_kreq_t *r, const char *data, size_t len, void *ud)
{
    SP_UNUSED(r);
    sp_kwatch_t *w = ud;
    if (w->stopping || w->body.len + len > MAX_LIST_BYTES)
        return 1;
    sp_buf_add(&w->body, data, len);
    return 0;
}

static void finish_list(sp_kwatch_t *w)
{
    /* What the list did not contain is gone: deliver its deletion. */
    sp_buf_t obj = {0};
    for (size_t i = 0; i < w->nbuckets; i++) {
        kentry_t **pp = &w->buckets[i];
        while (*pp) {
            kentry_t *e = *pp;
            if (e->gen == w->gen) {
                pp = &e->next;
                continue;
            }
            *pp = e->next;
            w->nkeys--;
            const char *slash = strchr(e->key, '/');
            obj.len = 0;
            sp_buf_adds(&obj, "{\"metadata\":{\"namespace\":");
            sp_buf_json_str(&obj, e->key, (size_t)(slash - e->key));
            sp_buf_adds(&obj, ",\"name\":");
            sp_buf_json_str(&obj, slash + 1, strlen(slash + 1));
            sp_buf_adds(&obj, "}}");
            free(e);
            if (w->cbs.event && !w->stopping) {
                w->busy++;
                w->cbs.event(w->ud, "DELETED", obj.p, obj.len);
                w->busy--;
            }
        }
    }
    sp_buf_free(&obj);
    set_str(&w->rv, w->list_rv, w->list_rv ? strlen(w->list_rv) : 0);
    bool relist = w->listed_once;
    w->listed_once = true;
    w->last_sync = now_s();
    w->attempt = 0;
    sp_log(SP_LOG_INFO, relist ? "Kubernetes relist complete" : "Kubernetes list complete",
           "s:resource", w->resource, "i:objects", (int64_t)w->nkeys, "s:resourceVersion",
           w->rv ? w->rv : "", "i:pages", (int64_t)w->list_pages, NULL);
    if (w->cbs.synced && !w->stopping) {
        w->busy++;
        w->cbs.synced(w->ud, w->rv ? w->rv : "", w->page_count, relist);
        w->busy--;
    }
    if (w->stopping) {
        maybe_free(w);
        return;
    }
    if (!w->detached)
        start_watch(w);
}

/* Reads a page's metadata (resourceVersion, continue). Returns false if it is not a list. */
static bool read_page_meta(sp_kwatch_t *w, const sp_buf_t *page)
{
    const char *p = page->p, *end = page->p + page->len;
    if (!p)
        return false;
    const char *meta = sp_json_get(p, end, "metadata");
    const char *items = sp_json_get(p, end, "items");
    if (!meta || !items || (*items != '[' && *items != 'n'))
        return false;
    char tmp[512];
    sp_buf_t b = SP_BUF_ON(tmp);
    const char *v = sp_json_get(meta, end, "resourceVersion");
    if (v && sp_json_string(v, end, &b) == 0 && b.len)
        set_str(&w->list_rv, b.p, b.len);
    b.len = 0;
    v = sp_json_get(meta, end, "continue");
    if (v && *v == '"' && sp_json_string(v, end, &b) == 0 && b.len)
        set_str(&w->cont, b.p, b.len);
    else
        set_str(&w->cont, NULL, 0);
    sp_buf_free(&b);
    return true;
}

/* Delivers the items of the pending page (one pass: each item is validated as it is skipped). */
static void deliver_pending(sp_kwatch_t *w)
{
    const char *p = w->pending.p, *end = w->pending.p + w->pending.len;
    const char *items = p ? sp_json_get(p, end, "items") : NULL;
    sp_buf_t key = {0};
    const char *it = items ? sp_json_array_first(items, end) : NULL;
    while (it && !w->stopping) {
        const char *it_end = sp_json_skip(it, end);
        if (!it_end)
            break;
        if (object_key(it, it_end, &key)) {
            bool known = kput(w, key.p, key.len);
            w->page_count++;
            if (w->cbs.event) {
                w->busy++;
                w->cbs.event(w->ud, known ? "MODIFIED" : "ADDED", it, (size_t)(it_end - it));
                w->busy--;
            }
        }
        const char *n = sp_json_ws(it_end, end);
        it = (n < end && *n == ',') ? sp_json_ws(n + 1, end) : NULL;
    }
    sp_buf_free(&key);
    w->pending.len = 0;
    bool last = w->pending_last;
    w->pending_last = false;
    if (w->stopping) {
        maybe_free(w);
        return;
    }
    if (last)
        finish_list(w);
}

static void on_deliver(uv_timer_t *t)
{
    sp_kwatch_t *w = t->data;
    if (w->pending.len)
        deliver_pending(w);
}

static void on_list_done(sp_kreq_t *r, int code, const char *cerr, long status, void *ud)
{
    sp_kwatch_t *w = ud;
    double retry_after = sp_kreq_retry_after(r);
    w->req = NULL;
    if (w->stopping) {
        maybe_free(w);
        return;
    }
    w->last_status = status;
    if (code == 0 && status == 200) {
        w->list_pages++;
        if (w->pending.len)
            deliver_pending(w); /* the previous page first (normally already done) */
        if (w->stopping)
            return;
        if (!read_page_meta(w, &w->body)) {
            w->body.len = 0;
            fail(w, status, "bad list", "the LIST response is not a list", -1, true);
            return;
        }
        /* Ask for the next page now and deliver this one on the next loop turn, so the API
         * server prepares page n+1 while page n is applied. */
        sp_buf_t page = w->pending;
        w->pending = w->body;
        w->body = page;
        w->body.len = 0;
        w->pending_last = w->cont == NULL;
        if (w->cont)
            start_list(w);
        uv_timer_start(&w->deliver, on_deliver, 0, 0);
        return;
    }
    if (status == 410 && w->cont) {
        /* the continue token expired: start the list over */
        sp_log(SP_LOG_INFO, "Kubernetes list continue token expired: listing again",
               "s:resource", w->resource, NULL);
        set_str(&w->cont, NULL, 0);
        w->body.len = 0;
        w->pending.len = 0; /* a page of the abandoned snapshot */
        w->pending_last = false;
        uv_timer_stop(&w->deliver);
        w->attempt++;
        w->mode = M_BACKOFF;
        w->next_is_list = true;
        uv_timer_start(&w->timer, on_backoff_timer, w->attempt > 2 ? 1000 : 0, 0);
        return;
    }
    handle_failure(w, code, cerr, status, retry_after, true);
    w->body.len = 0;
}

static void start_list(sp_kwatch_t *w)
{
    if (!w->cont) {
        /* a new list: a new generation of marks */
        w->gen++;
        w->page_count = 0;
        w->list_pages = 0;
        w->lists++;
        if (w->listed_once)
            w->relists++;
    }
    w->mode = M_LIST;
    w->relist_needed = false;
    w->body.len = 0;
    sp_buf_t path = {0};
    base_path(w, &path);
    sp_buf_addf(&path, "limit=%d", w->page_size);
    if (w->cont) {
        sp_buf_adds(&path, "&continue=");
        urlenc(&path, w->cont);
    }
    sp_buf_addc(&path, '\0');
    w->req = sp_kube_request(w->k, "GET", path.p, NULL, NULL, 0, 120000, on_list_data,
                             on_list_done, w);
    sp_buf_free(&path);
    if (!w->req)
        fail(w, 0, "client", "cannot start the LIST request", -1, true);
}

/* ---------------------------------------------------------------- WATCH */

/* Handles one event line. Returns 0 to go on, 1 to end the stream (relist or error). */
static int handle_line(sp_kwatch_t *w, const char *line, size_t len)
{
    const char *end = line + len;
    const char *p = sp_json_ws(line, end);
    if (p == end)
        return 0; /* blank line */
    if (!sp_json_skip(p, end)) {
        snprintf(w->last_error, sizeof w->last_error, "bad watch event: not JSON");
        w->errors++;
        return 1;
    }
    char tbuf[32];
    sp_buf_t t = SP_BUF_ON(tbuf);
    const char *tv = sp_json_get(p, end, "type");
    const char *obj = sp_json_get(p, end, "object");
    if (!tv || sp_json_string(tv, end, &t) != 0 || !obj) {
        sp_buf_free(&t);
        return 0;
    }
    const char *obj_end = sp_json_skip(obj, end);
    sp_buf_addc(&t, '\0');
    int rc = 0;
    w->last_event = now_s();
    if (!strcmp(t.p, "BOOKMARK")) {
        w->bookmarks++;
        take_rv(&w->rv, obj, obj_end);
    } else if (!strcmp(t.p, "ERROR")) {
        long long code = 0;
        const char *c = sp_json_get(obj, obj_end, "code");
        if (c)
            sp_json_int(c, obj_end, &code);
        char reason[64], message[256];
        status_text(obj, (size_t)(obj_end - obj), reason, message);
        if (code == 410) {
            sp_log(SP_LOG_INFO, "Kubernetes watch expired (410): relisting", "s:resource",
                   w->resource, "s:message", message, NULL);
            w->relist_needed = true;
        } else {
            snprintf(w->last_error, sizeof w->last_error, "watch ERROR %lld %.60s: %.200s", code, reason,
                     message);
            w->last_status = (long)code;
            w->watch_error = true;
        }
        rc = 1;
    } else if (!strcmp(t.p, "ADDED") || !strcmp(t.p, "MODIFIED") || !strcmp(t.p, "DELETED")) {
        sp_buf_t key = {0};
        if (object_key(obj, obj_end, &key)) {
            if (t.p[0] == 'D')
                kdel(w, key.p, key.len);
            else
                kput(w, key.p, key.len);
            take_rv(&w->rv, obj, obj_end);
            w->events++;
            w->watch_had_event = true;
            if (w->cbs.event) {
                w->busy++;
                w->cbs.event(w->ud, t.p, obj, (size_t)(obj_end - obj));
                w->busy--;
            }
        }
        sp_buf_free(&key);
    }
    sp_buf_free(&t);
    return w->stopping ? 1 : rc;
}

static int frame_events(sp_kwatch_t *w, const char *data, size_t len);

static int on_watch_data(sp_kreq_t *r, const char *data, size_t len, void *ud)
{
    sp_kwatch_t *w = ud;
    if (w->stopping)
        return 1;
    w->last_data = now_s();
    if (sp_kreq_status(r) != 200) {
        /* an error body (Status): keep it for the failure report */
        if (w->body.len + len < 65536)
            sp_buf_add(&w->body, data, len);
        return 0;
    }
    return frame_events(w, data, len);
}

/* Events are newline-delimited and may be cut anywhere: frame them across reads. */
static int frame_events(sp_kwatch_t *w, const char *data, size_t len)
{
    const char *p = data, *end = data + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            if (w->line.len + (size_t)(end - p) > MAX_LINE_BYTES)
                return 1;
            sp_buf_add(&w->line, p, (size_t)(end - p));
            break;
        }
        int rc;
        if (w->line.len) {
            sp_buf_add(&w->line, p, (size_t)(nl - p));
            rc = handle_line(w, w->line.p, w->line.len);
            w->line.len = 0;
        } else {
            rc = handle_line(w, p, (size_t)(nl - p));
        }
        if (rc)
            return 1;
        p = nl + 1;
    }
    return 0;
}

static void on_watchdog(uv_timer_t *t)
{
    sp_kwatch_t *w = t->data;
    if (w->mode != M_WATCH || !w->req || w->stopping)
        return;
    double silent = now_s() - SP_MAX(w->last_data, w->watch_started);
    if (silent > (double)w->timeout_base * 2 + WATCHDOG_MARGIN) {
        sp_log(SP_LOG_WARN, "Kubernetes watch silent for too long: reconnecting", "s:resource",
               w->resource, "d:silent", silent, NULL);
        sp_kreq_cancel(w->req);
        w->req = NULL;
        w->mode = M_BACKOFF;
        w->next_is_list = false;
        uv_timer_start(&w->timer, on_backoff_timer, 0, 0);
    }
}

static void on_watch_done(sp_kreq_t *r, int code, const char *cerr, long status, void *ud)
{
    sp_kwatch_t *w = ud;
    double retry_after = sp_kreq_retry_after(r);
    w->req = NULL;
    uv_timer_stop(&w->watchdog);
    if (w->stopping) {
        maybe_free(w);
        return;
    }
    w->line.len = 0;
    if (w->relist_needed || status == 410) {
        /* A 410 reaches every replica at once (a compaction, an API server restart): spread
         * their relists over kube_relist_jitter seconds; routes keep serving meanwhile. */
        w->relist_needed = false;
        w->body.len = 0;
        set_str(&w->cont, NULL, 0);
        double d = w->relist_jitter * jitter();
        w->mode = M_BACKOFF;
        w->next_is_list = true;
        uv_timer_start(&w->timer, on_backoff_timer, (uint64_t)(d * 1000), 0);
        return;
    }
    if (status == 200) {
        if (w->watch_error) {
            /* an ERROR event other than 410: back off, then watch again */
            char msg[sizeof w->last_error];
            memcpy(msg, w->last_error, sizeof msg);
            fail(w, w->last_status, "watch error", msg, retry_after, false);
            return;
        }
        bool quick = now_s() - w->watch_started < 1.0 && !w->watch_had_event;
        if (code == 0 && !quick) {
            /* a clean end (timeoutSeconds): watch again from the last RV, no relist */
            w->attempt = 0;
            start_watch(w);
            return;
        }
        /* a dropped stream, or one that ended at once: resume after a short, growing pause */
        double d = w->attempt == 0 ? 0.1 + 0.2 * jitter() : sp_kube_backoff(w->attempt - 1, -1, false);
        if (w->watch_had_event)
            d = 0.05 + 0.1 * jitter();
        w->attempt++;
        sp_log(SP_LOG_INFO, "Kubernetes watch ended: resuming from the last resourceVersion",
               "s:resource", w->resource, "s:resourceVersion", w->rv ? w->rv : "", "s:cause",
               code == 0 ? "end of stream" : cerr, "d:retry_in", d, NULL);
        w->mode = M_BACKOFF;
        w->next_is_list = false;
        uv_timer_start(&w->timer, on_backoff_timer, (uint64_t)(d * 1000), 0);
        return;
    }
    if (status == 504 && w->body.p && memmem(w->body.p, w->body.len, "Too large resource version", 26)) {
        /* The server is behind our RV (a restored or replaced etcd): list again from now. */
        sp_log(SP_LOG_WARN, "Kubernetes API server is behind our resourceVersion: relisting",
               "s:resource", w->resource, "s:resourceVersion", w->rv ? w->rv : "", NULL);
        w->body.len = 0;
        set_str(&w->cont, NULL, 0);
        w->mode = M_BACKOFF;
        w->next_is_list = true;
        uv_timer_start(&w->timer, on_backoff_timer,
                       (uint64_t)(sp_kube_backoff(w->attempt++, retry_after, false) * 1000), 0);
        return;
    }
    handle_failure(w, code, cerr, status, retry_after, false);
    w->body.len = 0;
}

static void start_watch(sp_kwatch_t *w)
{
    w->mode = M_WATCH;
    w->watches++;
    w->body.len = 0;
    w->line.len = 0;
    w->watch_had_event = false;
    w->watch_error = false;
    w->watch_started = now_s();
    w->last_data = w->watch_started;
    int timeout = w->timeout_base + (int)(jitter() * w->timeout_base);
    sp_buf_t path = {0};
    base_path(w, &path);
    sp_buf_adds(&path, "watch=1&allowWatchBookmarks=true&resourceVersion=");
    urlenc(&path, w->rv ? w->rv : "");
    sp_buf_addf(&path, "&timeoutSeconds=%d", timeout);
    sp_buf_addc(&path, '\0');
    w->req = sp_kube_request(w->k, "GET", path.p, NULL, NULL, 0, 0, on_watch_data, on_watch_done,
                             w);
    sp_buf_free(&path);
    if (!w->req) {
        fail(w, 0, "client", "cannot start the WATCH request", -1, false);
        return;
    }
    uv_timer_start(&w->watchdog, on_watchdog, 5000, 5000);
}

/* ---------------------------------------------------------------- detached (fuzzing, tests) */

sp_kwatch_t *sp_kwatch_detached(const sp_kwatch_cbs_t *cbs, void *ud)
{
    sp_kwatch_t *w = sp_calloc(1, sizeof *w);
    w->detached = true;
    w->group = sp_strdup("agents.x-k8s.io");
    w->version = sp_strdup("v1beta1");
    w->resource = sp_strdup("sandboxes");
    w->cbs = *cbs;
    w->ud = ud;
    w->nbuckets = 64;
    w->buckets = sp_calloc(w->nbuckets, sizeof *w->buckets);
    w->gen = 1;
    return w;
}

int sp_kwatch_feed_stream(sp_kwatch_t *w, const char *data, size_t len)
{
    return frame_events(w, data, len);
}

bool sp_kwatch_feed_page(sp_kwatch_t *w, const char *data, size_t len, bool last)
{
    w->body.len = 0;
    sp_buf_add(&w->body, data, len);
    if (!read_page_meta(w, &w->body)) {
        w->body.len = 0;
        return false;
    }
    sp_buf_t t = w->pending;
    w->pending = w->body;
    w->body = t;
    w->pending_last = last;
    deliver_pending(w);
    return true;
}

static void free_watch(sp_kwatch_t *w);

void sp_kwatch_free_detached(sp_kwatch_t *w) { free_watch(w); }

/* ---------------------------------------------------------------- lifecycle */

static char *dupz(const char *s) { return (s && *s) ? sp_strdup(s) : NULL; }

sp_kwatch_t *sp_kwatch_start(sp_kube_t *k, const sp_kwatch_opts_t *o, const sp_kwatch_cbs_t *cbs,
                             void *ud)
{
    sp_kwatch_t *w = sp_calloc(1, sizeof *w);
    w->k = k;
    w->group = sp_strdup(o->group ? o->group : "");
    w->version = sp_strdup(o->version);
    w->resource = sp_strdup(o->resource);
    w->ns = dupz(o->namespace_);
    w->label_selector = dupz(o->label_selector);
    w->field_selector = dupz(o->field_selector);
    w->page_size = o->page_size > 0 ? o->page_size : 500;
    w->timeout_base = o->timeout_base > 0 ? o->timeout_base : 300;
    w->relist_jitter = o->relist_jitter > 0 ? o->relist_jitter : 0;
    w->cbs = *cbs;
    w->ud = ud;
    w->nbuckets = 1024;
    w->buckets = sp_calloc(w->nbuckets, sizeof *w->buckets);
    uv_loop_t *loop = sp_kube_loop(k);
    uv_timer_init(loop, &w->timer);
    uv_timer_init(loop, &w->watchdog);
    uv_timer_init(loop, &w->deliver);
    w->timer.data = w->watchdog.data = w->deliver.data = w;
    w->handles = 3;
    srand((unsigned)uv_hrtime());
    start_list(w);
    return w;
}

static void on_handle_closed(uv_handle_t *h)
{
    sp_kwatch_t *w = h->data;
    if (--w->handles == 0)
        free_watch(w);
}

static void free_watch(sp_kwatch_t *w)
{
    for (size_t i = 0; i < w->nbuckets; i++)
        for (kentry_t *e = w->buckets[i], *n; e; e = n) {
            n = e->next;
            free(e);
        }
    free(w->buckets);
    sp_buf_free(&w->body);
    sp_buf_free(&w->pending);
    sp_buf_free(&w->line);
    free(w->group);
    free(w->version);
    free(w->resource);
    free(w->ns);
    free(w->label_selector);
    free(w->field_selector);
    free(w->rv);
    free(w->cont);
    free(w->list_rv);
    free(w);
}

static void maybe_free(sp_kwatch_t *w)
{
    if (w->busy || w->freeing)
        return;
    w->freeing = true;
    w->mode = M_STOPPED;
    uv_timer_stop(&w->timer);
    uv_timer_stop(&w->watchdog);
    uv_timer_stop(&w->deliver);
    uv_close((uv_handle_t *)&w->timer, on_handle_closed);
    uv_close((uv_handle_t *)&w->watchdog, on_handle_closed);
    uv_close((uv_handle_t *)&w->deliver, on_handle_closed);
}

void sp_kwatch_stop(sp_kwatch_t *w)
{
    if (!w || w->stopping)
        return;
    w->stopping = true;
    if (w->req && !w->busy) {
        sp_kreq_cancel(w->req);
        w->req = NULL;
    }
    if (!w->req)
        maybe_free(w);
    /* else: the request's callback (which returns 1 to abort) finishes the job */
}

void sp_kwatch_get_state(const sp_kwatch_t *w, sp_kwatch_state_t *st)
{
    memset(st, 0, sizeof *st);
    st->synced = w->listed_once;
    st->watching = w->mode == M_WATCH && w->req != NULL;
    st->phase = w->stopping ? "stopped" : phase_names[w->mode];
    st->resource_version = w->rv ? w->rv : "";
    st->last_event = w->last_event;
    st->last_sync = w->last_sync;
    st->events = w->events;
    st->bookmarks = w->bookmarks;
    st->lists = w->lists;
    st->relists = w->relists;
    st->watches = w->watches;
    st->errors = w->errors;
    st->list_pages = w->list_pages;
    st->objects = w->nkeys;
    st->last_status = w->last_status;
    st->last_error = w->last_error;
}
