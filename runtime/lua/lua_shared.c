/*
 * lua_shared.c: the sp.shared module over shdict.c. shared.dict(name) returns a dict object
 * with get, set, add, replace, incr, delete, expire, flush_all and stats. Runtime failures
 * return nil, "ENAME: message"; misuse raises.
 */
#include "lua/lua_vm.h"
#include "state/shdict.h"

#include <errno.h>

#define DICT_MT "sp.shared.dict"

/* Every method is a closure over the dict metatable (upvalue 1): comparing it with the
 * argument's metatable is the check, with no registry lookup by name per call. */
static sp_shdict_t *check_dict(lua_State *L)
{
    sp_vm_check_budget(L);
    sp_shdict_t **d = lua_touserdata(L, 1);
    if (d && lua_getmetatable(L, 1)) {
        int same = lua_rawequal(L, -1, lua_upvalueindex(1));
        lua_pop(L, 1);
        if (same)
            return *d;
    }
    luaL_typerror(L, 1, DICT_MT);
    return NULL;
}

static int push_err(lua_State *L, int rc)
{
    lua_pushnil(L);
    switch (rc) {
    case -EEXIST: lua_pushstring(L, "EEXIST: key exists"); break;
    case -ENOENT: lua_pushstring(L, "ENOENT: key not found"); break;
    case -EINVAL: lua_pushstring(L, "EINVAL: value is not a number"); break;
    case -E2BIG: lua_pushstring(L, "E2BIG: value larger than the dict"); break;
    default: lua_pushstring(L, "EIO: shared dict error"); break;
    }
    return 2;
}

static void to_val(lua_State *L, int idx, sp_shval_t *v)
{
    memset(v, 0, sizeof *v);
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
    case LUA_TNONE: v->type = SP_SH_NIL; break;
    case LUA_TBOOLEAN:
        v->type = SP_SH_BOOL;
        v->num = lua_toboolean(L, idx);
        break;
    case LUA_TNUMBER:
        v->type = SP_SH_NUMBER;
        v->num = lua_tonumber(L, idx);
        break;
    case LUA_TSTRING:
        v->type = SP_SH_STRING;
        v->str = lua_tolstring(L, idx, &v->len);
        break;
    default: luaL_argerror(L, idx, "value must be nil, a boolean, a number or a string");
    }
}

static int d_get(lua_State *L)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    sp_vm_t *vm = sp_vm_of(L);
    sp_shval_t v;
    double ttl;
    if (sp_shdict_get(d, k, kl, &vm->scratch, &v, &ttl) != 0) {
        lua_pushnil(L);
        return 1;
    }
    switch (v.type) {
    case SP_SH_BOOL: lua_pushboolean(L, v.num != 0); break;
    case SP_SH_NUMBER: lua_pushnumber(L, v.num); break;
    case SP_SH_STRING: lua_pushlstring(L, v.str, v.len); break;
    default: lua_pushnil(L); break;
    }
    lua_pushnumber(L, ttl);
    return 2;
}

static int store(lua_State *L, int mode)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    sp_shval_t v;
    to_val(L, 3, &v);
    double ttl = luaL_optnumber(L, 4, 0);
    int rc = sp_shdict_set(d, k, kl, &v, ttl, mode);
    if (rc)
        return push_err(L, rc);
    lua_pushboolean(L, 1);
    return 1;
}

static int d_set(lua_State *L) { return store(L, SP_SH_SET); }
static int d_add(lua_State *L) { return store(L, SP_SH_ADD); }
static int d_replace(lua_State *L) { return store(L, SP_SH_REPLACE); }

/* incr(key, delta [, init [, init_ttl]]) -> new value | nil, err */
static int d_incr(lua_State *L)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    double delta = luaL_checknumber(L, 3);
    bool has_init = !lua_isnoneornil(L, 4);
    double init = has_init ? luaL_checknumber(L, 4) : 0;
    double ttl = luaL_optnumber(L, 5, 0);
    double out = 0;
    int rc = sp_shdict_incr(d, k, kl, delta, has_init, init, ttl, &out);
    if (rc)
        return push_err(L, rc);
    lua_pushnumber(L, out);
    return 1;
}

/* rate(key, rate, burst) -> allowed, remaining, retry_after, reset (GCRA; atomic) */
static int d_rate(lua_State *L)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    double rate = luaL_checknumber(L, 3);
    double burst = luaL_checknumber(L, 4);
    if (!(rate > 0) || !(burst >= 1))
        return luaL_error(L, "rate: rate must be > 0 and burst >= 1");
    double remaining, retry, reset;
    int ok = sp_shdict_rate(d, k, kl, rate, burst, &remaining, &retry, &reset);
    lua_pushboolean(L, ok);
    lua_pushnumber(L, remaining);
    lua_pushnumber(L, retry);
    lua_pushnumber(L, reset);
    return 4;
}

static int d_delete(lua_State *L)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    lua_pushboolean(L, sp_shdict_delete(d, k, kl) == 0);
    return 1;
}

static int d_expire(lua_State *L)
{
    sp_shdict_t *d = check_dict(L);
    size_t kl;
    const char *k = luaL_checklstring(L, 2, &kl);
    int rc = sp_shdict_expire(d, k, kl, luaL_checknumber(L, 3));
    if (rc)
        return push_err(L, rc);
    lua_pushboolean(L, 1);
    return 1;
}

static int d_flush(lua_State *L)
{
    sp_shdict_flush(check_dict(L));
    return 0;
}

static int d_stats(lua_State *L)
{
    sp_shdict_stats_t st;
    sp_shdict_stats(check_dict(L), &st);
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (double)st.capacity);
    lua_setfield(L, -2, "capacity");
    lua_pushnumber(L, (double)st.used);
    lua_setfield(L, -2, "used");
    lua_pushnumber(L, (double)st.count);
    lua_setfield(L, -2, "count");
    lua_pushnumber(L, (double)st.evictions);
    lua_setfield(L, -2, "evictions");
    return 1;
}

static int d_name(lua_State *L)
{
    lua_pushstring(L, sp_shdict_name(check_dict(L)));
    return 1;
}

static void push_dict(lua_State *L, sp_shdict_t *d)
{
    sp_shdict_t **u = lua_newuserdata(L, sizeof *u);
    *u = d;
    luaL_getmetatable(L, DICT_MT);
    lua_setmetatable(L, -2);
}

/* shared.dict(name) -> dict | nil, "ENOENT: ..." */
static int s_dict(lua_State *L)
{
    size_t n;
    const char *name = luaL_checklstring(L, 1, &n);
    sp_shdict_t *d = sp_shdict_find(name, n);
    if (!d) {
        lua_pushnil(L);
        lua_pushfstring(L, "ENOENT: no shared dict '%s' (declare it in shared_dicts)", name);
        return 2;
    }
    push_dict(L, d);
    return 1;
}

/* shared.dicts() -> array of names */
static int s_dicts(lua_State *L)
{
    lua_newtable(L);
    int i = 1;
    for (sp_shdict_t *d = sp_shdict_next(NULL); d; d = sp_shdict_next(d)) {
        lua_pushstring(L, sp_shdict_name(d));
        lua_rawseti(L, -2, i++);
    }
    return 1;
}

int luaopen_sp_shared(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"get", d_get},         {"set", d_set},       {"add", d_add},
        {"replace", d_replace}, {"incr", d_incr},     {"delete", d_delete},
        {"expire", d_expire},   {"flush_all", d_flush}, {"stats", d_stats},
        {"name", d_name},       {"rate", d_rate},     {NULL, NULL}};
    if (luaL_newmetatable(L, DICT_MT)) {
        lua_newtable(L);
        for (const luaL_Reg *m = methods; m->name; m++) {
            lua_pushvalue(L, -2); /* the metatable, upvalue 1 of the method (check_dict) */
            lua_pushcclosure(L, m->func, 1);
            lua_setfield(L, -2, m->name);
        }
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"dict", s_dict}, {"dicts", s_dicts}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
