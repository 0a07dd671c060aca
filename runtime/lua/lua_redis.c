/*
 * lua_redis.c: the sp.redis module, a Redis client for scripts on the worker's own loop
 * (hiredis' async API through its libuv adapter). One connection per client; a client belongs
 * to its Lua state (one per worker) and lives until that state is destroyed.
 *
 *   redis.client{host=, port=, timeout_ms=, password=, name=}   -> client | nil, err
 *   client:command(arg, ...)   suspends the calling task until the reply: a string, a number,
 *                              false (a nil reply) or a table (an array reply);
 *                              nil, "EREDIS: <message>" for an error reply;
 *                              nil, "EDOWN: <why>" at once while the store is down;
 *                              nil, "ETIMEDOUT: ..." when no reply came within timeout_ms;
 *                              nil, "ECONNRESET: ..." when the connection ended under it or
 *                              the request's client went away
 *   client:status()            "up", "connecting" or "down"
 *
 * Down and up: a refused or lost connection, or a command that timed out (the store is stuck
 * or unreachable: the connection is dropped), makes the client "down": commands fail at once
 * (no waiting) and it reconnects after a backoff (RECONNECT_MIN_MS doubling to
 * RECONNECT_MAX_MS); after an outage commands fail at once until a PING on the new connection
 * is answered. One log line when the store goes down and one when it is up (at start too,
 * once every worker's connection answered), never one per command or worker (store_note).
 * A host name is resolved off the loop (uv_getaddrinfo, before each connection attempt; the
 * first address is dialled); while it resolves the client is not connected, so commands fail
 * at once as while down. An address is dialled as it is.
 * Not owned here: what the replies mean (the scripts decide), Redis Cluster redirections.
 */
#include "lua/lua_vm.h"
#include "base/log.h"
#include "http/worker.h"

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>

#define CLIENT_MT "sp.redis.client"
#define MAX_CLIENTS 16 /* per state: a client is made once, when a script loads */
#define MAX_ARGS 4096
#define RECONNECT_MIN_MS 50
#define RECONNECT_MAX_MS 2000

typedef enum { ST_CONNECTING, ST_UP, ST_DOWN } rstate_t;

typedef struct rclient rclient_t;

enum { PROBE_NONE, PROBE_AUTH, PROBE_PING };

/* One command sent. Freed once hiredis has called back (it always does: with a NULL reply
 * when the connection ends) and nobody waits for it; task is NULL once nobody waits. */
typedef struct rop {
    struct rop *next, *prev; /* the client's waiting or failed list while task is set */
    rclient_t *c;
    sp_task_t *task;
    uint64_t deadline; /* uv_now, ms */
    bool replied;
    int probe;         /* PROBE_AUTH, PROBE_PING: a new connection's own command (no task) */
} rop_t;

struct rclient {
    sp_owned_t owned; /* first: the state's list holds clients by this */
    sp_vm_t *vm;
    uv_loop_t *loop;
    redisAsyncContext *ac; /* NULL while down */
    uv_timer_t timeout;    /* the oldest waiting command's deadline */
    uv_timer_t retry;      /* the next connection attempt */
    uv_timer_t kick;       /* ends failed waits outside hiredis' callbacks */
    rop_t waiting;         /* list heads (circular) */
    rop_t failed;          /* the connection ended under these: resumed by kick */
    rstate_t state;
    bool counted_down;     /* counted in its store's clients not up (see store_note) */
    bool was_down;         /* down since it was last up: commands wait for the probe */
    bool closing;
    char drop_why[160];    /* set by a failed probe: kick drops the connection */
    int handles;           /* open timers and a lookup in flight; the struct is freed when none
                            * is left */
    bool resolving;        /* gai is in flight */
    uv_getaddrinfo_t gai;
    uint64_t backoff;
    uint64_t timeout_ms;
    int port;
    char *host, *password, *name;
    char last_error[160];
};

static void list_init(rop_t *h) { h->next = h->prev = h; }
static bool list_empty(const rop_t *h) { return h->next == h; }
static void list_del(rop_t *o)
{
    o->prev->next = o->next;
    o->next->prev = o->prev;
    o->next = o->prev = NULL;
}
static void list_add_tail(rop_t *h, rop_t *o)
{
    o->prev = h->prev;
    o->next = h;
    h->prev->next = o;
    h->prev = o;
}

static void connect_now(rclient_t *c);

static void resume_error(sp_task_t *task, const char *msg)
{
    lua_pushnil(task->co);
    lua_pushstring(task->co, msg);
    sp_vm_resume(task, 2);
}

/* Detaches op from its task and its list; returns the task (or NULL). op itself stays until
 * hiredis has called back. */
static sp_task_t *op_detach(rop_t *op)
{
    sp_task_t *task = op->task;
    op->task = NULL;
    if (op->next)
        list_del(op);
    if (task) {
        task->wait = NULL;
        task->on_abort = NULL;
    }
    return task;
}

static void op_release(rop_t *op)
{
    if (op->replied && !op->task)
        free(op);
}

/* The task's request went away while it waited: end the wait now. */
static void op_abort(sp_task_t *task)
{
    rop_t *op = task->wait;
    op_detach(op);
    op_release(op);
    resume_error(task, "ECONNRESET: the client went away");
}

static int64_t worker_id(rclient_t *c) { return c->vm->w ? c->vm->w->id : -1; }

/* The down and up lines are per store, not per worker or command. The process counts, per
 * (name, host, port), its clients that are not up (a new client counts until its first PING is
 * answered) and remembers what it last said: "redis store down" when a client goes down and
 * the store was not said to be down; "redis store up" when no client is left down and the
 * store was not said to be up and every worker has a client of it (so at start too, once every
 * worker is connected: each worker's state loads the same scripts). */
#define MAX_STORES 64
enum { SAID_NOTHING, SAID_UP, SAID_DOWN };
static struct {
    char key[320];
    int ndown;
    int nclients;
    int said;
} stores[MAX_STORES];
static int nstores;
static uv_mutex_t stores_mu;
static uv_once_t stores_once = UV_ONCE_INIT;
static void stores_init(void) { uv_mutex_init(&stores_mu); }

/* Adds delta to the store's clients not up and dclients to its clients; event SAID_UP or
 * SAID_DOWN (or 0) is what c just did. Returns true when the store's line is to be logged now. */
static bool store_note(rclient_t *c, int delta, int dclients, int event)
{
    char key[320];
    snprintf(key, sizeof key, "%s %s:%d", c->name, c->host, c->port);
    uv_once(&stores_once, stores_init);
    uv_mutex_lock(&stores_mu);
    int i = 0;
    while (i < nstores && strcmp(stores[i].key, key) != 0)
        i++;
    if (i == nstores && nstores < MAX_STORES) {
        snprintf(stores[i].key, sizeof stores[i].key, "%s", key);
        stores[i].ndown = 0;
        stores[i].nclients = 0;
        stores[i].said = SAID_NOTHING;
        nstores++;
    }
    bool say = false;
    if (i < nstores) {
        stores[i].ndown += delta;
        stores[i].nclients += dclients;
        if (event == SAID_DOWN && stores[i].said != SAID_DOWN)
            say = true;
        else if (event == SAID_UP && stores[i].ndown == 0 && stores[i].said != SAID_UP &&
                 stores[i].nclients >= sp_workers_count())
            say = true;
        if (say)
            stores[i].said = event;
    }
    uv_mutex_unlock(&stores_mu);
    return say;
}

static void on_retry(uv_timer_t *t) { connect_now(t->data); }

/* The connection is gone (refused, lost or dropped): fail fast until the next attempt. */
static void go_down(rclient_t *c, const char *why)
{
    c->ac = NULL;
    if (c->closing)
        return;
    c->state = ST_DOWN;
    snprintf(c->last_error, sizeof c->last_error, "%s", why && *why ? why : "connection lost");
    c->was_down = true;
    int delta = c->counted_down ? 0 : 1;
    c->counted_down = true;
    if (store_note(c, delta, 0, SAID_DOWN))
        sp_log(SP_LOG_WARN, "redis store down", "s:client", c->name, "s:host", c->host,
               "i:port", (int64_t)c->port, "s:error", c->last_error, "i:worker", worker_id(c),
               NULL);
    c->backoff = c->backoff == 0 ? RECONNECT_MIN_MS : c->backoff * 2;
    if (c->backoff > RECONNECT_MAX_MS)
        c->backoff = RECONNECT_MAX_MS;
    uv_timer_start(&c->retry, on_retry, c->backoff, 0);
}

/* Drops the connection from our side (not from inside a hiredis callback): its commands are
 * called back with NULL replies (their waits move to the failed list). */
static void drop(rclient_t *c, const char *why)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (ac)
        redisAsyncFree(ac);
    go_down(c, why);
}

/* Ends the waits whose connection ended under them (kick timer: outside hiredis). */
static void flush_failed(rclient_t *c)
{
    char msg[200];
    while (!list_empty(&c->failed)) {
        rop_t *op = c->failed.next;
        sp_task_t *task = op_detach(op);
        op_release(op);
        snprintf(msg, sizeof msg, "ECONNRESET: %s", c->last_error);
        resume_error(task, msg);
    }
}

static void on_kick(uv_timer_t *t)
{
    rclient_t *c = t->data;
    if (c->drop_why[0]) {
        char why[160];
        snprintf(why, sizeof why, "%s", c->drop_why);
        c->drop_why[0] = '\0';
        drop(c, why);
    }
    flush_failed(c);
}

static void on_timeout(uv_timer_t *t)
{
    rclient_t *c = t->data;
    uint64_t now = uv_now(c->loop);
    sp_task_t **late = NULL;
    size_t n = 0, cap = 0;
    while (!list_empty(&c->waiting) && c->waiting.next->deadline <= now) {
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            late = sp_realloc(late, cap * sizeof *late);
        }
        late[n++] = op_detach(c->waiting.next); /* the op is freed by its NULL reply */
    }
    if (n > 0) {
        char why[96];
        snprintf(why, sizeof why, "no reply within %llu ms", (unsigned long long)c->timeout_ms);
        drop(c, why);
        char msg[128];
        snprintf(msg, sizeof msg, "ETIMEDOUT: %s", why);
        for (size_t i = 0; i < n; i++)
            if (late[i]) /* NULL: the probe */
                resume_error(late[i], msg);
        free(late);
        flush_failed(c);
    }
    if (!c->closing && !list_empty(&c->waiting)) {
        uint64_t d = c->waiting.next->deadline;
        uv_timer_start(&c->timeout, on_timeout, d > now ? d - now : 0, 0);
    }
}

/* stack: +1 (the reply as Lua sees it) */
static void push_reply(lua_State *L, const redisReply *r, int depth)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_ERROR:
        lua_pushfstring(L, "EREDIS: %s", r->str ? r->str : "");
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushnumber(L, (lua_Number)r->integer);
        break;
    case REDIS_REPLY_ARRAY:
        if (depth > 8) { /* our scripts send flat arrays; deeper ones are cut */
            lua_pushboolean(L, 0);
            break;
        }
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_reply(L, r->element[i], depth + 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    default: /* REDIS_REPLY_NIL */
        lua_pushboolean(L, 0);
        break;
    }
}

/* The probe was answered: the store is usable. */
static void mark_up(rclient_t *c)
{
    c->state = ST_UP;
    c->backoff = 0;
    c->was_down = false;
    int delta = c->counted_down ? -1 : 0;
    c->counted_down = false;
    if (store_note(c, delta, 0, SAID_UP))
        sp_log(SP_LOG_INFO, "redis store up", "s:client", c->name, "s:host", c->host,
               "i:port", (int64_t)c->port, "i:worker", worker_id(c), NULL);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    rop_t *op = privdata;
    rclient_t *c = op->c;
    redisReply *r = reply;
    op->replied = true;
    if (op->probe) {
        int op_probe = op->probe;
        if (op->next)
            list_del(op);
        free(op);
        if (c->closing || c->ac != ac || !r)
            return; /* the connection ends anyway */
        if (r->type == REDIS_REPLY_ERROR) { /* WRONGPASS, LOADING...: not usable; drop it */
            if (!c->drop_why[0]) /* the first error says why (AUTH's, not PING's NOAUTH) */
                snprintf(c->drop_why, sizeof c->drop_why, "%s", r->str ? r->str : "error reply");
            uv_timer_start(&c->kick, on_kick, 0, 0);
            return;
        }
        if (op_probe == PROBE_PING)
            mark_up(c);
        return;
    }
    if (!op->task || c->closing) { /* nobody waits (closing: the waits were dropped) */
        free(op);
        return;
    }
    if (!r) { /* the connection ends: resume outside hiredis */
        list_del(op);
        list_add_tail(&c->failed, op);
        uv_timer_start(&c->kick, on_kick, 0, 0);
        return;
    }
    sp_task_t *task = op_detach(op);
    free(op);
    lua_State *co = task->co;
    if (r->type == REDIS_REPLY_ERROR) {
        lua_pushnil(co);
        push_reply(co, r, 0);
        sp_vm_resume(task, 2);
    } else {
        push_reply(co, r, 0);
        sp_vm_resume(task, 1);
    }
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    rclient_t *c = ac->data;
    if (c->ac != ac)
        return;
    if (status != REDIS_OK)
        go_down(c, ac->errstr); /* hiredis frees ac after this callback */
    /* else: up once the probe (PING) is answered */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rclient_t *c = ac->data;
    if (c->ac != ac)
        return;
    go_down(c, ac->err ? ac->errstr : "the server closed the connection");
}

/* Sends a new connection's own command, timed like any other. */
static void send_probe(rclient_t *c, int kind)
{
    rop_t *probe = sp_calloc(1, sizeof *probe);
    probe->c = c;
    probe->probe = kind;
    probe->deadline = uv_now(c->loop) + c->timeout_ms;
    int rc = kind == PROBE_AUTH ? redisAsyncCommand(c->ac, on_reply, probe, "AUTH %s", c->password)
                                : redisAsyncCommand(c->ac, on_reply, probe, "PING");
    if (rc != REDIS_OK) {
        free(probe);
        return;
    }
    list_add_tail(&c->waiting, probe);
    if (!uv_is_active((uv_handle_t *)&c->timeout))
        uv_timer_start(&c->timeout, on_timeout, c->timeout_ms, 0);
}

static void client_unref(rclient_t *c);
static void connect_addr(rclient_t *c, const char *addr);

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    rclient_t *c = req->data;
    c->resolving = false;
    char addr[64] = "";
    if (status == 0 && res)
        uv_ip_name(res->ai_addr, addr, sizeof addr);
    if (res)
        uv_freeaddrinfo(res);
    if (c->closing) {
        client_unref(c);
        return;
    }
    c->handles--;
    if (status < 0 || !addr[0]) {
        char why[200];
        snprintf(why, sizeof why, "cannot resolve %s: %s", c->host,
                 status < 0 ? uv_strerror(status) : "no address");
        go_down(c, why);
        return;
    }
    connect_addr(c, addr);
}

static void connect_now(rclient_t *c)
{
    if (c->closing || c->ac || c->resolving)
        return;
    unsigned char bin[16];
    if (uv_inet_pton(AF_INET, c->host, bin) == 0 || uv_inet_pton(AF_INET6, c->host, bin) == 0) {
        connect_addr(c, c->host);
        return;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    c->gai.data = c;
    int rc = uv_getaddrinfo(c->loop, &c->gai, on_resolved, c->host, NULL, &hints);
    if (rc < 0) {
        char why[200];
        snprintf(why, sizeof why, "cannot resolve %s: %s", c->host, uv_strerror(rc));
        go_down(c, why);
        return;
    }
    c->resolving = true;
    c->handles++;
}

static void connect_addr(rclient_t *c, const char *addr)
{
    redisAsyncContext *ac = redisAsyncConnect(addr, c->port);
    if (!ac) {
        go_down(c, "out of memory");
        return;
    }
    if (ac->err) {
        char why[160];
        snprintf(why, sizeof why, "%s", ac->errstr);
        redisAsyncFree(ac);
        go_down(c, why);
        return;
    }
    ac->data = c;
    if (redisLibuvAttach(ac, c->loop) != REDIS_OK) {
        redisAsyncFree(ac);
        go_down(c, "cannot attach to the loop");
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    c->ac = ac;
    c->state = ST_CONNECTING;
    /* AUTH first when configured; the connection counts as up once PING is answered (a
     * frozen server's kernel still accepts connections). */
    if (c->password)
        send_probe(c, PROBE_AUTH);
    send_probe(c, PROBE_PING);
}

static void on_timer_closed(uv_handle_t *h) { client_unref(h->data); }

/* One of the client's handles (a timer, the lookup) is done; the last one frees it. */
static void client_unref(rclient_t *c)
{
    if (--c->handles > 0)
        return;
    free(c->host);
    free(c->password);
    free(c->name);
    free(c);
}

/* The state ends: drop the connection and every wait without calling Lua. */
static void client_close(sp_owned_t *o)
{
    rclient_t *c = (rclient_t *)o;
    if (c->closing)
        return;
    c->closing = true;
    sp_vm_disown(&c->owned);
    store_note(c, c->counted_down ? -1 : 0, -1, 0);
    /* The tasks are not touched: an abandoned state has freed them already. */
    while (!list_empty(&c->waiting)) {
        rop_t *op = c->waiting.next;
        list_del(op);
        op->task = NULL;
    }
    while (!list_empty(&c->failed)) {
        rop_t *op = c->failed.next;
        list_del(op);
        op->task = NULL;
        op_release(op);
    }
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (ac)
        redisAsyncFree(ac); /* calls back every op (freed: no task) */
    if (c->resolving)
        uv_cancel((uv_req_t *)&c->gai); /* on_resolved still runs (cancelled or done) */
    uv_close((uv_handle_t *)&c->timeout, on_timer_closed);
    uv_close((uv_handle_t *)&c->retry, on_timer_closed);
    uv_close((uv_handle_t *)&c->kick, on_timer_closed);
}

/* A reload keeps the client: the old state's suspended tasks may still use it. */
static const sp_owned_ops_t client_ops = {"redis client", NULL, client_close};

static rclient_t *check_client(lua_State *L)
{
    rclient_t **p = luaL_checkudata(L, 1, CLIENT_MT);
    return *p;
}

static int c_command(lua_State *L)
{
    rclient_t *c = check_client(L);
    int argc = lua_gettop(L) - 1;
    if (argc < 1)
        return luaL_error(L, "redis: command needs a command name");
    if (argc > MAX_ARGS)
        return luaL_error(L, "redis: more than %d arguments", MAX_ARGS);
    sp_vm_t *vm = sp_vm_of(L);
    sp_task_t *task = sp_vm_task_of(vm, L);
    if (!task)
        return luaL_error(L, "redis: command only possible in a hook's or timer's own coroutine");
    if (task->aborted) {
        lua_pushnil(L);
        lua_pushstring(L, "ECONNRESET: the client went away");
        return 2;
    }
    /* down, or reconnecting after an outage and not yet proven by the probe: fail at once
     * (commands wait for the very first connection only) */
    if (c->state == ST_DOWN || !c->ac || (c->state == ST_CONNECTING && c->was_down)) {
        lua_pushnil(L);
        lua_pushfstring(L, "EDOWN: %s", c->last_error);
        return 2;
    }
    const char *argv_small[16];
    size_t lens_small[16];
    const char **argv = argc <= 16 ? argv_small : sp_malloc(argc * sizeof *argv);
    size_t *lens = argc <= 16 ? lens_small : sp_malloc(argc * sizeof *lens);
    for (int i = 0; i < argc; i++) {
        int t = lua_type(L, i + 2);
        if (t != LUA_TSTRING && t != LUA_TNUMBER) {
            if (argv != argv_small) {
                free(argv);
                free(lens);
            }
            return luaL_argerror(L, i + 2, "string or number expected");
        }
        argv[i] = lua_tolstring(L, i + 2, &lens[i]);
    }
    rop_t *op = sp_calloc(1, sizeof *op);
    op->c = c;
    op->task = task;
    op->deadline = uv_now(c->loop) + c->timeout_ms;
    int rc = redisAsyncCommandArgv(c->ac, on_reply, op, argc, argv, lens);
    if (argv != argv_small) {
        free(argv);
        free(lens);
    }
    if (rc != REDIS_OK) {
        free(op);
        lua_pushnil(L);
        lua_pushstring(L, "ECONNRESET: the connection is closing");
        return 2;
    }
    list_add_tail(&c->waiting, op);
    if (!uv_is_active((uv_handle_t *)&c->timeout))
        uv_timer_start(&c->timeout, on_timeout, c->timeout_ms, 0);
    task->wait = op;
    task->on_abort = op_abort;
    return lua_yield(L, 0);
}

static int c_status(lua_State *L)
{
    rclient_t *c = check_client(L);
    lua_pushstring(L, c->state == ST_UP ? "up" : c->state == ST_DOWN ? "down" : "connecting");
    return 1;
}

static char nclients_key;

static int c_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    sp_vm_t *vm = sp_vm_of(L);
    lua_getfield(L, 1, "host");
    const char *host = luaL_optstring(L, -1, "127.0.0.1");
    lua_getfield(L, 1, "port");
    lua_Integer port = luaL_optinteger(L, -1, 6379);
    lua_getfield(L, 1, "timeout_ms");
    lua_Number timeout = luaL_optnumber(L, -1, 50);
    lua_getfield(L, 1, "password");
    const char *password = luaL_optstring(L, -1, NULL);
    lua_getfield(L, 1, "name");
    const char *name = luaL_optstring(L, -1, "redis");
    if (port < 1 || port > 65535)
        return luaL_error(L, "redis.client: port must be 1..65535");
    if (!(timeout >= 1 && timeout <= 600000))
        return luaL_error(L, "redis.client: timeout_ms must be 1..600000");
    if (!vm->w) {
        lua_pushnil(L);
        lua_pushstring(L, "ENOLOOP: no event loop here (check or test mode)");
        return 2;
    }
    lua_pushlightuserdata(L, &nclients_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    int n = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (n >= MAX_CLIENTS) {
        lua_pushnil(L);
        lua_pushfstring(L, "EMFILE: %d redis clients in this state already", MAX_CLIENTS);
        return 2;
    }
    lua_pushlightuserdata(L, &nclients_key);
    lua_pushinteger(L, n + 1);
    lua_rawset(L, LUA_REGISTRYINDEX);

    rclient_t *c = sp_calloc(1, sizeof *c);
    c->vm = vm;
    c->loop = &vm->w->loop;
    c->host = sp_strndup(host, strlen(host));
    c->password = password ? sp_strndup(password, strlen(password)) : NULL;
    c->name = sp_strndup(name, strlen(name));
    c->port = (int)port;
    c->timeout_ms = (uint64_t)timeout;
    list_init(&c->waiting);
    list_init(&c->failed);
    uv_timer_t *timers[] = {&c->timeout, &c->retry, &c->kick};
    for (int i = 0; i < 3; i++) {
        uv_timer_init(c->loop, timers[i]);
        timers[i]->data = c;
        c->handles++;
    }
    snprintf(c->last_error, sizeof c->last_error, "not connected yet");
    sp_vm_own(vm, &c->owned, &client_ops);
    c->counted_down = true; /* until its first PING is answered */
    store_note(c, 1, 1, 0);
    connect_now(c);

    rclient_t **p = lua_newuserdata(L, sizeof *p);
    *p = c;
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

int luaopen_sp_redis(lua_State *L)
{
    if (luaL_newmetatable(L, CLIENT_MT)) {
        static const luaL_Reg methods[] = {
            {"command", c_command}, {"status", c_status}, {NULL, NULL}};
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    static const luaL_Reg fns[] = {{"client", c_client}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
