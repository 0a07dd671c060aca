/*
 * lua_timer.c: the sp.timer module: timer.after(seconds, fn, ...), timer.every(seconds, fn, ...)
 * and timer.sleep(seconds). Callbacks run in their own task (so they may sleep or wait), with
 * the protected-call policy; the number of pending timers per worker is capped (max_timers).
 */
#include "lua/lua_vm.h"
#include "base/config.h"
#include "http/worker.h"

#include <stdlib.h>

typedef struct ltimer {
    sp_owned_t owned; /* first: the state's list holds timers by this */
    uv_timer_t h;
    sp_vm_t *vm;
    int fn_ref;      /* table {fn, args...} in the registry */
    int nargs;
    bool repeat;
    bool closed;
    sp_task_t *sleeper;
} ltimer_t;

static void on_closed(uv_handle_t *h) { free(h->data); }

static void timer_close(ltimer_t *t)
{
    if (t->closed)
        return;
    t->closed = true;
    sp_vm_t *vm = t->vm;
    sp_vm_disown(&t->owned);
    vm->ntimers--;
    if (t->fn_ref != LUA_NOREF)
        luaL_unref(vm->L, LUA_REGISTRYINDEX, t->fn_ref);
    t->fn_ref = LUA_NOREF;
    uv_timer_stop(&t->h);
    uv_close((uv_handle_t *)&t->h, on_closed);
}

/* A reload ends timer.after / timer.every timers and keeps sleeps (their tasks finish). */
static void timer_retire(sp_owned_t *o)
{
    ltimer_t *t = (ltimer_t *)o;
    if (!t->sleeper)
        timer_close(t);
}

static void timer_owned_close(sp_owned_t *o) { timer_close((ltimer_t *)o); }

static const sp_owned_ops_t timer_ops = {"timer", timer_retire, timer_owned_close};

static ltimer_t *timer_new(lua_State *L, sp_vm_t *vm)
{
    if (!vm->w)
        luaL_error(L, "timers are not available here (no event loop)");
    if (vm->ntimers >= sp_cfg.max_timers)
        return NULL;
    ltimer_t *t = sp_calloc(1, sizeof *t);
    t->vm = vm;
    t->fn_ref = LUA_NOREF;
    uv_timer_init(&vm->w->loop, &t->h);
    t->h.data = t;
    sp_vm_own(vm, &t->owned, &timer_ops);
    vm->ntimers++;
    return t;
}

static void on_timer(uv_timer_t *h)
{
    ltimer_t *t = h->data;
    sp_vm_t *vm = t->vm;
    if (t->sleeper) {
        sp_task_t *task = t->sleeper;
        t->sleeper = NULL;
        timer_close(t);
        sp_vm_resume(task, 0);
        return;
    }
    lua_State *L = vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
    int n = t->nargs;
    for (int i = 1; i <= n + 1; i++)
        lua_rawgeti(L, -i, i);
    /* stack: tbl, fn, args... */
    lua_remove(L, -(n + 2));
    if (!t->repeat)
        timer_close(t);
    sp_vm_spawn(vm, n);
}

static uint64_t to_ms(lua_State *L, int idx)
{
    double s = luaL_checknumber(L, idx);
    if (s < 0 || s > 1e9)
        luaL_argerror(L, idx, "seconds out of range");
    return (uint64_t)(s * 1000.0 + 0.5);
}

static int handle_cancel(lua_State *L);

static int schedule(lua_State *L, bool repeat)
{
    sp_vm_t *vm = sp_vm_of(L);
    uint64_t ms = to_ms(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (repeat && ms == 0)
        return luaL_argerror(L, 1, "interval must be positive");
    ltimer_t *t = timer_new(L, vm);
    if (!t) {
        lua_pushnil(L);
        lua_pushstring(L, "ETIMERS: too many pending timers (max_timers)");
        return 2;
    }
    int top = lua_gettop(L);
    t->nargs = top - 2;
    lua_createtable(L, top - 1, 0);
    for (int i = 2; i <= top; i++) {
        lua_pushvalue(L, i);
        lua_rawseti(L, -2, i - 1);
    }
    t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->repeat = repeat;
    uv_timer_start(&t->h, on_timer, ms, repeat ? ms : 0);
    /* the handle: a table {cancel = fn} holding a light pointer checked against the list */
    lua_createtable(L, 0, 2);
    lua_pushlightuserdata(L, t);
    lua_setfield(L, -2, "_t");
    lua_pushcfunction(L, handle_cancel);
    lua_setfield(L, -2, "cancel");
    return 1;
}

static int handle_cancel(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "_t");
    ltimer_t *t = lua_touserdata(L, -1);
    sp_vm_t *vm = sp_vm_of(L);
    SP_VM_EACH_OWNED(vm, o)
        if (o == &t->owned) {
            timer_close(t);
            lua_pushboolean(L, 1);
            return 1;
        }
    lua_pushboolean(L, 0);
    return 1;
}

static int l_after(lua_State *L) { return schedule(L, false); }
static int l_every(lua_State *L) { return schedule(L, true); }

static int l_sleep(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *task = sp_vm_task_of(vm, L);
    if (!task)
        return luaL_error(L, "sleep: only possible in a hook's or timer's own coroutine");
    uint64_t ms = to_ms(L, 1);
    ltimer_t *t = timer_new(L, vm);
    if (!t)
        return luaL_error(L, "ETIMERS: too many pending timers (max_timers)");
    t->sleeper = task;
    uv_timer_start(&t->h, on_timer, ms, 0);
    return lua_yield(L, 0);
}

int luaopen_sp_timer(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"after", l_after}, {"every", l_every}, {"sleep", l_sleep}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
