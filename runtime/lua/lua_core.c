/*
 * lua_core.c: the sp.core module (process facts, clocks, raw log output, counters) and the
 * sp.fs module (reading small files, reading a big JSON list item by item, watching a file or a
 * ConfigMap-style directory).
 */
#include "lua/lua_vm.h"
#include "base/config.h"
#include "base/log.h"
#include "http/worker.h"
#include "state/shdict.h"
#include "base/fswatch.h"
#include "base/json_scan.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* ---------------------------------------------------------------- sp.core */

static int c_worker_id(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    lua_pushinteger(L, vm->w ? vm->w->id : -1);
    return 1;
}

static int c_workers(lua_State *L)
{
    lua_pushinteger(L, sp_workers_count());
    return 1;
}

static int c_now(lua_State *L)
{
    lua_pushnumber(L, sp_wall_time());
    return 1;
}

static int c_monotonic(lua_State *L)
{
    lua_pushnumber(L, (double)uv_hrtime() / 1e9);
    return 1;
}

static int c_iso8601(lua_State *L)
{
    char out[32];
    sp_iso8601(luaL_optnumber(L, 1, sp_wall_time()), out);
    lua_pushstring(L, out);
    return 1;
}

static int c_draining(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    lua_pushboolean(L, vm->w && vm->w->draining);
    return 1;
}

/* core.log_write(level, line_without_newline, stream): writes one preformatted JSON line. */
static int c_log_write(lua_State *L)
{
    const char *level = luaL_checkstring(L, 1);
    size_t n;
    const char *line = luaL_checklstring(L, 2, &n);
    int fd = luaL_optint(L, 3, 2);
    int lv = sp_log_level_parse(level);
    if (lv < 0)
        return luaL_argerror(L, 1, "level must be debug, info, warn or error");
    if (lv < sp_log_min_level && fd == 2)
        return 0;
    char stack[2048];
    sp_buf_t b = SP_BUF_ON(stack);
    sp_buf_add(&b, line, n);
    sp_buf_addc(&b, '\n');
    sp_log_raw(fd == 1 ? 1 : 2, b.p, b.len);
    sp_buf_free(&b);
    return 0;
}

/* core.access_log(line): queues one access-log line (no newline) for stdout. Never blocks. */
static int c_access_log(lua_State *L)
{
    size_t n;
    const char *line = luaL_checklstring(L, 1, &n);
    sp_vm_t *vm = sp_vm_of(L);
    if (vm->w && vm->w->alog)
        sp_alog_append(vm->w, line, n);
    else
        sp_log_raw(1, line, n), sp_log_raw(1, "\n", 1);
    return 0;
}

static int c_log_enabled(lua_State *L)
{
    int lv = sp_log_level_parse(luaL_checkstring(L, 1));
    lua_pushboolean(L, lv >= 0 && lv >= sp_log_min_level);
    return 1;
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    if (v) {
        lua_pushstring(L, v);
        lua_setfield(L, -2, k);
    }
}

static void push_knob(const char *name, sp_knob_type_t type, const void *value, void *ud)
{
    lua_State *L = ud;
    switch (type) {
    case SP_KNOB_INT:
        lua_pushinteger(L, *(const int *)value);
        break;
    case SP_KNOB_DOUBLE:
        lua_pushnumber(L, *(const double *)value);
        break;
    case SP_KNOB_BOOL:
        lua_pushboolean(L, *(const bool *)value);
        break;
    case SP_KNOB_STR:
    case SP_KNOB_CIDRS: /* the knob's text */
        if (!*(char *const *)value)
            return; /* unset: absent */
        lua_pushstring(L, *(char *const *)value);
        break;
    }
    lua_setfield(L, -2, name);
}

/* core.settings(): every knob (from the knob table, so none can be missing; an unset string
 * knob is absent), plus what the process was started with. */
static int c_settings(lua_State *L)
{
    lua_newtable(L);
    sp_config_each(&sp_cfg, push_knob, L);
    set_str(L, "scripts_dir", sp_cfg.scripts_dir);
    set_str(L, "builtin_dir", sp_cfg.builtin_dir);
    set_str(L, "config_file", sp_cfg.config_file);
    set_str(L, "sandboxes_file", sp_cfg.sandboxes_file);
    set_str(L, "version", SP_VERSION);
    lua_pushboolean(L, sp_cfg.demo);
    lua_setfield(L, -2, "demo");
    lua_pushboolean(L, sp_cfg.check_only);
    lua_setfield(L, -2, "check_only");
    set_str(L, "source", sp_cfg.test_mode        ? "none"
                         : sp_cfg.sandboxes_file ? "file"
                         : sp_cfg.demo           ? "demo"
                                                 : "kubernetes");
    lua_pushinteger(L, sp_workers_count()); /* the count running (the knob's 0 means CPUs) */
    lua_setfield(L, -2, "workers");
    return 1;
}

/* A histogram's buckets as { {le, n}, ..., {"+Inf", n} } (n per bucket, not cumulative), and
 * its sum in seconds as field sum_name. */
static void push_histogram(lua_State *L, const uint64_t *bounds_ns, int n, const uint64_t *counts,
                           uint64_t sum_us, const char *name, const char *sum_name)
{
    lua_createtable(L, n + 1, 0);
    for (int b = 0; b <= n; b++) {
        lua_createtable(L, 2, 0);
        if (b < n)
            lua_pushnumber(L, (double)bounds_ns[b] / 1e9);
        else
            lua_pushstring(L, "+Inf");
        lua_rawseti(L, -2, 1);
        lua_pushnumber(L, (double)counts[b]);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, b + 1);
    }
    lua_setfield(L, -2, name);
    lua_pushnumber(L, (double)sum_us / 1e6);
    lua_setfield(L, -2, sum_name);
}

/* core.stats(): the counters of every worker added up, and the process-wide gauges:
 * { requests, by_method = { GET = { [1..5] = n, none = n }, ... }, latency_buckets = { {le, n} },
 *   latency_sum, upstream_connect_buckets, upstream_connect_sum, upstream_first_byte_buckets,
 *   upstream_first_byte_sum (the same shape), upstream_connect_errors, upstream_timeouts,
 *   script_errors, parse_errors,
 *   accesslog_dropped, trace_spans_exported, trace_spans_dropped, write_batches,
 *   batched_writes, open_connections, open_tunnels, lua_memory (this worker's state) } */
static int c_stats(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    uint64_t req = 0, mc[SP_M_COUNT][6] = {{0}}, lat[SP_LAT_BUCKETS + 1] = {0}, sum = 0;
    uint64_t ce = 0, to = 0, se = 0, pe = 0, drop = 0, active = 0, tx = 0, tdrop = 0;
    uint64_t wbn = 0, wbw = 0;
    uint64_t upc[SP_UPC_BUCKETS + 1] = {0}, upc_sum = 0, upf[SP_UPF_BUCKETS + 1] = {0}, upf_sum = 0;
    int n = sp_workers_count();
    for (int i = 0; i < n; i++) {
        sp_worker_t *w = sp_worker_get(i);
        if (!w)
            continue;
        req += SP_STAT_GET(w->stats.requests);
        for (int m = 0; m < SP_M_COUNT; m++)
            for (int c = 0; c < 6; c++)
                mc[m][c] += SP_STAT_GET(w->stats.by_method_class[m][c]);
        for (int b = 0; b <= SP_LAT_BUCKETS; b++)
            lat[b] += SP_STAT_GET(w->stats.latency[b]);
        sum += SP_STAT_GET(w->stats.latency_sum_us);
        for (int b = 0; b <= SP_UPC_BUCKETS; b++)
            upc[b] += SP_STAT_GET(w->stats.upconnect[b]);
        upc_sum += SP_STAT_GET(w->stats.upconnect_sum_us);
        for (int b = 0; b <= SP_UPF_BUCKETS; b++)
            upf[b] += SP_STAT_GET(w->stats.upfirst[b]);
        upf_sum += SP_STAT_GET(w->stats.upfirst_sum_us);
        ce += SP_STAT_GET(w->stats.upstream_connect_errors);
        to += SP_STAT_GET(w->stats.upstream_timeouts);
        se += SP_STAT_GET(w->stats.script_errors);
        pe += SP_STAT_GET(w->stats.parse_errors);
        drop += SP_STAT_GET(w->stats.accesslog_dropped);
        tx += SP_STAT_GET(w->stats.trace_spans_exported);
        tdrop += SP_STAT_GET(w->stats.trace_spans_dropped);
        wbn += SP_STAT_GET(w->stats.write_batches);
        wbw += SP_STAT_GET(w->stats.batched_writes);
        active += SP_STAT_GET(w->active_requests);
    }
    lua_newtable(L);
    lua_pushnumber(L, (double)req);
    lua_setfield(L, -2, "requests");
    lua_newtable(L);
    for (int m = 0; m < SP_M_COUNT; m++) {
        lua_newtable(L);
        for (int c = 1; c <= 5; c++) {
            lua_pushnumber(L, (double)mc[m][c]);
            lua_rawseti(L, -2, c);
        }
        lua_pushnumber(L, (double)mc[m][0]);
        lua_setfield(L, -2, "none");
        lua_setfield(L, -2, sp_method_names[m]);
    }
    lua_setfield(L, -2, "by_method");
    lua_newtable(L);
    for (int b = 0; b <= SP_LAT_BUCKETS; b++) {
        lua_createtable(L, 2, 0);
        if (b < SP_LAT_BUCKETS)
            lua_pushnumber(L, sp_latency_bounds[b]);
        else
            lua_pushstring(L, "+Inf");
        lua_rawseti(L, -2, 1);
        lua_pushnumber(L, (double)lat[b]);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, b + 1);
    }
    lua_setfield(L, -2, "latency_buckets");
    lua_pushnumber(L, (double)sum / 1e6);
    lua_setfield(L, -2, "latency_sum");
    push_histogram(L, sp_upconnect_bounds_ns, SP_UPC_BUCKETS, upc, upc_sum,
                   "upstream_connect_buckets", "upstream_connect_sum");
    push_histogram(L, sp_upfirst_bounds_ns, SP_UPF_BUCKETS, upf, upf_sum,
                   "upstream_first_byte_buckets", "upstream_first_byte_sum");
#define F(name, v)                                                                                \
    lua_pushnumber(L, (double)(v));                                                               \
    lua_setfield(L, -2, name)
    F("upstream_connect_errors", ce);
    F("upstream_timeouts", to);
    F("script_errors", se);
    F("parse_errors", pe);
    F("accesslog_dropped", drop);
    F("trace_spans_exported", tx);
    F("trace_spans_dropped", tdrop);
    F("write_batches", wbn);
    F("batched_writes", wbw);
    F("active_requests", active);
    F("open_connections", atomic_load(&sp_open_connections));
    F("open_tunnels", atomic_load(&sp_open_tunnels));
    F("lua_memory", vm->mem_used);
#undef F
    return 1;
}

/* core.read_body(request_pointer, limit) -> body | nil, err. Yields until the body is in.
 * Called by the request object's read_body method after its liveness check. */
static int c_read_body(lua_State *L)
{
    sp_request_t *r = lua_touserdata(L, 1);
    double limit = luaL_checknumber(L, 2);
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *t = sp_vm_task_of(vm, L);
    if (!r || !t || t->req != r || t->req_gen != r->gen)
        return luaL_error(L, "read_body: only in the request hook's own coroutine");
    if (limit < 0)
        return luaL_argerror(L, 2, "limit must be >= 0");
    int rc = sp_request_read_body(r, (uint64_t)limit);
    if (rc == 1) {
        lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.len);
        return 1;
    }
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, rc == -E2BIG ? "E2BIG: request body larger than the limit"
                          : rc == -EINVAL ? "EINVAL: malformed request body"
                                          : "ENOTCONN: the request is not waiting for a decision");
        return 2;
    }
    t->wait = &sp_vm_body_wait;
    t->on_abort = sp_vm_body_abort;
    return lua_yield(L, 0);
}

/* core.hold(request_pointer, dict_name, key, limit) -> true | false | nil, err.
 * Called by the request object's hold method after its liveness check. */
static int c_hold(lua_State *L)
{
    sp_request_t *r = lua_touserdata(L, 1);
    size_t dl, kl;
    const char *dname = luaL_checklstring(L, 2, &dl);
    const char *key = luaL_checklstring(L, 3, &kl);
    double limit = luaL_checknumber(L, 4);
    if (!r)
        return luaL_argerror(L, 1, "request expected");
    sp_shdict_t *d = sp_shdict_find(dname, dl);
    if (!d) {
        lua_pushnil(L);
        lua_pushfstring(L, "ENOENT: no shared dict '%s' (declare it in shared_dicts)", dname);
        return 2;
    }
    int rc = sp_request_hold(r, d, key, kl, limit);
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, "E2BIG: at most 4 holds per request, keys under 128 bytes");
        return 2;
    }
    lua_pushboolean(L, rc);
    return 1;
}

/* core.stuck_workers() -> { ids of workers the watchdog reports stuck } (empty: none). */
static int c_stuck_workers(lua_State *L)
{
    int ids[256];
    int n = sp_workers_stuck(ids, (int)SP_ARRAY_LEN(ids));
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

int luaopen_sp_core(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"worker_id", c_worker_id}, {"workers", c_workers},     {"now", c_now},
        {"monotonic", c_monotonic}, {"iso8601", c_iso8601},     {"draining", c_draining},
        {"log_write", c_log_write}, {"log_enabled", c_log_enabled}, {"settings", c_settings},
        {"stats", c_stats},         {"read_body", c_read_body}, {"hold", c_hold},
        {"access_log", c_access_log}, {"stuck_workers", c_stuck_workers},
        {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    sp_sync_register(L);
    lua_pushstring(L, SP_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}

/* ---------------------------------------------------------------- sp.fs */

/* Reads the whole file at path into b (sized from fstat up front). Returns 0, or pushes
 * nil, "ENOENT: path: message" / "EIO: path: read error" and returns 2 (b left empty). */
static int read_whole_file(lua_State *L, const char *path, sp_buf_t *b)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s: %s", uv_err_name(-e), path, strerror(e));
        return 2;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && st.st_size > 0)
        sp_buf_reserve(b, (size_t)st.st_size + 1);
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0)
        sp_buf_add(b, tmp, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        sp_buf_free(b);
        lua_pushnil(L);
        lua_pushfstring(L, "EIO: %s: read error", path);
        return 2;
    }
    return 0;
}

/* fs.read(path) -> contents | nil, "ENOENT: message". Blocking: for small local files. */
static int f_read(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    sp_buf_t b = {0};
    if (read_whole_file(L, path, &b))
        return 2;
    lua_pushlstring(L, b.p ? b.p : "", b.len);
    sp_buf_free(&b);
    return 1;
}

/* fs.stat(path) -> {mtime=, size=, ino=, type="file"|"dir"|"other"} | nil, err (follows links) */
static int f_stat(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    struct stat st;
    if (stat(path, &st) != 0) {
        int e = errno;
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s: %s", uv_err_name(-e), path, strerror(e));
        return 2;
    }
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec / 1e9);
    lua_setfield(L, -2, "mtime");
    lua_pushnumber(L, (double)st.st_size);
    lua_setfield(L, -2, "size");
    lua_pushnumber(L, (double)st.st_ino);
    lua_setfield(L, -2, "ino");
    lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
    lua_setfield(L, -2, "type");
    return 1;
}

typedef struct fswatch {
    sp_owned_t owned; /* first: the state's list holds watches by this */
    sp_fswatch_t *fw;
    sp_vm_t *vm;
    int fn_ref;
    char *path;
} fswatch_t;

static void fw_close(fswatch_t *w)
{
    sp_vm_disown(&w->owned);
    sp_fswatch_stop(w->fw); /* no callback after this */
    luaL_unref(w->vm->L, LUA_REGISTRYINDEX, w->fn_ref);
    free(w->path);
    free(w);
}

static void fw_owned_close(sp_owned_t *o) { fw_close((fswatch_t *)o); }

/* A reload ends the watch: the new state makes its own. */
static const sp_owned_ops_t fswatch_ops = {"fs.watch", fw_owned_close, fw_owned_close};

/* The path itself (links followed): the directory watch also fires for its neighbours. */
static uint64_t fw_sig(void *ud)
{
    fswatch_t *w = ud;
    return sp_stat_sig(SP_HASH_INIT, w->path);
}

static void fw_fire(void *ud)
{
    fswatch_t *w = ud;
    lua_State *L = w->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->fn_ref);
    lua_pushstring(L, w->path);
    sp_vm_spawn(w->vm, 1);
}

static int fw_cancel(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "_w");
    fswatch_t *w = lua_touserdata(L, -1);
    SP_VM_EACH_OWNED(sp_vm_of(L), o)
        if (o == &w->owned) {
            fw_close(w);
            lua_pushboolean(L, 1);
            return 1;
        }
    lua_pushboolean(L, 0);
    return 1;
}

/*
 * fs.watch(path, fn [, poll_seconds]) -> handle with :cancel(). Calls fn(path) in a task after
 * the file (or directory) changes: inotify on the containing directory catches in-place writes,
 * renames and ConfigMap symlink swaps; a stat poll (default every 2 s) is the backstop.
 */
static int f_watch(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    double poll_s = luaL_optnumber(L, 3, 2.0);
    if (!vm->w)
        return luaL_error(L, "fs.watch: no event loop here");
    fswatch_t *w = sp_calloc(1, sizeof *w);
    w->vm = vm;
    w->path = sp_strdup(path);
    lua_pushvalue(L, 2);
    w->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    /* Watch the directory holding the file (or the directory itself); changes settle for
     * 100 ms; the poll is the backstop. */
    char dir[PATH_MAX];
    sp_dir_of(path, dir, sizeof dir);
    const char *dirs[1] = {dir};
    w->fw = sp_fswatch_start(&vm->w->loop, dirs, 1, 100, (unsigned)(poll_s * 1000), fw_sig,
                             fw_fire, w);
    sp_vm_own(vm, &w->owned, &fswatch_ops);
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, w);
    lua_setfield(L, -2, "_w");
    lua_pushcfunction(L, fw_cancel);
    lua_setfield(L, -2, "cancel");
    return 1;
}

/* ---------------------------------------------------------------- fs.json_list
 * A JSON document whose bulk is one array (a SandboxList of 100,000 objects: 40 MB), handed to
 * Lua one element at a time: the file's bytes stay in C memory (freed on close), the whole
 * document is validated first, and each element is a small string to decode and drop, instead
 * of a Lua string of the whole file plus a decoded table of everything (which cost 170 MB of
 * Lua heap that the allocator then kept). */

#define JSON_LIST_MT "sp.fs.json_list"

typedef struct json_list {
    char *p;       /* the file's bytes (NULL once closed) */
    size_t len;
    size_t cur;    /* offset of the next element */
    uint32_t seq;  /* elements handed out */
    bool has_cur;
    char shape;    /* 'a' array document, 'o' object, '?' other */
    char items;    /* 'a' field is an array, '-' absent, '?' other (or not an object) */
} json_list_t;

static void jl_free(json_list_t *jl)
{
    free(jl->p);
    jl->p = NULL;
    jl->has_cur = false;
}

/* fs.json_list(path, field) -> reader | nil, err. The document is an array, or an object whose
 * `field` holds the array. err: "ENOENT: ...", "invalid JSON: ...". */
static int f_json_list(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    const char *field = luaL_optstring(L, 2, "items");
    sp_buf_t b = {0};
    if (read_whole_file(L, path, &b))
        return 2;
    const char *start = b.p ? b.p : "", *end = start + b.len;
    const char *doc = sp_json_ws(start, end);
    const char *after = sp_json_skip(doc, end);
    if (!after || sp_json_ws(after, end) != end) {
        sp_buf_free(&b);
        lua_pushnil(L);
        lua_pushstring(L, "invalid JSON: not one well-formed JSON document");
        return 2;
    }
    json_list_t *jl = lua_newuserdata(L, sizeof *jl);
    memset(jl, 0, sizeof *jl);
    luaL_getmetatable(L, JSON_LIST_MT);
    lua_setmetatable(L, -2);
    jl->p = b.p; /* owned by the reader from here on */
    jl->len = b.len;
    jl->shape = *doc == '[' ? 'a' : *doc == '{' ? 'o' : '?';
    const char *arr = NULL;
    jl->items = '?';
    if (jl->shape == 'a') {
        arr = doc;
        jl->items = 'a';
    } else if (jl->shape == 'o') {
        const char *v = sp_json_get(doc, end, field);
        if (!v)
            jl->items = '-';
        else if (*v == '[') {
            arr = v;
            jl->items = 'a';
        } else if (*v == '{' && *sp_json_ws(v + 1, end) == '}') {
            jl->items = 'a'; /* {}: how cjson encodes an empty Lua table, i.e. no items */
        }
    }
    const char *first = arr ? sp_json_array_first(arr, end) : NULL;
    if (first) {
        jl->cur = (size_t)(first - start);
        jl->has_cur = true;
    }
    return 1;
}

static json_list_t *jl_check(lua_State *L)
{
    return luaL_checkudata(L, 1, JSON_LIST_MT);
}

/* reader:next() -> the next element's JSON text, or nil at the end */
static int jl_next(lua_State *L)
{
    sp_vm_check_budget(L);
    json_list_t *jl = jl_check(L);
    if (!jl->p || !jl->has_cur)
        return 0;
    const char *end = jl->p + jl->len;
    const char *it = jl->p + jl->cur;
    const char *it_end = sp_json_skip(it, end); /* validated: never NULL */
    if (!it_end) {
        jl->has_cur = false;
        return 0;
    }
    /* LuaJIT hashes a long string by a few 4-byte windows (start, end, middle, quarter) and
     * its length: the objects of one list (same shape, names of the same length) hash alike,
     * and interning each one walked a chain of all the others still alive, quadratic (28 s of
     * CPU for 100,000 sandboxes instead of 3). Four bytes of JSON whitespace before and after,
     * picked by the element's number, spread them over 65,536 hashes; the JSON is the same. */
    static const char ws4[4] = {' ', '\t', '\n', '\r'};
    size_t n = (size_t)(it_end - it);
    sp_buf_t *b = &sp_vm_of(L)->scratch;
    b->len = 0;
    uint32_t k = jl->seq++;
    for (int i = 0; i < 4; i++)
        sp_buf_addc(b, ws4[(k >> (2 * i)) & 3]);
    sp_buf_add(b, it, n);
    for (int i = 4; i < 8; i++)
        sp_buf_addc(b, ws4[(k >> (2 * i)) & 3]);
    lua_pushlstring(L, b->p, b->len);
    const char *nx = sp_json_ws(it_end, end);
    if (nx < end && *nx == ',') {
        jl->cur = (size_t)(sp_json_ws(nx + 1, end) - jl->p);
    } else {
        jl->has_cur = false;
    }
    return 1;
}

/* reader:shape() -> "array" | "object" | "other" (the document's top level) */
static int jl_shape(lua_State *L)
{
    json_list_t *jl = jl_check(L);
    lua_pushstring(L, jl->shape == 'a' ? "array" : jl->shape == 'o' ? "object" : "other");
    return 1;
}

/* reader:items() -> "array" | "absent" | "other" (the field's value, or the document itself) */
static int jl_items(lua_State *L)
{
    json_list_t *jl = jl_check(L);
    lua_pushstring(L, jl->items == 'a' ? "array" : jl->items == '-' ? "absent" : "other");
    return 1;
}

/* reader:string(key) -> a top-level string field of an object document, or nil */
static int jl_string(lua_State *L)
{
    json_list_t *jl = jl_check(L);
    const char *key = luaL_checkstring(L, 2);
    if (!jl->p || jl->shape != 'o')
        return 0;
    const char *end = jl->p + jl->len;
    const char *v = sp_json_get(jl->p, end, key);
    if (!v || *v != '"')
        return 0;
    sp_buf_t b = {0};
    const char *vend = sp_json_skip(v, end);
    if (!vend || sp_json_string(v, vend, &b) != 0) {
        sp_buf_free(&b);
        return 0;
    }
    lua_pushlstring(L, b.p ? b.p : "", b.len);
    sp_buf_free(&b);
    return 1;
}

/* reader:close(): frees the file's bytes now (the collector does it otherwise) */
static int jl_close(lua_State *L)
{
    jl_free(jl_check(L));
    return 0;
}

int luaopen_sp_fs(lua_State *L)
{
    static const luaL_Reg methods[] = {{"next", jl_next},     {"shape", jl_shape},
                                       {"items", jl_items},   {"string", jl_string},
                                       {"close", jl_close},   {NULL, NULL}};
    if (luaL_newmetatable(L, JSON_LIST_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, jl_close);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"read", f_read},   {"stat", f_stat}, {"watch", f_watch},
                                   {"json_list", f_json_list}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
