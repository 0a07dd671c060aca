/*
 * lua_k8s.c: the sp.k8s module: one Kubernetes client per process (kube.c) configured by a
 * script on the worker that runs discovery, generic list+watch handles (kwatch.c) whose events
 * reach Lua callbacks as decoded objects, and k8s.request for one-shot calls (GET, PATCH, ...)
 * with the same credentials, TLS and backoff. Callbacks run under the protected-call policy.
 */
#include "kube/kube.h"
#include "kube/kwatch.h"
#include "lua/lua_vm.h"
#include "base/config.h"
#include "base/log.h"
#include "http/worker.h"

#include <stdlib.h>

#define WATCH_MT "sp.k8s.watch"

static sp_kube_t *g_kube;      /* the process's client */
static sp_vm_t *g_owner;       /* the state (worker) that configured it */
static sp_owned_t g_owned;     /* the client as a thing g_owner owns */
static const sp_owned_ops_t client_ops;

typedef struct lwatch {
    sp_kwatch_t *w;
    sp_vm_t *vm;
    int cbs_ref;   /* the options table with on_event / on_synced / on_error */
    int self_ref;  /* keeps the handle alive while the watch runs */
    int decode_ref;
    struct lwatch *next;
} lwatch_t;

typedef struct kcall {
    sp_vm_t *vm;
    sp_task_t *task;
    sp_kreq_t *req;
    uv_timer_t timer;
    char *method, *path, *ctype, *body;
    size_t blen;
    long timeout_ms;
    int attempt, retries;
    bool reauthed;
    sp_buf_t resp;
    struct kcall *next;
} kcall_t;

static lwatch_t *g_watches;
static kcall_t *g_calls;

static sp_kube_t *client_for(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    if (!g_kube)
        luaL_error(L, "sp.k8s: not configured (call k8s.configure first)");
    if (vm != g_owner)
        luaL_error(L, "sp.k8s: the client belongs to another worker (use it from worker 0)");
    return g_kube;
}

static const char *opt_str(lua_State *L, int idx, const char *key)
{
    lua_getfield(L, idx, key);
    const char *s = lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1); /* the string stays referenced by the table */
    return s;
}

/* k8s.configure{server=, token=, token_file=, ca_file=, ca_data=, cert_file=, cert_data=,
 * key_file=, key_data=, insecure=} -> true | nil, err */
static int k_configure(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_vm_t *vm = sp_vm_of(L);
    if (!vm->w)
        return luaL_error(L, "sp.k8s: no event loop here");
    if (g_kube) {
        lua_pushnil(L);
        lua_pushstring(L, "EEXIST: the Kubernetes client is already configured");
        return 2;
    }
    sp_kube_conf_t c = {0};
    c.server = opt_str(L, 1, "server");
    c.token = opt_str(L, 1, "token");
    c.token_file = opt_str(L, 1, "token_file");
    c.ca_file = opt_str(L, 1, "ca_file");
    c.ca_data = opt_str(L, 1, "ca_data");
    c.cert_file = opt_str(L, 1, "cert_file");
    c.cert_data = opt_str(L, 1, "cert_data");
    c.key_file = opt_str(L, 1, "key_file");
    c.key_data = opt_str(L, 1, "key_data");
    lua_getfield(L, 1, "insecure");
    c.insecure = lua_toboolean(L, -1);
    lua_pop(L, 1);
    c.token_refresh = sp_cfg.kube_token_refresh;
    c.compression = sp_cfg.kube_compression;
    char err[256];
    g_kube = sp_kube_new(&vm->w->loop, &c, err);
    if (!g_kube) {
        lua_pushnil(L);
        lua_pushfstring(L, "EINVAL: %s", err);
        return 2;
    }
    g_owner = vm;
    sp_vm_own(vm, &g_owned, &client_ops);
    lua_pushboolean(L, 1);
    return 1;
}

static int k_configured(lua_State *L)
{
    lua_pushboolean(L, g_kube != NULL);
    if (g_kube) {
        lua_pushstring(L, sp_kube_server(g_kube));
        return 2;
    }
    return 1;
}

/* ---------------------------------------------------------------- watches */

static bool push_cb(lwatch_t *lw, const char *name)
{
    lua_State *L = lw->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->cbs_ref);
    lua_getfield(L, -1, name);
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        return false;
    }
    return true;
}

static void w_event(void *ud, const char *type, const char *obj, size_t len)
{
    lwatch_t *lw = ud;
    lua_State *L = lw->vm->L;
    if (!push_cb(lw, "on_event"))
        return;
    lua_pushstring(L, type);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->decode_ref);
    lua_pushlstring(L, obj, len);
    lua_call(L, 1, 1); /* cjson.safe.decode never raises */
    if (lua_isnil(L, -1)) {
        lua_pop(L, 3);
        sp_log(SP_LOG_WARN, "Kubernetes event is not valid JSON", "s:type", type, NULL);
        return;
    }
    sp_vm_pcall(L, 2, 0, "k8s on_event");
}

static void w_synced(void *ud, const char *rv, size_t count, bool relist)
{
    lwatch_t *lw = ud;
    lua_State *L = lw->vm->L;
    if (!push_cb(lw, "on_synced"))
        return;
    lua_createtable(L, 0, 3);
    lua_pushstring(L, rv);
    lua_setfield(L, -2, "resource_version");
    lua_pushinteger(L, (lua_Integer)count);
    lua_setfield(L, -2, "count");
    lua_pushboolean(L, relist);
    lua_setfield(L, -2, "relist");
    sp_vm_pcall(L, 1, 0, "k8s on_synced");
}

static void w_error(void *ud, long status, const char *reason, const char *message, double retry)
{
    lwatch_t *lw = ud;
    lua_State *L = lw->vm->L;
    if (!push_cb(lw, "on_error"))
        return;
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");
    lua_pushstring(L, reason ? reason : "");
    lua_setfield(L, -2, "reason");
    lua_pushstring(L, message ? message : "");
    lua_setfield(L, -2, "message");
    lua_pushnumber(L, retry);
    lua_setfield(L, -2, "retry_in");
    sp_vm_pcall(L, 1, 0, "k8s on_error");
}

static lwatch_t *check_watch(lua_State *L)
{
    lwatch_t **p = luaL_checkudata(L, 1, WATCH_MT);
    if (!*p)
        luaL_error(L, "sp.k8s: this watch was stopped");
    return *p;
}

static void lwatch_stop(lwatch_t *lw)
{
    lua_State *L = lw->vm->L;
    sp_kwatch_stop(lw->w);
    lw->w = NULL;
    lwatch_t **pp = &g_watches;
    while (*pp && *pp != lw)
        pp = &(*pp)->next;
    if (*pp)
        *pp = lw->next;
    /* detach the userdata from the struct */
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->self_ref);
    lwatch_t **ud = lua_touserdata(L, -1);
    if (ud)
        *ud = NULL;
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, lw->cbs_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lw->self_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lw->decode_ref);
    free(lw);
}

static int w_stop(lua_State *L)
{
    lwatch_t **p = luaL_checkudata(L, 1, WATCH_MT);
    if (*p)
        lwatch_stop(*p);
    return 0;
}

static double mono_now(void) { return (double)uv_hrtime() / 1e9; }

/* handle:state() -> table */
static int w_state(lua_State *L)
{
    lwatch_t *lw = check_watch(L);
    sp_kwatch_state_t st;
    sp_kwatch_get_state(lw->w, &st);
    lua_createtable(L, 0, 16);
    lua_pushboolean(L, st.synced);
    lua_setfield(L, -2, "synced");
    lua_pushboolean(L, st.watching);
    lua_setfield(L, -2, "watching");
    lua_pushstring(L, st.phase);
    lua_setfield(L, -2, "phase");
    lua_pushstring(L, st.resource_version);
    lua_setfield(L, -2, "resource_version");
    double now = mono_now();
    if (st.last_event > 0) {
        lua_pushnumber(L, now - st.last_event);
        lua_setfield(L, -2, "seconds_since_event");
    }
    if (st.last_sync > 0) {
        lua_pushnumber(L, now - st.last_sync);
        lua_setfield(L, -2, "seconds_since_sync");
    }
#define NUM(f)                                                                                    \
    lua_pushnumber(L, (double)st.f);                                                              \
    lua_setfield(L, -2, #f)
    NUM(events);
    NUM(bookmarks);
    NUM(lists);
    NUM(relists);
    NUM(watches);
    NUM(errors);
    NUM(list_pages);
    NUM(objects);
    NUM(last_status);
#undef NUM
    if (st.last_error && *st.last_error) {
        lua_pushstring(L, st.last_error);
        lua_setfield(L, -2, "last_error");
    }
    return 1;
}

/* k8s.watch{group=, version=, resource=, namespace=, label_selector=, field_selector=,
 * page_size=, timeout=, relist_jitter=, on_event=fn(type, obj), on_synced=fn(info),
 * on_error=fn(err)} */
static int k_watch(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_kube_t *k = client_for(L);
    sp_vm_t *vm = sp_vm_of(L);
    sp_kwatch_opts_t o = {0};
    o.group = opt_str(L, 1, "group");
    o.version = opt_str(L, 1, "version");
    o.resource = opt_str(L, 1, "resource");
    o.namespace_ = opt_str(L, 1, "namespace");
    o.label_selector = opt_str(L, 1, "label_selector");
    o.field_selector = opt_str(L, 1, "field_selector");
    if (!o.version || !o.resource)
        return luaL_error(L, "k8s.watch: version and resource are required");
    lua_getfield(L, 1, "page_size");
    o.page_size = (int)luaL_optinteger(L, -1, sp_cfg.kube_page_size);
    lua_getfield(L, 1, "timeout");
    o.timeout_base = (int)luaL_optinteger(L, -1, sp_cfg.kube_watch_timeout);
    lua_getfield(L, 1, "relist_jitter");
    o.relist_jitter = luaL_optnumber(L, -1, sp_cfg.kube_relist_jitter);
    lua_pop(L, 3);
    lwatch_t *lw = sp_calloc(1, sizeof *lw);
    lw->vm = vm;
    lua_pushvalue(L, 1);
    lw->cbs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getglobal(L, "require");
    lua_pushstring(L, "cjson.safe");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "decode");
    lw->decode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    lwatch_t **ud = lua_newuserdata(L, sizeof *ud);
    *ud = lw;
    luaL_getmetatable(L, WATCH_MT);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lw->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lw->next = g_watches;
    g_watches = lw;
    static const sp_kwatch_cbs_t cbs = {w_event, w_synced, w_error};
    lw->w = sp_kwatch_start(k, &o, &cbs, lw);
    return 1;
}

/* ---------------------------------------------------------------- one-shot requests */

static void call_unlink(kcall_t *c)
{
    kcall_t **pp = &g_calls;
    while (*pp && *pp != c)
        pp = &(*pp)->next;
    if (*pp)
        *pp = c->next;
}

static void on_call_timer_closed(uv_handle_t *h)
{
    kcall_t *c = h->data;
    free(c->method);
    free(c->path);
    free(c->ctype);
    free(c->body);
    sp_buf_free(&c->resp);
    free(c);
}

static void call_free(kcall_t *c)
{
    call_unlink(c);
    uv_close((uv_handle_t *)&c->timer, on_call_timer_closed);
}

static void call_send(kcall_t *c);

static void on_call_retry(uv_timer_t *t) { call_send(t->data); }

static int on_call_data(sp_kreq_t *r, const char *data, size_t len, void *ud)
{
    SP_UNUSED(r);
    kcall_t *c = ud;
    if (c->resp.len + len > (64u << 20))
        return 1;
    sp_buf_add(&c->resp, data, len);
    return 0;
}

static void on_call_done(sp_kreq_t *r, int code, const char *cerr, long status, void *ud)
{
    kcall_t *c = ud;
    c->req = NULL;
    double retry_after = sp_kreq_retry_after(r);
    bool transport = code != 0 && status == 0;
    bool retryable = transport || status == 429 || status >= 500 || (status == 401 && !c->reauthed);
    if (retryable && c->attempt < c->retries) {
        if (status == 401) {
            sp_kube_token_stale(g_kube);
            c->reauthed = true;
        }
        double d = status == 401 ? 0 : sp_kube_backoff(c->attempt, retry_after, false);
        c->attempt++;
        c->resp.len = 0;
        uv_timer_start(&c->timer, on_call_retry, (uint64_t)(d * 1000), 0);
        return;
    }
    sp_task_t *t = c->task;
    lua_State *co = t->co;
    int n;
    if (transport) {
        lua_pushnil(co);
        lua_pushfstring(co, "ECONNREFUSED: %s", cerr ? cerr : "request failed");
        n = 2;
    } else {
        lua_pushinteger(co, status);
        lua_pushlstring(co, c->resp.p ? c->resp.p : "", c->resp.len);
        lua_createtable(co, 0, 2);
        lua_pushstring(co, sp_kreq_content_type(r));
        lua_setfield(co, -2, "content_type");
        if (retry_after >= 0) {
            lua_pushnumber(co, retry_after);
            lua_setfield(co, -2, "retry_after");
        }
        n = 3;
    }
    t->wait = NULL;
    call_free(c);
    sp_vm_resume(t, n);
}

static void call_send(kcall_t *c)
{
    c->req = sp_kube_request(g_kube, c->method, c->path, c->ctype, c->body, c->blen, c->timeout_ms,
                             on_call_data, on_call_done, c);
    if (!c->req) {
        sp_task_t *t = c->task;
        lua_pushnil(t->co);
        lua_pushstring(t->co, "EIO: cannot start the request");
        t->wait = NULL;
        call_free(c);
        sp_vm_resume(t, 2);
    }
}

/* k8s.request{method="GET", path=, body=, content_type=, timeout=10, retries=3}
 * -> status, body, headers | nil, err. Yields until the answer is in. Connection errors, 429
 * and 5xx are retried with the watch's backoff; a 401 re-reads the token once. */
static int k_request(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    client_for(L);
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *t = sp_vm_task_of(vm, L);
    if (!t)
        return luaL_error(L, "k8s.request: only possible in a hook's or timer's own coroutine");
    const char *path = opt_str(L, 1, "path");
    if (!path || path[0] != '/')
        return luaL_error(L, "k8s.request: path must start with '/'");
    const char *method = opt_str(L, 1, "method");
    size_t blen = 0;
    lua_getfield(L, 1, "body");
    const char *body = lua_isstring(L, -1) ? lua_tolstring(L, -1, &blen) : NULL;
    lua_pop(L, 1);
    kcall_t *c = sp_calloc(1, sizeof *c);
    c->vm = vm;
    c->task = t;
    c->method = sp_strdup(method ? method : "GET");
    c->path = sp_strdup(path);
    const char *ct = opt_str(L, 1, "content_type");
    c->ctype = ct ? sp_strdup(ct) : NULL;
    if (body) {
        c->body = sp_malloc(blen ? blen : 1);
        memcpy(c->body, body, blen);
        c->blen = blen;
    }
    lua_getfield(L, 1, "timeout");
    c->timeout_ms = (long)(luaL_optnumber(L, -1, 10) * 1000);
    lua_getfield(L, 1, "retries");
    c->retries = (int)luaL_optinteger(L, -1, 3);
    lua_pop(L, 2);
    uv_timer_init(&vm->w->loop, &c->timer);
    c->timer.data = c;
    c->next = g_calls;
    g_calls = c;
    t->wait = c;
    call_send(c);
    return lua_yield(L, 0);
}

/* k8s.backoff(attempt [, retry_after [, forbidden]]) -> seconds: the policy the watch uses
 * (forbidden: the slow one for 403) */
static int k_backoff(lua_State *L)
{
    lua_pushnumber(L, sp_kube_backoff((int)luaL_checkinteger(L, 1), luaL_optnumber(L, 2, -1),
                                      lua_toboolean(L, 3)));
    return 1;
}

/* Ends the client with its watches and calls; resume: wake tasks waiting in k8s.request with
 * ECANCELED (a reload); not at the state's end. */
static void close_client(bool resume)
{
    sp_vm_disown(&g_owned);
    while (g_watches)
        lwatch_stop(g_watches);
    while (g_calls) {
        kcall_t *c = g_calls;
        if (c->req)
            sp_kreq_cancel(c->req);
        c->req = NULL;
        uv_timer_stop(&c->timer);
        sp_task_t *t = c->task;
        call_free(c);
        if (resume && t) {
            t->wait = NULL;
            lua_pushnil(t->co);
            lua_pushstring(t->co, "ECANCELED: the Kubernetes client was closed (scripts reloaded)");
            sp_vm_resume(t, 2);
        }
    }
    sp_kube_free(g_kube);
    g_kube = NULL;
    g_owner = NULL;
}

static void client_retire(sp_owned_t *o) { SP_UNUSED(o); close_client(true); }
static void client_close(sp_owned_t *o) { SP_UNUSED(o); close_client(false); }
static const sp_owned_ops_t client_ops = {"k8s client", client_retire, client_close};

int luaopen_sp_k8s(lua_State *L)
{
    static const luaL_Reg wmethods[] = {{"state", w_state}, {"stop", w_stop}, {NULL, NULL}};
    if (luaL_newmetatable(L, WATCH_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, wmethods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"configure", k_configure}, {"configured", k_configured},
                                   {"watch", k_watch},         {"request", k_request},
                                   {"backoff", k_backoff},     {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
