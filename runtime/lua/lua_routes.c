/*
 * lua_routes.c: the sp.routes module over the shared route table (routes.c):
 * set(key, route), get(key), delete(key), list(), range(prefix, after, limit), count(),
 * count_ready(), generation().
 * A route is a table {namespace, name, user, address, port, ready, reason, service, conflict,
 * mode, meta}; get and list return copies (with key, version and updated added).
 */
#include "lua/lua_vm.h"
#include "state/routes.h"

#include <stdlib.h>

static int r_set(lua_State *L)
{
    size_t klen;
    const char *key = luaL_checklstring(L, 1, &klen);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (klen == 0 || klen > 1024)
        return luaL_argerror(L, 1, "key must be 1 to 1024 bytes");
    sp_route_in_t in;
    memset(&in, 0, sizeof in);
    for (int f = 0; f < SP_RF_COUNT; f++) {
        lua_getfield(L, 2, sp_route_field_names[f]);
        if (!lua_isnil(L, -1)) {
            if (!lua_isstring(L, -1))
                return luaL_error(L, "route field '%s' must be a string", sp_route_field_names[f]);
            in.s[f] = lua_tolstring(L, -1, &in.n[f]);
            if (in.n[f] > 65535)
                return luaL_error(L, "route field '%s' is too long", sp_route_field_names[f]);
        }
        lua_pop(L, 1); /* the string stays alive: it is referenced by the table */
    }
    lua_getfield(L, 2, "port");
    in.port = (int)luaL_optinteger(L, -1, 0);
    lua_pop(L, 1);
    if (in.port < 0 || in.port > 65535)
        return luaL_error(L, "route port must be 0..65535");
    lua_getfield(L, 2, "ready");
    in.ready = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_pushboolean(L, sp_routes_set(key, klen, &in));
    return 1;
}

static void push_route(lua_State *L, const sp_route_t *r)
{
    lua_createtable(L, 0, SP_RF_COUNT + 5);
    lua_pushlstring(L, r->data, r->klen);
    lua_setfield(L, -2, "key");
    for (int f = 0; f < SP_RF_COUNT; f++) {
        if (r->len[f] == 0)
            continue;
        lua_pushlstring(L, r->data + r->off[f], r->len[f]);
        lua_setfield(L, -2, sp_route_field_names[f]);
    }
    lua_pushinteger(L, r->port);
    lua_setfield(L, -2, "port");
    lua_pushboolean(L, r->ready);
    lua_setfield(L, -2, "ready");
    lua_pushnumber(L, (double)r->version);
    lua_setfield(L, -2, "version");
    lua_pushnumber(L, r->updated);
    lua_setfield(L, -2, "updated");
}

/* get(key): the route as a table, or nil. The table of an unchanged route is handed out again
 * (a per-state cache, emptied when it outgrows twice the route count), so the hot path copies
 * nothing: a version check under the shard lock, then a table lookup. Route tables are shared
 * snapshots: read them, do not write to them. */
static int r_get(lua_State *L)
{
    sp_vm_check_budget(L);
    size_t klen;
    const char *key = luaL_checklstring(L, 1, &klen);
    lua_settop(L, 1);
    sp_vm_t *vm = sp_vm_of(L);
    uint64_t version = sp_routes_version_of(key, klen);
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->route_cache_ref); /* 2: the cache */
    if (version == 0) {
        lua_pushvalue(L, 1);
        lua_pushnil(L);
        lua_rawset(L, 2);
        lua_pushnil(L);
        return 1;
    }
    lua_pushvalue(L, 1);
    lua_rawget(L, 2); /* 3: the cached table or nil */
    if (lua_istable(L, 3)) {
        lua_getfield(L, 3, "version");
        if (lua_tonumber(L, -1) == (double)version) {
            lua_pop(L, 1);
            return 1;
        }
        lua_pop(L, 1);
    }
    lua_settop(L, 2);
    if (!sp_routes_get(key, klen, &vm->scratch)) {
        lua_pushvalue(L, 1);
        lua_pushnil(L);
        lua_rawset(L, 2);
        lua_pushnil(L);
        return 1;
    }
    push_route(L, (const sp_route_t *)vm->scratch.p); /* 3 */
    if (++vm->route_cache_n > 2 * sp_routes_count() + 1024) {
        /* entries of deleted routes nobody asked for again: start over */
        lua_newtable(L);
        lua_replace(L, 2);
        lua_pushvalue(L, 2);
        lua_rawseti(L, LUA_REGISTRYINDEX, vm->route_cache_ref);
        vm->route_cache_n = 1;
    }
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 3);
    lua_rawset(L, 2);
    return 1;
}

static int r_version(lua_State *L)
{
    size_t klen;
    const char *key = luaL_checklstring(L, 1, &klen);
    lua_pushnumber(L, (double)sp_routes_version_of(key, klen));
    return 1;
}

static int r_delete(lua_State *L)
{
    size_t klen;
    const char *key = luaL_checklstring(L, 1, &klen);
    lua_pushboolean(L, sp_routes_delete(key, klen));
    return 1;
}

static int cmp_routes(const void *a, const void *b)
{
    const sp_route_t *x = *(const sp_route_t *const *)a, *y = *(const sp_route_t *const *)b;
    return strcmp(x->data, y->data);
}

/* list() -> array of route copies sorted by key */
static int r_list(lua_State *L)
{
    sp_vm_check_budget(L);
    sp_buf_t snap = {0};
    size_t n = sp_routes_snapshot(&snap);
    const sp_route_t **v = sp_malloc((n ? n : 1) * sizeof *v);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const sp_route_t *r = (const sp_route_t *)(snap.p + off);
        v[i] = r;
        off += r->size;
    }
    qsort(v, n, sizeof *v, cmp_routes);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        push_route(L, v[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    free(v);
    sp_buf_free(&snap);
    return 1;
}

#define RANGE_MAX 10000

/* range(prefix, after, limit) -> array of route copies sorted by key (at most limit, 1 to
 * RANGE_MAX), whose keys start with prefix (nil or "": any) and sort after `after` (nil: from
 * the start); then `more` (another key of the range follows) and the index entries examined.
 * O(log n + limit): the ordered index is walked from the start of the range, never the table. */
static int r_range(lua_State *L)
{
    sp_vm_check_budget(L);
    size_t plen = 0, alen = 0;
    const char *prefix = luaL_optlstring(L, 1, "", &plen);
    const char *after = luaL_optlstring(L, 2, NULL, &alen);
    lua_Integer limit = luaL_checkinteger(L, 3);
    if (limit < 1 || limit > RANGE_MAX)
        return luaL_argerror(L, 3, "limit must be 1 to 10000");
    sp_vm_t *vm = sp_vm_of(L);
    sp_buf_t keys = {0};
    bool more = false;
    size_t work = 0;
    size_t n = sp_routes_range(prefix, plen, after, alen, (size_t)limit, &keys, &more, &work);
    lua_createtable(L, (int)n, 0);
    size_t off = 0;
    int i = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t kl;
        memcpy(&kl, keys.p + off, sizeof kl);
        off += sizeof kl;
        /* a route deleted since the index was read is left out */
        if (sp_routes_get(keys.p + off, kl, &vm->scratch)) {
            push_route(L, (const sp_route_t *)vm->scratch.p);
            lua_rawseti(L, -2, ++i);
        }
        off += kl;
    }
    sp_buf_free(&keys);
    lua_pushboolean(L, more);
    lua_pushnumber(L, (double)work);
    return 3;
}

static int r_count(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)sp_routes_count());
    return 1;
}

static int r_count_ready(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)sp_routes_count_ready());
    return 1;
}

static int r_generation(lua_State *L)
{
    lua_pushnumber(L, (double)sp_routes_generation());
    return 1;
}

/* index_set(name, key): the name index entry "namespace/name" -> route key. */
static int r_index_set(lua_State *L)
{
    size_t nlen, klen;
    const char *name = luaL_checklstring(L, 1, &nlen);
    const char *key = luaL_checklstring(L, 2, &klen);
    if (nlen == 0 || nlen > 1024 || klen == 0 || klen > 1024)
        return luaL_error(L, "index names and keys must be 1 to 1024 bytes");
    sp_routes_index_set(name, nlen, key, klen);
    return 0;
}

/* index_get(name) -> key or nil */
static int r_index_get(lua_State *L)
{
    size_t nlen;
    const char *name = luaL_checklstring(L, 1, &nlen);
    sp_buf_t key = {0};
    if (sp_routes_index_get(name, nlen, &key))
        lua_pushlstring(L, key.p ? key.p : "", key.len);
    else
        lua_pushnil(L);
    sp_buf_free(&key);
    return 1;
}

static int r_index_delete(lua_State *L)
{
    size_t nlen;
    const char *name = luaL_checklstring(L, 1, &nlen);
    lua_pushboolean(L, sp_routes_index_delete(name, nlen));
    return 1;
}

static int r_index_count(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)sp_routes_index_count());
    return 1;
}

/* lookup(namespace, name) -> the route that name stands for in namespace (a Sandbox by its
 * name, or a SandboxClaim's alias), as get() returns it; or nil. */
static int r_lookup(lua_State *L)
{
    size_t nslen, nlen;
    const char *ns = luaL_checklstring(L, 1, &nslen);
    const char *name = luaL_checklstring(L, 2, &nlen);
    sp_buf_t b = {0}, key = {0};
    sp_buf_add(&b, ns, nslen);
    sp_buf_addc(&b, '/');
    sp_buf_add(&b, name, nlen);
    bool found = sp_routes_index_get(b.p, b.len, &key);
    sp_buf_free(&b);
    if (!found) {
        sp_buf_free(&key);
        lua_pushnil(L);
        return 1;
    }
    lua_settop(L, 0);
    lua_pushlstring(L, key.p ? key.p : "", key.len);
    sp_buf_free(&key);
    return r_get(L);
}

int luaopen_sp_routes(lua_State *L)
{
    static const luaL_Reg fns[] = {{"set", r_set},         {"get", r_get},
                                   {"delete", r_delete},   {"list", r_list},
                                   {"range", r_range},
                                   {"count", r_count},     {"count_ready", r_count_ready},
                                   {"generation", r_generation}, {"version", r_version},
                                   {"index_set", r_index_set}, {"index_get", r_index_get},
                                   {"index_delete", r_index_delete},
                                   {"index_count", r_index_count}, {"lookup", r_lookup},
                                   {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
