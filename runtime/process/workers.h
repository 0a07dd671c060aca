/*
 * workers.h: the worker threads (workers.c). Each worker opens its own SO_REUSEPORT listeners,
 * creates its Lua state, runs its loop, and obeys commands from the main thread.
 */
#ifndef SP_WORKERS_H
#define SP_WORKERS_H

#include "http/worker.h"

/* Commands sent to workers through their async handle. */
enum { SP_CMD_NONE = 0, SP_CMD_STOP, SP_CMD_DRAIN, SP_CMD_RELOAD };

/* Hands the bound listening sockets to the workers: n sets, each with one fd per worker. */
void sp_workers_set_listeners(int n, const char **names, int **fds, const int *ports);
/* The async handle (on the main loop) each worker signals when its thread ends. */
void sp_workers_set_exit_notify(uv_async_t *a);
/* Starts n workers one by one; returns -1 if any failed (those started keep running). */
int sp_workers_start(int n);
void sp_workers_command(int cmd);
/* The watchdog, called by the main thread every few hundred ms: marks workers whose loop made
 * no progress for worker_stall_timeout as stuck (one error log line naming the worker and the
 * script call it is in) and clears the mark when they recover. Returns the number of stuck
 * workers; *running gets the number of workers neither exited nor stuck. */
int sp_workers_watch(int *running);
void sp_workers_join(void);
/* Threads created by sp_workers_start (some may have failed and exited). */
int sp_workers_started(void);

#endif
