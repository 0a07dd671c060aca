/*
 * lua_yaml.c: the sp.yaml module, a YAML reader over libyaml's event parser (kubeconfigs and
 * manifests). It owns the mapping from YAML nodes to Lua values; it writes no YAML.
 *
 *   yaml.decode(text) -> value | nil, "EINVAL: line N: message"
 *
 * One document: an empty stream is null, a second document that is not empty is an error.
 * Mappings become tables keyed by the key's text (scalar keys only; a duplicate key is an
 * error), sequences become arrays. Plain scalars resolve by the YAML 1.2 core schema (null,
 * true/false, decimal, 0x and 0o integers, floats, .inf, .nan; "yes" stays a string); quoted
 * and block scalars and `!!str` are strings. YAML null is cjson.null (a NULL light userdata),
 * so YAML and JSON input decode identically. Anchors and aliases are resolved (an alias to a
 * collection shares the anchored table), and `<<` merge keys copy the keys the mapping does not
 * set itself.
 */
#include "lua/lua_vm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#define YAML_MAX_DEPTH 200

typedef struct {
    yaml_parser_t parser;
    yaml_event_t ev;
    bool parser_live, ev_live;
    int anchors;           /* stack index of the anchor table */
    int depth;
    const char *text;      /* the input, for locating errors at its end */
    size_t len;
    size_t err_line;
    char err[240];
} ydec_t;

static void ydec_release(ydec_t *d)
{
    if (d->ev_live)
        yaml_event_delete(&d->ev);
    if (d->parser_live)
        yaml_parser_delete(&d->parser);
    d->ev_live = d->parser_live = false;
}

/* __gc: a Lua error (out of memory) inside decode leaves the parser to the collector */
static int ydec_gc(lua_State *L)
{
    ydec_release(lua_touserdata(L, 1));
    return 0;
}

static bool fail_at(ydec_t *d, size_t line0, const char *msg)
{
    d->err_line = line0 + 1;
    snprintf(d->err, sizeof d->err, "%s", msg);
    return false;
}

/* Advances to the next event (the previous one is released). */
static bool next_event(ydec_t *d)
{
    if (d->ev_live)
        yaml_event_delete(&d->ev);
    d->ev_live = false;
    if (!yaml_parser_parse(&d->parser, &d->ev)) {
        const yaml_parser_t *p = &d->parser;
        d->err_line = p->problem_mark.line + 1;
        if (p->problem_mark.index >= d->len) { /* at the end: blame the last line with text */
            size_t i = d->len, line = 1;
            while (i > 0 && strchr(" \t\r\n", d->text[i - 1]))
                i--;
            for (size_t j = 0; j < i; j++)
                line += d->text[j] == '\n';
            d->err_line = line;
        }
        if (p->context)
            snprintf(d->err, sizeof d->err, "%s (%s at line %zu)",
                     p->problem ? p->problem : "malformed YAML", p->context,
                     p->context_mark.line + 1);
        else
            snprintf(d->err, sizeof d->err, "%s", p->problem ? p->problem : "malformed YAML");
        return false;
    }
    d->ev_live = true;
    return true;
}

static bool all_in(const char *s, size_t n, const char *set)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr(set, s[i]))
            return false;
    return true;
}

static bool is_one_of(const char *s, const char *const *words)
{
    for (; *words; words++)
        if (strcmp(s, *words) == 0)
            return true;
    return false;
}

/* A decimal float in the core schema: [-+]? digits with at most one '.', [eE][-+]?digits. */
static bool is_float(const char *s)
{
    if (*s == '-' || *s == '+')
        s++;
    int digits = 0, dots = 0;
    for (; *s && *s != 'e' && *s != 'E'; s++) {
        if (*s == '.')
            dots++;
        else if (*s >= '0' && *s <= '9')
            digits++;
        else
            return false;
    }
    if (!digits || dots > 1)
        return false;
    if (!*s)
        return true;
    s++;
    if (*s == '-' || *s == '+')
        s++;
    return all_in(s, strlen(s), "0123456789");
}

/* Pushes a plain scalar resolved by the YAML 1.2 core schema. */
static void push_plain(lua_State *L, const char *s, size_t n)
{
    static const char *const nulls[] = {"", "~", "null", "Null", "NULL", NULL};
    static const char *const trues[] = {"true", "True", "TRUE", NULL};
    static const char *const falses[] = {"false", "False", "FALSE", NULL};
    static const char *const infs[] = {".inf", ".Inf", ".INF", NULL};
    static const char *const nans[] = {".nan", ".NaN", ".NAN", NULL};
    if (strlen(s) != n) { /* an embedded NUL: not a number or keyword */
        lua_pushlstring(L, s, n);
        return;
    }
    const char *u = (*s == '-' || *s == '+') ? s + 1 : s;
    if (is_one_of(s, nulls))
        lua_pushlightuserdata(L, NULL);
    else if (is_one_of(s, trues))
        lua_pushboolean(L, 1);
    else if (is_one_of(s, falses))
        lua_pushboolean(L, 0);
    else if (all_in(u, strlen(u), "0123456789") || is_float(s))
        lua_pushnumber(L, strtod(s, NULL));
    else if (n > 2 && s[0] == '0' && s[1] == 'x' && all_in(s + 2, n - 2, "0123456789abcdefABCDEF"))
        lua_pushnumber(L, (lua_Number)strtoull(s + 2, NULL, 16));
    else if (n > 2 && s[0] == '0' && s[1] == 'o' && all_in(s + 2, n - 2, "01234567"))
        lua_pushnumber(L, (lua_Number)strtoull(s + 2, NULL, 8));
    else if (is_one_of(u, infs))
        lua_pushnumber(L, *s == '-' ? -HUGE_VAL : HUGE_VAL);
    else if (is_one_of(s, nans))
        lua_pushnumber(L, NAN);
    else
        lua_pushlstring(L, s, n);
}

static void remember_anchor(lua_State *L, ydec_t *d, const yaml_char_t *anchor)
{
    if (!anchor)
        return;
    lua_pushstring(L, (const char *)anchor);
    lua_pushvalue(L, -2);
    lua_rawset(L, d->anchors);
}

static bool parse_node(lua_State *L, ydec_t *d);

/* Copies the keys of merge source `src` (stack top) that `map` does not have. */
static bool merge_into(lua_State *L, ydec_t *d, int map, size_t line0)
{
    if (!lua_istable(L, -1))
        return fail_at(d, line0, "a '<<' merge value must be a mapping or a list of mappings");
    int src = lua_gettop(L);
    if (lua_objlen(L, src) > 0) { /* a list of mappings: the earlier ones win */
        for (size_t i = 1; i <= lua_objlen(L, src); i++) {
            lua_rawgeti(L, src, (int)i);
            if (!merge_into(L, d, map, line0))
                return false;
            lua_pop(L, 1);
        }
        return true;
    }
    lua_pushnil(L);
    while (lua_next(L, src)) {
        lua_pushvalue(L, -2);
        lua_rawget(L, map);
        bool absent = lua_isnil(L, -1);
        lua_pop(L, 1);
        if (absent) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, map);
        } else {
            lua_pop(L, 1);
        }
    }
    return true;
}

static bool parse_mapping(lua_State *L, ydec_t *d)
{
    const yaml_char_t *anchor = d->ev.data.mapping_start.anchor;
    char *name = anchor ? strdup((const char *)anchor) : NULL;
    lua_newtable(L);
    int map = lua_gettop(L);
    lua_newtable(L); /* merge sources, applied at the end (explicit keys win wherever they are) */
    int merges = map + 1, nmerges = 0;
    bool ok = true;
    for (;;) {
        if (!(ok = next_event(d)))
            break;
        if (d->ev.type == YAML_MAPPING_END_EVENT)
            break;
        size_t line0 = d->ev.start_mark.line;
        bool merge = false;
        if (d->ev.type == YAML_SCALAR_EVENT) {
            merge = d->ev.data.scalar.plain_implicit && d->ev.data.scalar.length == 2 &&
                    memcmp(d->ev.data.scalar.value, "<<", 2) == 0;
            lua_pushlstring(L, (const char *)d->ev.data.scalar.value, d->ev.data.scalar.length);
        } else if (d->ev.type == YAML_ALIAS_EVENT) {
            if (!(ok = parse_node(L, d)))
                break;
            if (lua_type(L, -1) != LUA_TSTRING) {
                ok = fail_at(d, line0, "only scalar mapping keys are supported");
                break;
            }
        } else {
            ok = fail_at(d, line0, "only scalar mapping keys are supported");
            break;
        }
        if (!merge) {
            lua_pushvalue(L, -1);
            lua_rawget(L, map);
            bool dup = !lua_isnil(L, -1);
            lua_pop(L, 1);
            if (dup) {
                char msg[200];
                snprintf(msg, sizeof msg, "duplicate key '%.120s'", lua_tostring(L, -1));
                ok = fail_at(d, line0, msg);
                break;
            }
        }
        if (!(ok = next_event(d)) || !(ok = parse_node(L, d)))
            break;
        if (merge) {
            lua_rawseti(L, merges, ++nmerges);
            lua_pop(L, 1); /* the "<<" key */
            lua_pushinteger(L, (lua_Integer)line0);
            lua_rawseti(L, merges, ++nmerges);
        } else {
            lua_rawset(L, map);
        }
    }
    for (int i = 1; ok && i < nmerges; i += 2) {
        lua_rawgeti(L, merges, i + 1);
        size_t line0 = (size_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
        lua_rawgeti(L, merges, i);
        ok = merge_into(L, d, map, line0);
        lua_settop(L, merges);
    }
    if (ok) {
        lua_settop(L, map);
        if (name) {
            lua_pushstring(L, name);
            lua_pushvalue(L, map);
            lua_rawset(L, d->anchors);
        }
    }
    free(name);
    return ok;
}

static bool parse_sequence(lua_State *L, ydec_t *d)
{
    const yaml_char_t *anchor = d->ev.data.sequence_start.anchor;
    char *name = anchor ? strdup((const char *)anchor) : NULL;
    lua_newtable(L);
    int seq = lua_gettop(L), n = 0;
    bool ok = true;
    for (;;) {
        if (!(ok = next_event(d)))
            break;
        if (d->ev.type == YAML_SEQUENCE_END_EVENT)
            break;
        if (!(ok = parse_node(L, d)))
            break;
        lua_rawseti(L, seq, ++n);
    }
    if (ok && name) {
        lua_pushstring(L, name);
        lua_pushvalue(L, seq);
        lua_rawset(L, d->anchors);
    }
    free(name);
    return ok;
}

/* Pushes the value of the node that starts with the current event. */
static bool parse_node(lua_State *L, ydec_t *d)
{
    yaml_event_t *ev = &d->ev;
    size_t line0 = ev->start_mark.line;
    if (d->depth >= YAML_MAX_DEPTH)
        return fail_at(d, line0, "nesting too deep");
    if (!lua_checkstack(L, 8))
        return fail_at(d, line0, "nesting too deep");
    switch (ev->type) {
    case YAML_SCALAR_EVENT: {
        const char *s = (const char *)ev->data.scalar.value;
        size_t n = ev->data.scalar.length;
        const char *tag = (const char *)ev->data.scalar.tag;
        bool as_string = !ev->data.scalar.plain_implicit ||
                         (tag && (strcmp(tag, YAML_STR_TAG) == 0 || strcmp(tag, "!") == 0));
        if (as_string)
            lua_pushlstring(L, s, n);
        else
            push_plain(L, s, n);
        remember_anchor(L, d, ev->data.scalar.anchor);
        return true;
    }
    case YAML_ALIAS_EVENT:
        lua_pushstring(L, (const char *)ev->data.alias.anchor);
        lua_rawget(L, d->anchors);
        if (lua_isnil(L, -1)) {
            char msg[160];
            snprintf(msg, sizeof msg, "undefined alias '*%.120s'",
                     (const char *)ev->data.alias.anchor);
            lua_pop(L, 1);
            return fail_at(d, line0, msg);
        }
        return true;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        d->depth++;
        bool ok = ev->type == YAML_SEQUENCE_START_EVENT ? parse_sequence(L, d)
                                                         : parse_mapping(L, d);
        d->depth--;
        return ok;
    }
    default:
        return fail_at(d, line0, "unexpected YAML event");
    }
}

static bool parse_stream(lua_State *L, ydec_t *d)
{
    if (!next_event(d)) /* STREAM-START */
        return false;
    if (!next_event(d))
        return false;
    if (d->ev.type == YAML_STREAM_END_EVENT) {
        lua_pushlightuserdata(L, NULL);
        return true;
    }
    /* DOCUMENT-START, the root node, DOCUMENT-END, then the end of the stream */
    if (!next_event(d) || !parse_node(L, d) || !next_event(d) || !next_event(d))
        return false;
    /* a further document may only be empty (a trailing '---' written by a tool) */
    while (d->ev.type == YAML_DOCUMENT_START_EVENT) {
        size_t line0 = d->ev.start_mark.line;
        if (!next_event(d))
            return false;
        if (d->ev.type != YAML_SCALAR_EVENT || d->ev.data.scalar.length != 0 ||
            !d->ev.data.scalar.plain_implicit)
            return fail_at(d, line0, "multiple documents are not supported");
        if (!next_event(d) || !next_event(d)) /* DOCUMENT-END, then what follows */
            return false;
    }
    return true;
}

/* yaml.decode(text) -> value | nil, "EINVAL: line N: message" */
static int y_decode(lua_State *L)
{
    size_t n;
    const char *text = luaL_checklstring(L, 1, &n);
    lua_settop(L, 1);
    ydec_t *d = lua_newuserdata(L, sizeof *d);
    memset(d, 0, sizeof *d);
    luaL_getmetatable(L, "sp.yaml.decoder");
    lua_setmetatable(L, -2);
    lua_newtable(L);
    d->anchors = lua_gettop(L);
    if (!yaml_parser_initialize(&d->parser))
        return luaL_error(L, "yaml: out of memory");
    d->parser_live = true;
    d->text = text;
    d->len = n;
    yaml_parser_set_input_string(&d->parser, (const unsigned char *)text, n);
    bool ok = parse_stream(L, d);
    ydec_release(d);
    if (ok)
        return 1;
    lua_pushnil(L);
    lua_pushfstring(L, "EINVAL: line %d: %s", (int)d->err_line, d->err);
    return 2;
}

int luaopen_sp_yaml(lua_State *L)
{
    static const luaL_Reg fns[] = {{"decode", y_decode}, {NULL, NULL}};
    if (luaL_newmetatable(L, "sp.yaml.decoder")) {
        lua_pushcfunction(L, ydec_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
