/*
 * lua_config.h: the config file (lua_config.c).
 */
#ifndef SP_LUA_CONFIG_H
#define SP_LUA_CONFIG_H

#include "base/config.h"

/*
 * Loads `path` (a Lua chunk returning a table) and applies every top-level scalar key as a
 * knob (`trusted_proxies` may be a list of CIDR strings; `shared_dicts` = { name = size }).
 * Other tables are script sections and ignored here. Returns 0 or -1 with err filled.
 */
int sp_config_load_file(sp_config_t *c, const char *path, char err[256]);

#endif
