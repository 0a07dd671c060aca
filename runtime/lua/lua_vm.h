/*
 * lua_vm.h: one Lua state per worker: creating it (libraries, the sp.* modules, the script
 * search path with the override directory first, strict globals), running the script hooks
 * in pooled coroutines ("tasks"), and the single protected-call policy every call from C into
 * Lua goes through. The bindings (lua_*.c) use this interface; the core uses only the hooks.
 */
#ifndef SP_LUA_VM_H
#define SP_LUA_VM_H

#include <lauxlib.h>
#include <lua.h>

#include "http/http.h"

typedef struct sp_vm sp_vm_t;
typedef struct sp_task sp_task_t;

typedef enum { SP_TASK_REQUEST, SP_TASK_TIMER } sp_task_kind_t;

/* A coroutine with its bookkeeping. Request tasks decide one request; timer tasks run a
 * timer callback. A task is reused after its function returns; a task that failed is not. */
struct sp_task {
    lua_State *co;
    int co_ref;
    sp_vm_t *vm;
    sp_task_kind_t kind;
    sp_request_t *req;
    uint32_t req_gen;
    bool aborted;          /* the client went away */
    bool running;
    uint64_t started_ns;   /* when the current resume began (time budget) */
    void *wait;            /* what the task is suspended on (a waiter, a call); the binding's */
    /* Called when the task's request goes away while it is suspended (the client aborted), so
     * the binding ends the wait at once; NULL: the task runs on and sees `aborted`. Both are
     * cleared whenever the task is resumed. */
    void (*on_abort)(sp_task_t *t);
    char where[96];        /* a timer task's function ("file:line"), for the stuck report */
    struct sp_task *out_next, *out_prev; /* the vm's list of tasks out of the pool */
};

/* Something a Lua state owns on the loop: a timer, a file watch, a core.wait waiter, the
 * Kubernetes client. Its binding embeds an sp_owned_t, links it with sp_vm_own and unlinks it
 * with sp_vm_disown; the state then ends it however the state ends: ops->retire at a reload
 * (NULL: it lives on until the state is destroyed) and ops->close at destruction (release
 * without calling Lua). A new binding touches only its own file. */
typedef struct sp_owned sp_owned_t;
typedef struct sp_owned_ops {
    const char *what;
    void (*retire)(sp_owned_t *o);
    void (*close)(sp_owned_t *o);
} sp_owned_ops_t;
struct sp_owned {
    const sp_owned_ops_t *ops;
    sp_vm_t *vm;
    sp_owned_t *next, *prev; /* circular through vm->owned; NULL when not linked */
    bool retired;
};

struct sp_vm {
    lua_State *L;
    sp_owned_t owned;      /* the list head of what the state owns on the loop */
    sp_worker_t *w;        /* NULL for --check and test states */
    int on_request_ref;
    int on_log_ref;
    int init_ref;          /* the init module table */
    int reqobj_ref;        /* table: slot -> request object */
    int reqnew_ref;        /* sp.request.new */
    int key_g_ref;         /* the strings "_g" and "ctx", interned once: the per-request field */
    int key_ctx_ref;       /* stores of the hooks then hash no string */
    sp_task_t **free_tasks;
    int nfree, free_cap;
    sp_task_t *current;
    sp_task_t *out;        /* tasks out of the pool: running or suspended */
    int nout;
    int nreq_refs;         /* requests whose hooks ran in this state and are not released */
    int ntimers;
    bool retiring;         /* replaced by a reload: finishing its suspended tasks */
    uint64_t retire_started;
    struct sp_vm *next_retired;
    size_t mem_used, mem_limit;
    lua_Alloc base_alloc;  /* LuaJIT's allocator, wrapped to enforce the cap */
    void *base_ud;
    bool mem_exceeded;
    int config_ref;
    sp_buf_t scratch;      /* copies of routes and dict values for the bindings */
    int route_cache_ref;   /* table: key -> route table (sp.routes.get) */
    size_t route_cache_n;  /* entries added to it since it was (re)made */
    unsigned budget_tick;  /* runtime API calls since the last clock read (time budget) */
};

/* Creates a state and loads the scripts (init.lua). w may be NULL (check / test mode, no loop
 * services). Returns NULL with a message in err on any script or config error. */
sp_vm_t *sp_vm_create(sp_worker_t *w, const char *entry, char *err, size_t errlen);
void sp_vm_destroy(sp_vm_t *vm);
/* Calls init.on_start() if the scripts define it. Returns 0 or -1 (logged). */
int sp_vm_start(sp_vm_t *vm);
/* Reload: stops the state's services (timers that are not sleeps, file watches, the Kubernetes
 * client, whose waiting calls get ECANCELED) so a new state can take over; suspended tasks may
 * still finish. sp_vm_idle says when nothing runs in it any more. */
void sp_vm_retire(sp_vm_t *vm);
bool sp_vm_idle(const sp_vm_t *vm);
/* Ends every task still suspended in vm: their requests get a 500. Before sp_vm_destroy of a
 * state that did not go idle in time. */
void sp_vm_abandon_tasks(sp_vm_t *vm);
/* Calls init.check() if defined; returns the number of problems printed to stderr. */
int sp_vm_check(sp_vm_t *vm);

extern const sp_hooks_t sp_vm_hooks;
/* The value of task->wait while a task is suspended in req:read_body. */
extern char sp_vm_body_wait;

/* For bindings. */
void sp_vm_own(sp_vm_t *vm, sp_owned_t *o, const sp_owned_ops_t *ops);
void sp_vm_disown(sp_owned_t *o); /* idempotent */
#define SP_VM_EACH_OWNED(vm, o) for (sp_owned_t *o = (vm)->owned.next; o != &(vm)->owned; o = o->next)
/* The on_abort of a task suspended in req:read_body. */
void sp_vm_body_abort(sp_task_t *t);
sp_vm_t *sp_vm_of(lua_State *L);
/* The task whose coroutine is L, or NULL when L is not a task's main function context. */
sp_task_t *sp_vm_task_of(sp_vm_t *vm, lua_State *L);
/* Runs the function on top of vm->L's stack (with nargs arguments above it) in a new timer
 * task. Errors are logged. */
void sp_vm_spawn(sp_vm_t *vm, int nargs);
/* Resumes a suspended task with nargs values pushed on its coroutine. */
void sp_vm_resume(sp_task_t *t, int nargs);
/* Raises if the running hook or timer has used up script_time_budget since it was resumed. */
void sp_vm_check_budget(lua_State *L);
/* The protected-call helper: calls the function below nargs arguments on L with a traceback
 * handler; on error logs "what" with the traceback and returns non-zero (error left popped). */
int sp_vm_pcall(lua_State *L, int nargs, int nresults, const char *what);
/* `sandbox-proxy test ARGS`: runs busted's runner in vm with ARGS as its arg table. busted
 * exits the process with its own status; the return value is 1 when it could not start. */
int sp_vm_run_busted(sp_vm_t *vm, int argc, char **argv);

/* Registration of the binding modules into package.preload (lua_*.c). */
int luaopen_sp_core(lua_State *L);
int luaopen_sp_routes(lua_State *L);
int luaopen_sp_timer(lua_State *L);
int luaopen_sp_shared(lua_State *L);
int luaopen_sp_fs(lua_State *L);
int luaopen_sp_k8s(lua_State *L);
int luaopen_sp_crypto(lua_State *L);
int luaopen_sp_yaml(lua_State *L);
int luaopen_sp_redis(lua_State *L);
/* lua_sync.c: core.post/on/wait/signal */
void sp_sync_register(lua_State *L);
void sp_sync_drain_inbox(sp_worker_t *w);

/* The embedded runtime Lua modules (generated at build time from runtime/lua/). */
typedef struct sp_embedded {
    const char *name;
    const char *source;
    size_t len;
} sp_embedded_t;
extern const sp_embedded_t sp_embedded_lua[];

#endif
