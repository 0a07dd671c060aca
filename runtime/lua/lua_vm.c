/*
 * lua_vm.c: the per-worker Lua state (see lua_vm.h). It owns the state's creation and the
 * script search path, the task (coroutine) pool, the hooks the core calls for each request,
 * and sp_vm_pcall, the one protected-call policy: a traceback is logged, a request gets a 500,
 * and the process keeps serving. Module bindings live in lua_*.c.
 */
#include "lua/lua_vm.h"
#include "base/config.h"
#include "base/log.h"
#include "http/worker.h"

#include <errno.h>
#include <lualib.h>
#include <luajit.h>
#include <stdio.h>
#include <stdlib.h>

extern int luaopen_cjson(lua_State *L);
extern int luaopen_cjson_safe(lua_State *L);

static char vm_key; /* registry[&vm_key] = lightuserdata(vm) */

static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize);

sp_vm_t *sp_vm_of(lua_State *L)
{
    /* Every state made by sp_vm_create runs on vm_alloc with the vm as its userdata: reading
     * it back is two loads, where the registry lookup below hashes a key. */
    void *ud;
    if (lua_getallocf(L, &ud) == vm_alloc)
        return ud;
    lua_pushlightuserdata(L, &vm_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    sp_vm_t *vm = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return vm;
}

/* ---------------------------------------------------------------- memory cap */

/* Wraps LuaJIT's own allocator (much faster than malloc for Lua's many small objects) to
 * count the state's memory and refuse growth past lua_memory_limit_mb. Only script code
 * running in a task is refused (it gets a "not enough memory" error, caught like any other);
 * the runtime's own glue between tasks always gets its few bytes, so it never panics. */
static void *vm_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    sp_vm_t *vm = ud;
    if (nsize == 0) {
        vm->mem_used -= osize;
        return vm->base_alloc(vm->base_ud, ptr, osize, 0);
    }
    if (vm->mem_limit && vm->current && nsize > osize &&
        vm->mem_used + (nsize - osize) > vm->mem_limit) {
        vm->mem_exceeded = true;
        return NULL; /* LuaJIT raises "not enough memory" in the allocating coroutine */
    }
    void *p = vm->base_alloc(vm->base_ud, ptr, osize, nsize);
    if (p)
        vm->mem_used += nsize - osize;
    return p;
}

/* ---------------------------------------------------------------- the time budget */

/* A count hook: every few thousand interpreted instructions, stop a hook or timer that has
 * run longer than script_time_budget since it was last resumed. LuaJIT does not call hooks
 * from compiled (JIT) code, so a hot compiled loop escapes this check; runtime API calls check
 * the budget too (sp_vm_check_budget). */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
    SP_UNUSED(ar);
    sp_vm_check_budget(L);
}

void sp_vm_check_budget(lua_State *L)
{
    if (sp_cfg.script_time_budget <= 0)
        return;
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *t = vm ? vm->current : NULL;
    if (!t || t->co != L)
        return;
    /* Read the clock on every 16th call only: the budget is seconds, a call microseconds. */
    if ((++vm->budget_tick & 15) != 0)
        return;
    double ran = (double)(uv_hrtime() - t->started_ns) / 1e9;
    if (ran > sp_cfg.script_time_budget)
        luaL_error(L, "script time budget exceeded: ran %.3f s without yielding "
                      "(script_time_budget = %g s)", ran, sp_cfg.script_time_budget);
}

/* ---------------------------------------------------------------- protected calls */

static int traceback_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_isstring(L, -1))
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

int sp_vm_pcall(lua_State *L, int nargs, int nresults, const char *what)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback_handler);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (rc) {
        sp_log(SP_LOG_ERROR, "script error", "s:in", what, "s:error", lua_tostring(L, -1), NULL);
        lua_pop(L, 1);
        sp_vm_t *vm = sp_vm_of(L);
        if (vm && vm->w)
            SP_STAT_ADD(vm->w->stats.script_errors, 1);
    }
    return rc;
}

/* ---------------------------------------------------------------- tasks */

static sp_task_t *task_get(sp_vm_t *vm, sp_task_kind_t kind)
{
    sp_task_t *t;
    if (vm->nfree) {
        t = vm->free_tasks[--vm->nfree];
    } else {
        t = sp_calloc(1, sizeof *t);
        t->vm = vm;
        t->co = lua_newthread(vm->L);
        t->co_ref = luaL_ref(vm->L, LUA_REGISTRYINDEX);
    }
    t->kind = kind;
    t->req = NULL;
    t->req_gen = 0;
    t->aborted = false;
    t->running = true;
    t->wait = NULL;
    t->on_abort = NULL;
    t->out_prev = NULL;
    t->out_next = vm->out;
    if (vm->out)
        vm->out->out_prev = t;
    vm->out = t;
    vm->nout++;
    return t;
}

static void task_put(sp_task_t *t, bool reusable)
{
    sp_vm_t *vm = t->vm;
    t->running = false;
    t->req = NULL;
    if (t->out_prev)
        t->out_prev->out_next = t->out_next;
    else
        vm->out = t->out_next;
    if (t->out_next)
        t->out_next->out_prev = t->out_prev;
    t->out_next = t->out_prev = NULL;
    vm->nout--;
    if (!reusable || vm->nfree >= 1024) {
        luaL_unref(vm->L, LUA_REGISTRYINDEX, t->co_ref);
        free(t);
        return;
    }
    lua_settop(t->co, 0);
    if (vm->nfree == vm->free_cap) {
        vm->free_cap = vm->free_cap ? vm->free_cap * 2 : 64;
        vm->free_tasks = sp_realloc(vm->free_tasks, (size_t)vm->free_cap * sizeof(sp_task_t *));
    }
    vm->free_tasks[vm->nfree++] = t;
}

sp_task_t *sp_vm_task_of(sp_vm_t *vm, lua_State *L)
{
    sp_task_t *t = vm->current;
    return (t && t->co == L) ? t : NULL;
}

/* A request task ended (finished or failed): let the core act on the decision. */
static void request_task_done(sp_task_t *t, bool failed, bool sync)
{
    sp_request_t *r = t->req;
    bool live = r && r->gen == t->req_gen;
    if (live) {
        r->script = NULL;
        if (failed) {
            /* Whatever was decided before the error is dropped: the answer is a 500. */
            r->decision = SP_DECIDE_NONE;
            r->extra.len = 0;
            r->error = SP_ERR_SCRIPT;
        }
        if (!sync) {
            r->script_busy = false;
            sp_request_decided(r);
        }
    }
}

/* Appends s[0..n) to out at *at, leaving room for the NUL. */
static void put(char *out, size_t cap, size_t *at, const char *s, size_t n)
{
    n = SP_MIN(n, cap - 1 - *at);
    memcpy(out + *at, s, n);
    *at += n;
}

/* "<what>: METHOD /target (request_id ID)" for the watchdog's stuck report (no printf: this
 * runs for every request). Returns the length written into out (not NUL-terminated). */
static size_t describe_request(char *out, size_t cap, const char *what, const sp_request_t *r)
{
    size_t at = 0;
    const char *m = llhttp_method_name((llhttp_method_t)r->method);
    put(out, cap, &at, what, strlen(what));
    put(out, cap, &at, ": ", 2);
    put(out, cap, &at, m, strlen(m));
    put(out, cap, &at, " ", 1);
    put(out, cap, &at, r->head.p ? r->head.p : "", r->head.p ? SP_MIN(r->url_len, 96) : 0);
    put(out, cap, &at, " (request_id ", 13);
    put(out, cap, &at, r->id, r->id_len);
    put(out, cap, &at, ")", 1);
    return at;
}

/* Tells the worker's watchdog record which script call begins. */
static void watch_begin(sp_vm_t *vm, sp_task_t *t)
{
    char what[160];
    size_t n;
    if (t->kind == SP_TASK_REQUEST && t->req && t->req->gen == t->req_gen)
        n = describe_request(what, sizeof what, "request hook", t->req);
    else if (t->kind == SP_TASK_REQUEST)
        n = (size_t)snprintf(what, sizeof what, "request hook (request gone)");
    else
        n = (size_t)snprintf(what, sizeof what, "timer: %s", t->where[0] ? t->where : "?");
    sp_worker_script_begin(vm->w, what, SP_MIN(n, sizeof what - 1));
}

/* Resumes t and handles the outcome. Returns 1 if the task ended, 0 if it yielded. */
static int task_run(sp_task_t *t, int nargs, bool sync)
{
    sp_vm_t *vm = t->vm;
    sp_task_t *prev = vm->current;
    vm->current = t;
    t->wait = NULL; /* whatever it waited on has ended */
    t->on_abort = NULL;
    t->started_ns = uv_hrtime();
    if (vm->w)
        watch_begin(vm, t);
    int st = lua_resume(t->co, nargs);
    if (vm->w)
        sp_worker_script_end(vm->w);
    vm->current = prev; /* from here on (error reports included) allocations are not capped */
    if (st == LUA_YIELD)
        return 0;
    bool failed = st != 0;
    if (failed) {
        const char *msg = lua_tostring(t->co, -1);
        luaL_traceback(vm->L, t->co, msg ? msg : "(non-string error)", 0);
        const char *what = t->kind == SP_TASK_REQUEST ? "request hook" : "timer";
        if (t->kind == SP_TASK_REQUEST && t->req && t->req->gen == t->req_gen)
            sp_log(SP_LOG_ERROR, "script error", "s:in", what, "s:request_id", t->req->id,
                   "s:error", lua_tostring(vm->L, -1), NULL);
        else
            sp_log(SP_LOG_ERROR, "script error", "s:in", what, "s:error",
                   lua_tostring(vm->L, -1), NULL);
        lua_pop(vm->L, 1);
        if (vm->w)
            SP_STAT_ADD(vm->w->stats.script_errors, 1);
    }
    if (t->kind == SP_TASK_REQUEST)
        request_task_done(t, failed, sync);
    task_put(t, !failed);
    if (vm->mem_exceeded) {
        /* the failed coroutine (and whatever it built) is garbage now: get the memory back */
        vm->mem_exceeded = false;
        lua_gc(vm->L, LUA_GCCOLLECT, 0);
    }
    return 1;
}

void sp_vm_resume(sp_task_t *t, int nargs) { task_run(t, nargs, false); }

void sp_vm_spawn(sp_vm_t *vm, int nargs)
{
    sp_task_t *t = task_get(vm, SP_TASK_TIMER);
    t->where[0] = '\0';
    if (vm->w) {
        lua_Debug ar;
        lua_pushvalue(vm->L, -(nargs + 1)); /* getinfo ">" pops the function it describes */
        if (lua_getinfo(vm->L, ">S", &ar))
            snprintf(t->where, sizeof t->where, "%s:%d", ar.short_src, ar.linedefined);
    }
    /* move function + args from vm->L to the coroutine */
    lua_xmove(vm->L, t->co, nargs + 1);
    task_run(t, nargs, false);
}

/* ---------------------------------------------------------------- request hooks */

/* Pushes the request object of r's slot (created once per slot, reused). */
static void push_request_object(sp_vm_t *vm, lua_State *L, sp_request_t *r)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->reqobj_ref);
    lua_rawgeti(L, -1, (int)r->slot + 1);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_rawgeti(L, LUA_REGISTRYINDEX, vm->reqnew_ref);
        lua_pushlightuserdata(L, r);
        lua_call(L, 1, 1);
        lua_pushvalue(L, -1);
        lua_rawseti(L, -3, (int)r->slot + 1);
    }
    lua_remove(L, -2);
    /* stack: req object */
}

static int hook_request(sp_request_t *r)
{
    sp_vm_t *vm = r->w->vm;
    lua_State *L = vm->L;
    push_request_object(vm, L, r);
    /* req._g = gen; req.ctx = nil (raw stores: the object's metatable has no __newindex) */
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->key_g_ref);
    lua_pushinteger(L, (lua_Integer)r->gen);
    lua_rawset(L, -3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->key_ctx_ref);
    lua_pushnil(L);
    lua_rawset(L, -3);
    sp_task_t *t = task_get(vm, SP_TASK_REQUEST);
    t->req = r;
    t->req_gen = r->gen;
    r->script = t;
    if (r->script_vm != vm) {
        r->script_vm = vm;
        vm->nreq_refs++;
    }
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, vm->on_request_ref);
    lua_xmove(L, t->co, 1);
    return task_run(t, 1, true);
}

static void hook_log(sp_request_t *r)
{
    /* the state that decided the request: req.ctx is there (a reload may have happened since) */
    sp_vm_t *vm = r->script_vm ? r->script_vm : r->w->vm;
    if (vm->on_log_ref == LUA_NOREF)
        return;
    lua_State *L = vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->on_log_ref);
    push_request_object(vm, L, r);
    /* The object may be stale if the slot was never handed to the request hook. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->key_g_ref);
    lua_pushinteger(L, (lua_Integer)r->gen);
    lua_rawset(L, -3);
    if (vm->w) {
        char what[160];
        size_t n = describe_request(what, sizeof what, "log hook", r);
        sp_worker_script_begin(vm->w, what, n);
    }
    sp_vm_pcall(L, 1, 0, "log hook");
    if (vm->w)
        sp_worker_script_end(vm->w);
}

char sp_vm_body_wait; /* task->wait marker: suspended in req:read_body */

static void hook_body_ready(sp_request_t *r, int err)
{
    sp_task_t *t = r->script;
    if (!t || t->req != r || t->req_gen != r->gen || t->wait != &sp_vm_body_wait)
        return;
    t->wait = NULL;
    if (err == 0) {
        lua_pushlstring(t->co, r->body.p ? r->body.p : "", r->body.len);
        sp_vm_resume(t, 1);
    } else {
        lua_pushnil(t->co);
        lua_pushstring(t->co, err == -E2BIG    ? "E2BIG: request body larger than the limit"
                              : err == -EINVAL ? "EINVAL: malformed request body"
                                               : "ECONNRESET: the client went away");
        sp_vm_resume(t, 2);
    }
}

void sp_vm_body_abort(sp_task_t *t) { hook_body_ready(t->req, -ECONNRESET); }

static void hook_abort(sp_request_t *r)
{
    sp_task_t *t = r->script;
    if (t && t->req == r && t->req_gen == r->gen) {
        t->aborted = true;
        if (t->on_abort) /* a suspended wait ends at once (read_body, core.wait) */
            t->on_abort(t);
    }
}

static void hook_release(sp_request_t *r)
{
    r->script = NULL;
    if (r->script_vm) {
        ((sp_vm_t *)r->script_vm)->nreq_refs--;
        r->script_vm = NULL;
    }
}

const sp_hooks_t sp_vm_hooks = {
    .request = hook_request,
    .log = hook_log,
    .abort = hook_abort,
    .release = hook_release,
    .body_ready = hook_body_ready,
};

/* ---------------------------------------------------------------- creation */

static int strict_newindex(lua_State *L)
{
    return luaL_error(L, "assignment to undeclared global '%s' (use local, or rawset(_G, ...))",
                      lua_tostring(L, 2));
}

static void add_path(sp_buf_t *b, const char *dir)
{
    if (!dir || !*dir)
        return;
    sp_buf_addf(b, "%s/?.lua;%s/?/init.lua;", dir, dir);
}

static int load_config_table(lua_State *L)
{
    if (sp_cfg.config_file) {
        if (luaL_loadfile(L, sp_cfg.config_file))
            return lua_error(L);
        lua_call(L, 0, 1);
        if (!lua_istable(L, -1))
            return luaL_error(L, "config %s must return a table", sp_cfg.config_file);
    } else {
        lua_newtable(L);
    }
    return 1;
}

static int preload_embedded(lua_State *L)
{
    /* package.preload[name] = loader for each embedded runtime module */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    for (const sp_embedded_t *e = sp_embedded_lua; e->name; e++) {
        char chunk[128];
        snprintf(chunk, sizeof chunk, "=[runtime]/%s", e->name);
        if (luaL_loadbuffer(L, e->source, e->len, chunk))
            return lua_error(L);
        lua_setfield(L, -2, e->name);
    }
    lua_pop(L, 2);
    return 0;
}

static void preload(lua_State *L, const char *name, lua_CFunction f)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, f);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}

static int vm_setup(lua_State *L)
{
    const char *entry = lua_tostring(L, 1);
    luaL_openlibs(L);
    preload(L, "cjson", luaopen_cjson);
    preload(L, "cjson.safe", luaopen_cjson_safe);
    preload(L, "sp.core", luaopen_sp_core);
    preload(L, "sp.routes", luaopen_sp_routes);
    preload(L, "sp.timer", luaopen_sp_timer);
    preload(L, "sp.shared", luaopen_sp_shared);
    preload(L, "sp.fs", luaopen_sp_fs);
    preload(L, "sp.k8s", luaopen_sp_k8s);
    preload(L, "sp.crypto", luaopen_sp_crypto);
    preload(L, "sp.yaml", luaopen_sp_yaml);
    preload(L, "sp.redis", luaopen_sp_redis);
    preload_embedded(L);

    /* The script search path: override directory, then built-in scripts, then system. */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    sp_buf_t b = {0};
    add_path(&b, sp_cfg.scripts_dir);
    add_path(&b, sp_cfg.builtin_dir);
    sp_buf_adds(&b, lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushlstring(L, b.p, b.len);
    sp_buf_free(&b);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);

    /* sp.config: the config file's table, loaded in this state */
    lua_pushcfunction(L, load_config_table);
    lua_call(L, 0, 1);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "sp.config");
    lua_pop(L, 3);

    if (!entry)
        return 0; /* test mode: no strict globals (busted sets its own), no scripts loaded */

    /* Strict globals: scripts cannot create globals by accident. */
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_newtable(L);
    lua_pushcfunction(L, strict_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, -2);
    lua_pop(L, 1);

    /* The request object constructor */
    lua_getglobal(L, "require");
    lua_pushstring(L, "sp.request");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "new");
    lua_remove(L, -2);
    /* stack: entry, new */
    lua_getglobal(L, "require");
    lua_pushstring(L, entry);
    lua_call(L, 1, 1);
    if (!lua_istable(L, -1))
        return luaL_error(L, "script '%s' must return a table of hooks", entry);
    lua_getfield(L, -1, "on_request");
    if (!lua_isfunction(L, -1))
        return luaL_error(L, "script '%s' must define on_request(req)", entry);
    lua_pop(L, 1);
    lua_getfield(L, -1, "on_log");
    if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
        return luaL_error(L, "script '%s': on_log must be a function", entry);
    lua_pop(L, 1);
    /* stack: entry, new, init */
    return 2;
}

sp_vm_t *sp_vm_create(sp_worker_t *w, const char *entry, char *err, size_t errlen)
{
    sp_vm_t *vm = sp_calloc(1, sizeof *vm);
    vm->w = w;
    vm->owned.next = vm->owned.prev = &vm->owned;
    vm->mem_limit = (size_t)sp_cfg.lua_memory_limit_mb * 1024 * 1024;
    vm->on_request_ref = vm->on_log_ref = vm->init_ref = LUA_NOREF;
    lua_State *L = luaL_newstate();
    if (!L) {
        snprintf(err, errlen, "cannot create a Lua state");
        free(vm);
        return NULL;
    }
    vm->base_alloc = lua_getallocf(L, &vm->base_ud);
    vm->mem_used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024;
    lua_setallocf(L, vm_alloc, vm);
    if (sp_cfg.script_time_budget > 0 && w)
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, 10000);
    vm->L = L;
    lua_pushlightuserdata(L, &vm_key);
    lua_pushlightuserdata(L, vm);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    vm->reqobj_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushliteral(L, "_g");
    vm->key_g_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushliteral(L, "ctx");
    vm->key_ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L); /* the route cache of sp.routes.get */
    vm->route_cache_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    lua_pushcfunction(L, traceback_handler);
    lua_pushcfunction(L, vm_setup);
    if (entry)
        lua_pushstring(L, entry);
    else
        lua_pushnil(L);
    if (lua_pcall(L, 1, entry ? 2 : 0, 1)) {
        snprintf(err, errlen, "%s", lua_tostring(L, -1));
        sp_vm_destroy(vm); /* with whatever the scripts' loading started */
        return NULL;
    }
    if (!entry) {
        lua_pop(L, 1);
        return vm;
    }
    /* stack: handler, new, init */
    lua_getfield(L, -1, "on_request");
    vm->on_request_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, -1, "on_log");
    vm->on_log_ref = lua_isnil(L, -1) ? (lua_pop(L, 1), LUA_NOREF)
                                       : luaL_ref(L, LUA_REGISTRYINDEX);
    vm->init_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    vm->reqnew_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    return vm;
}

int sp_vm_start(sp_vm_t *vm)
{
    lua_State *L = vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->init_ref);
    lua_getfield(L, -1, "on_start");
    lua_remove(L, -2);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    /* on_start runs as a task so it may sleep or wait like any other script code */
    sp_vm_spawn(vm, 0);
    return 0;
}

/* Prints sp.lint's warnings about the scripts (they never fail the check). */
static void lint(lua_State *L)
{
    lua_getglobal(L, "require");
    lua_pushstring(L, "sp.lint");
    if (sp_vm_pcall(L, 1, 1, "lint"))
        return;
    lua_getfield(L, -1, "scan_dirs");
    lua_newtable(L);
    int n = 0;
    if (sp_cfg.scripts_dir) {
        lua_pushstring(L, sp_cfg.scripts_dir);
        lua_rawseti(L, -2, ++n);
    }
    if (sp_cfg.builtin_dir) {
        lua_pushstring(L, sp_cfg.builtin_dir);
        lua_rawseti(L, -2, ++n);
    }
    if (sp_vm_pcall(L, 1, 1, "lint") == 0) {
        int k = (int)lua_objlen(L, -1);
        for (int i = 1; i <= k; i++) {
            lua_rawgeti(L, -1, i);
            fprintf(stderr, "sandbox-proxy: check: warning: %s\n", lua_tostring(L, -1));
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

int sp_vm_check(sp_vm_t *vm)
{
    lua_State *L = vm->L;
    lint(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->init_ref);
    lua_getfield(L, -1, "check");
    lua_remove(L, -2);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (sp_vm_pcall(L, 0, 1, "check"))
        return 1;
    int problems = 0;
    if (lua_istable(L, -1)) {
        int n = (int)lua_objlen(L, -1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            fprintf(stderr, "sandbox-proxy: check: %s\n", lua_tostring(L, -1));
            lua_pop(L, 1);
            problems++;
        }
    }
    lua_pop(L, 1);
    return problems;
}

void sp_vm_own(sp_vm_t *vm, sp_owned_t *o, const sp_owned_ops_t *ops)
{
    o->ops = ops;
    o->vm = vm;
    o->retired = false;
    o->prev = vm->owned.prev;
    o->next = &vm->owned;
    vm->owned.prev->next = o;
    vm->owned.prev = o;
}

void sp_vm_disown(sp_owned_t *o)
{
    if (!o->next)
        return;
    o->prev->next = o->next;
    o->next->prev = o->prev;
    o->next = o->prev = NULL;
}

/* A retire may resume tasks, which may own new things or end others: each pass takes what is
 * not yet retired into a list of its own and retires it one by one; things owned during a pass
 * are retired by the next one. */
void sp_vm_retire(sp_vm_t *vm)
{
    vm->retiring = true;
    vm->retire_started = uv_hrtime();
    for (;;) {
        sp_owned_t pending = {.next = &pending, .prev = &pending};
        for (sp_owned_t *o = vm->owned.next, *n; o != &vm->owned; o = n) {
            n = o->next;
            if (o->retired)
                continue;
            sp_vm_disown(o);
            o->prev = pending.prev;
            o->next = &pending;
            pending.prev->next = o;
            pending.prev = o;
        }
        if (pending.next == &pending)
            break;
        while (pending.next != &pending) {
            sp_owned_t *o = pending.next;
            sp_vm_disown(o);
            sp_vm_own(vm, o, o->ops);
            o->retired = true;
            if (o->ops->retire)
                o->ops->retire(o);
        }
    }
}

/* Ends everything the state owns, without calling Lua. */
static void close_owned(sp_vm_t *vm)
{
    while (vm->owned.next != &vm->owned) {
        sp_owned_t *o = vm->owned.next;
        sp_vm_disown(o);
        o->ops->close(o);
    }
}

bool sp_vm_idle(const sp_vm_t *vm) { return vm->nout == 0 && vm->nreq_refs == 0; }

void sp_vm_abandon_tasks(sp_vm_t *vm)
{
    /* requests that still point at this state log in the current one instead */
    if (vm->w)
        for (uint32_t i = 0; i < vm->w->nslots; i++)
            if (vm->w->slots[i]->script_vm == vm) {
                vm->w->slots[i]->script_vm = NULL;
                vm->nreq_refs--;
            }
    while (vm->out) {
        sp_task_t *t = vm->out;
        sp_request_t *r = t->req;
        if (t->kind == SP_TASK_REQUEST && r && r->gen == t->req_gen) {
            r->script = NULL;
            r->decision = SP_DECIDE_NONE;
            r->extra.len = 0;
            r->error = SP_ERR_SCRIPT;
            r->script_busy = false;
            sp_log(SP_LOG_ERROR, "script task abandoned by a reload", "s:request_id", r->id, NULL);
            task_put(t, false);
            sp_request_decided(r);
        } else {
            task_put(t, false);
        }
    }
}

void sp_vm_destroy(sp_vm_t *vm)
{
    if (!vm)
        return;
    close_owned(vm);
    while (vm->out)
        task_put(vm->out, false);
    lua_close(vm->L);
    sp_buf_free(&vm->scratch);
    for (int i = 0; i < vm->nfree; i++)
        free(vm->free_tasks[i]);
    free(vm->free_tasks);
    free(vm);
}

int sp_vm_run_busted(sp_vm_t *vm, int argc, char **argv)
{
    lua_State *L = vm->L;
    lua_createtable(L, argc, 1);
    lua_pushstring(L, "busted");
    lua_rawseti(L, -2, 0);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setglobal(L, "arg");
    /* busted's runner inspects its caller: call it from a Lua chunk */
    static const char boot[] = "require('busted.runner')({ standalone = false })";
    if (luaL_loadbuffer(L, boot, sizeof boot - 1, "=sandbox-proxy-test")) {
        fprintf(stderr, "sandbox-proxy test: %s\n", lua_tostring(L, -1));
        return 1;
    }
    if (sp_vm_pcall(L, 0, 0, "busted (is lua-busted installed?)"))
        return 1;
    return 0; /* busted exits with its own status; reaching here means no specs ran */
}
