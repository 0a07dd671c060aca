/*
 * lua_sync.c: coordination primitives for scripts.
 *   core.post(worker, channel, data)  queue a message to one worker (or -1: every worker); the
 *                                     target runs the handler core.on(channel, fn) registered
 *                                     in its state, as a task: fn(data, from_worker)
 *   core.on(channel, fn)              register (or replace, or with nil remove) a handler
 *   core.wait(token [, timeout])      suspend the current hook or timer task until
 *                                     core.signal(token, value) in the same worker: returns
 *                                     value (true if none); nil, "ETIMEDOUT" at the timeout;
 *                                     nil, "ECONNRESET" when the request's client went away
 *   core.signal(token [, value])      wake every task of this worker waiting on token; returns
 *                                     how many
 * A message crosses threads through a mutex-protected queue and the worker's async handle.
 */
#include "lua/lua_vm.h"
#include "base/log.h"
#include "http/worker.h"

#include <stdlib.h>

/* ---------------------------------------------------------------- messages */

typedef struct msg {
    struct msg *next;
    int from;
    size_t clen, dlen;
    char data[]; /* channel \0 data */
} msg_t;

typedef struct inbox {
    uv_mutex_t mu;
    msg_t *head, *tail;
    size_t count;
} inbox_t;

#define MAX_QUEUED 100000 /* messages waiting for one worker; more are dropped (logged) */

static inbox_t inboxes[256];
static uv_once_t inbox_once = UV_ONCE_INIT;

static void inbox_init(void)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(inboxes); i++)
        uv_mutex_init(&inboxes[i].mu);
}

static bool deliver(int to, int from, const char *ch, size_t cl, const char *d, size_t dl)
{
    sp_worker_t *w = sp_worker_get(to);
    if (!w || to >= (int)SP_ARRAY_LEN(inboxes))
        return false;
    inbox_t *ib = &inboxes[to];
    msg_t *m = sp_malloc(sizeof *m + cl + 1 + dl);
    m->next = NULL;
    m->from = from;
    m->clen = cl;
    m->dlen = dl;
    memcpy(m->data, ch, cl);
    m->data[cl] = '\0';
    memcpy(m->data + cl + 1, d, dl);
    bool ok = true;
    uv_mutex_lock(&ib->mu);
    if (ib->count >= MAX_QUEUED) {
        ok = false;
        free(m);
    } else {
        if (ib->tail)
            ib->tail->next = m;
        else
            ib->head = m;
        ib->tail = m;
        ib->count++;
    }
    uv_mutex_unlock(&ib->mu);
    if (ok)
        uv_async_send(&w->async);
    return ok;
}

static char handlers_key;

/* Runs the queued messages of worker w (called from its async callback). */
void sp_sync_drain_inbox(sp_worker_t *w)
{
    uv_once(&inbox_once, inbox_init);
    inbox_t *ib = &inboxes[w->id];
    uv_mutex_lock(&ib->mu);
    msg_t *m = ib->head;
    ib->head = ib->tail = NULL;
    ib->count = 0;
    uv_mutex_unlock(&ib->mu);
    while (m) {
        msg_t *next = m->next;
        sp_vm_t *vm = w->vm;
        if (vm) {
            lua_State *L = vm->L;
            lua_pushlightuserdata(L, &handlers_key);
            lua_rawget(L, LUA_REGISTRYINDEX);
            if (lua_istable(L, -1)) {
                lua_getfield(L, -1, m->data);
                lua_remove(L, -2);
                if (lua_isfunction(L, -1)) {
                    lua_pushlstring(L, m->data + m->clen + 1, m->dlen);
                    lua_pushinteger(L, m->from);
                    sp_vm_spawn(vm, 2);
                } else {
                    lua_pop(L, 1);
                }
            } else {
                lua_pop(L, 1);
            }
        }
        free(m);
        m = next;
    }
}

static int c_post(lua_State *L)
{
    uv_once(&inbox_once, inbox_init);
    int to = (int)luaL_checkinteger(L, 1);
    size_t cl, dl = 0;
    const char *ch = luaL_checklstring(L, 2, &cl);
    const char *d = luaL_optlstring(L, 3, "", &dl);
    sp_vm_t *vm = sp_vm_of(L);
    int from = vm->w ? vm->w->id : -1;
    int n = sp_workers_count();
    if (to < -1 || to >= n) {
        lua_pushnil(L);
        lua_pushfstring(L, "EINVAL: no worker %d (0..%d, or -1 for all)", to, n - 1);
        return 2;
    }
    int sent = 0;
    for (int i = 0; i < n; i++)
        if ((to == -1 || to == i) && deliver(i, from, ch, cl, d, dl))
            sent++;
    if (sent == 0 && n > 0) {
        lua_pushnil(L);
        lua_pushstring(L, "EAGAIN: the worker's queue is full");
        return 2;
    }
    lua_pushinteger(L, sent);
    return 1;
}

static int c_on(lua_State *L)
{
    luaL_checkstring(L, 1);
    if (!lua_isnoneornil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushlightuserdata(L, &handlers_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushlightuserdata(L, &handlers_key);
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_rawset(L, -3);
    return 0;
}

/* ---------------------------------------------------------------- wait / signal */

typedef struct waiter {
    sp_owned_t owned; /* first: the state's list holds waiters by this */
    uv_timer_t timer;
    sp_task_t *task;
    sp_vm_t *vm;
    char *token;
    uint64_t seq;      /* registration order: a signal wakes only earlier waiters */
    bool done;
} waiter_t;

static void waiter_closed(uv_handle_t *h)
{
    waiter_t *wt = h->data;
    free(wt->token);
    free(wt);
}

static void unlink_waiter(waiter_t *wt)
{
    sp_vm_disown(&wt->owned);
    wt->done = true;
    uv_timer_stop(&wt->timer);
    uv_close((uv_handle_t *)&wt->timer, waiter_closed);
}

/* A waiter lives through a reload (its task finishes in the retired state); the state's end
 * drops it without resuming. */
static void waiter_owned_close(sp_owned_t *o) { unlink_waiter((waiter_t *)o); }

static const sp_owned_ops_t waiter_ops = {"core.wait", NULL, waiter_owned_close};

/* The request of a waiting task went away: wake it with ECONNRESET. */
static void abort_wait(sp_task_t *task)
{
    unlink_waiter(task->wait);
    lua_pushnil(task->co);
    lua_pushstring(task->co, "ECONNRESET: the client went away");
    sp_vm_resume(task, 2);
}


static void on_wait_timeout(uv_timer_t *t)
{
    waiter_t *wt = t->data;
    sp_task_t *task = wt->task;
    unlink_waiter(wt);
    lua_pushnil(task->co);
    lua_pushstring(task->co, "ETIMEDOUT: nothing signalled in time");
    sp_vm_resume(task, 2);
}

static int c_wait(lua_State *L)
{
    size_t tl;
    const char *token = luaL_checklstring(L, 1, &tl);
    double timeout = luaL_optnumber(L, 2, -1);
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *task = sp_vm_task_of(vm, L);
    if (!task || !vm->w)
        return luaL_error(L, "wait: only possible in a hook's or timer's own coroutine");
    if (task->aborted) {
        lua_pushnil(L);
        lua_pushstring(L, "ECONNRESET: the client went away");
        return 2;
    }
    static uint64_t next_seq; /* per thread use only (each worker has its own states) */
    waiter_t *wt = sp_calloc(1, sizeof *wt);
    wt->task = task;
    wt->vm = vm;
    wt->token = sp_strndup(token, tl);
    wt->seq = __atomic_add_fetch(&next_seq, 1, __ATOMIC_RELAXED);
    uv_timer_init(&vm->w->loop, &wt->timer);
    wt->timer.data = wt;
    sp_vm_own(vm, &wt->owned, &waiter_ops);
    if (timeout >= 0)
        uv_timer_start(&wt->timer, on_wait_timeout, (uint64_t)(timeout * 1000), 0);
    task->wait = wt;
    task->on_abort = abort_wait; /* a held request (core.wait) is released at once */
    return lua_yield(L, 0);
}

static int c_signal(lua_State *L)
{
    size_t tl;
    const char *token = luaL_checklstring(L, 1, &tl);
    sp_vm_t *vm = sp_vm_of(L);
    /* Wake the waiters registered before this call, in batches: a woken task may wait on the
     * same token again (a newer waiter, left for the next signal) or end other waits. */
    uint64_t horizon = 0;
    SP_VM_EACH_OWNED(vm, o)
        if (o->ops == &waiter_ops && ((waiter_t *)o)->seq > horizon)
            horizon = ((waiter_t *)o)->seq;
    waiter_t *ready[256];
    int n = 0, total = 0;
    for (;;) {
        n = 0;
        SP_VM_EACH_OWNED(vm, o) {
            if (n == (int)SP_ARRAY_LEN(ready))
                break;
            waiter_t *wt = (waiter_t *)o;
            if (o->ops == &waiter_ops && !wt->done && wt->seq <= horizon &&
                strlen(wt->token) == tl && memcmp(wt->token, token, tl) == 0)
                ready[n++] = wt;
        }
        if (n == 0)
            break;
        for (int i = 0; i < n; i++) {
            sp_task_t *task = ready[i]->task;
            unlink_waiter(ready[i]);
            if (lua_isnoneornil(L, 2))
                lua_pushboolean(task->co, 1);
            else {
                lua_pushvalue(L, 2);
                lua_xmove(L, task->co, 1);
            }
            sp_vm_resume(task, 1);
            total++;
        }
    }
    lua_pushinteger(L, total);
    return 1;
}

/* core.in_task() -> true when the caller may wait (it runs in a hook's or timer's task) */
static int c_in_task(lua_State *L)
{
    sp_vm_t *vm = sp_vm_of(L);
    lua_pushboolean(L, vm->w && sp_vm_task_of(vm, L) != NULL);
    return 1;
}

void sp_sync_register(lua_State *L)
{
    /* stack: the sp.core table */
    static const luaL_Reg fns[] = {{"post", c_post},     {"on", c_on},
                                   {"wait", c_wait},     {"signal", c_signal},
                                   {"in_task", c_in_task}, {NULL, NULL}};
    luaL_register(L, NULL, fns);
}
