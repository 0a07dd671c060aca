/*
 * lua_config.c: the config file, a Lua chunk returning a table (sp_config_load_file in
 * lua_config.h). Its scalar keys are knobs set through the knob table, `trusted_proxies` may be
 * a list, `shared_dicts` declares the shared dicts; other tables are script sections, read by
 * the scripts through sp.config. It runs in a throw-away Lua state before any worker starts.
 */
#include "base/buf.h"
#include "base/config.h"
#include "lua/lua_config.h"

#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

/* shared_dicts = { name = size, ... } */
static int load_dicts(sp_config_t *c, lua_State *L, const char *path, char err[256])
{
    /* stack: ..., table */
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        const char *val = lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL;
        size_t size = 0;
        if (!name || !val || sp_config_parse_size(val, &size) || size < 4096) {
            snprintf(err, 256, "config %s: shared_dicts: each entry must be name = size (at least "
                     "4k, e.g. \"10m\")", path);
            lua_pop(L, 2);
            return -1;
        }
        if (c->ndicts == (int)SP_ARRAY_LEN(c->dict_names)) {
            snprintf(err, 256, "config %s: shared_dicts: too many dicts", path);
            lua_pop(L, 2);
            return -1;
        }
        c->dict_names[c->ndicts] = sp_strdup(name);
        c->dict_sizes[c->ndicts++] = size;
        lua_pop(L, 1);
    }
    return 0;
}

int sp_config_load_file(sp_config_t *c, const char *path, char err[256])
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    int rc = -1;
    if (luaL_loadfile(L, path) || lua_pcall(L, 0, 1, 0)) {
        snprintf(err, 256, "config %s: %s", path, lua_tostring(L, -1));
        goto out;
    }
    if (!lua_istable(L, -1)) {
        snprintf(err, 256, "config %s: must return a table", path);
        goto out;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        /* stack: config, key, value */
        if (lua_type(L, -2) != LUA_TSTRING) {
            snprintf(err, 256, "config %s: keys must be strings", path);
            goto out;
        }
        const char *name = lua_tostring(L, -2);
        if (lua_istable(L, -1) && !strcmp(name, "trusted_proxies")) {
            /* a list of CIDR strings: joined into the knob's comma-separated text */
            sp_buf_t b = {0};
            for (int i = 1;; i++) {
                lua_rawgeti(L, -1, i);
                if (lua_isnil(L, -1)) {
                    lua_pop(L, 1);
                    break;
                }
                if (lua_type(L, -1) != LUA_TSTRING) {
                    snprintf(err, 256, "config %s: trusted_proxies must be a list of CIDR "
                             "strings", path);
                    sp_buf_free(&b);
                    goto out;
                }
                if (b.len)
                    sp_buf_addc(&b, ',');
                sp_buf_adds(&b, lua_tostring(L, -1));
                lua_pop(L, 1);
            }
            sp_buf_addc(&b, '\0');
            int bad = sp_config_set(c, name, b.p, err);
            sp_buf_free(&b);
            if (bad)
                goto out;
            lua_pop(L, 1);
            continue;
        }
        if (lua_istable(L, -1)) { /* a script's section, or the shared dicts */
            if (!strcmp(name, "shared_dicts") && load_dicts(c, L, path, err))
                goto out;
            lua_pop(L, 1);
            continue;
        }
        if (!sp_config_has(name)) {
            snprintf(err, 256, "config %s: unknown setting '%s' (script sections are tables)",
                     path, name);
            goto out;
        }
        char tmp[64];
        const char *v;
        if (lua_isboolean(L, -1))
            v = lua_toboolean(L, -1) ? "true" : "false";
        else if (lua_type(L, -1) == LUA_TNUMBER) {
            snprintf(tmp, sizeof tmp, "%.17g", lua_tonumber(L, -1));
            v = tmp;
        } else if (lua_type(L, -1) == LUA_TSTRING)
            v = lua_tostring(L, -1);
        else {
            snprintf(err, 256, "config %s: '%s' has an unsupported type", path, name);
            goto out;
        }
        if (sp_config_set(c, name, v, err))
            goto out; /* the message names the knob */
        lua_pop(L, 1);
    }
    rc = 0;
out:
    lua_close(L);
    return rc;
}

