/*
 * wbatch.h: the socket writes of one loop iteration, sent together (wbatch.c).
 *
 * A write to a client or a sandbox is staged instead of sent at once; when the iteration's I/O
 * callbacks are done (a check handle, and a prepare handle before the loop sleeps), every staged
 * write goes out in one io_uring_enter(2): one kernel entry for the iteration instead of one per
 * write, and the peers on the other CPUs are woken once per batch. A lone staged write goes out
 * with writev(2), as it would have without batching. Each write then completes like a libuv
 * write: its callback with 0 or an error; what the socket did not take is handed to uv_write,
 * which waits for the socket to drain.
 *
 * Off when the knob io_uring_writes is false, or when the kernel (or a seccomp profile) refuses
 * io_uring: then sp_wbatch_new returns NULL and every write is sent at once.
 */
#ifndef SP_WBATCH_H
#define SP_WBATCH_H

#include <uv.h>

#include "base/sp.h"

typedef struct sp_wbatch sp_wbatch_t;

/* The bytes of bufs[0..n). */
static inline size_t sp_bufs_total(const uv_buf_t *bufs, unsigned n)
{
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += bufs[i].len;
    return total;
}

/* After a write that took `done` bytes of bufs[0..n): trims the first buffer with bytes left
 * and returns its index (n when nothing is left). */
static inline unsigned sp_bufs_consume(uv_buf_t *bufs, unsigned n, size_t done)
{
    unsigned k = 0;
    while (k < n && done >= bufs[k].len)
        done -= bufs[k++].len;
    if (k < n && done) {
        bufs[k].base += done;
        bufs[k].len -= done;
    }
    return k;
}

/* A batcher on loop, or NULL (off, or io_uring unavailable: logged once). Each io_uring_enter
 * that sends is counted in *batches and its sends in *writes (a worker's stats). */
sp_wbatch_t *sp_wbatch_new(uv_loop_t *loop, _Atomic uint64_t *batches, _Atomic uint64_t *writes);
/* Frees it; its handles must be closed (uv_walk at shutdown) and nothing staged. */
void sp_wbatch_free(sp_wbatch_t *b);

/* Stages a write of bufs (total bytes) on s with req and cb: returns true when staged (cb runs
 * later, from the loop, never from inside this call), false when the caller must write itself
 * (b NULL, the batch full, a write of more than SP_WB_SMALL bytes or too many buffers, or
 * writes already queued in libuv). The buffers'
 * memory must stay until cb, as for uv_write; the uv_buf_t array is copied.
 * With check_quiet the bytes go only if nothing has arrived on s (a pooled sandbox connection
 * that may have been closed or written to while idle): a recv(MSG_PEEK) right before the send,
 * itself batched; if something has, nothing is sent and cb gets SP_WB_NOT_QUIET (bytes),
 * UV_EOF (the peer closed) or the socket's error. */
#define SP_WB_NOT_QUIET UV_EPROTO
/* The largest write staged (a response head with a small body, a request head): larger ones
 * gain little from sharing a kernel entry and are often taken only in part. */
#define SP_WB_SMALL 16384
/* queued (may be NULL): called when the socket did not take the whole write and the rest went
 * to uv_write, where it may wait for the peer (the owner arms its send timeout there). */
typedef void (*sp_wbatch_queued_cb)(uv_write_t *req);
bool sp_wbatch_write(sp_wbatch_t *b, uv_write_t *req, uv_stream_t *s, const uv_buf_t *bufs,
                     unsigned n, size_t total, uv_write_cb cb, sp_wbatch_queued_cb queued,
                     bool check_quiet);

/* Before a stream with a staged write is closed or shut down: the staged write (if any) is
 * handed to uv_write now, so libuv orders it before the shutdown, or cancels it at the close,
 * exactly as if it had been written at once. */
void sp_wbatch_settle(sp_wbatch_t *b, uv_write_t *req);

/* Drops the staged write of req, unsent and without its callback: true if there was one (the
 * owner is being closed and the bytes must not go, such as a request head whose sandbox
 * connection turned out stale). */
bool sp_wbatch_cancel(sp_wbatch_t *b, uv_write_t *req);

#endif
