/*
 * wbatch.c: the socket writes of one loop iteration, sent in one io_uring_enter (wbatch.h).
 *
 * Why: on the small-request path a proxy makes two sends per request (the request to the
 * sandbox, the response to the client), and each send(2) pays a kernel entry and, on loopback
 * and on a busy host, the wake-up of the peer. With many connections one loop iteration handles
 * many requests; their sends, gathered and submitted together, cost one entry for all of them
 * (bench/uring_probe measures a send: 5.8 us alone, 4.0 us in a batch).
 *
 * How, and what keeps it safe:
 * - Every staged send carries MSG_DONTWAIT, so io_uring issues it inline and completes it during
 *   the same io_uring_enter (a full socket answers -EAGAIN instead of being polled by the
 *   kernel). Nothing is in flight in the kernel between iterations; the ring is only a way to
 *   make many system calls with one entry.
 * - One staged write per uv_write_t, and a stream with writes queued in libuv is never staged
 *   (its bytes would overtake the queued ones).
 * - Callbacks run from the check or prepare handle, never inside sp_wbatch_write. They may stage
 *   again: those go out in the next round (bounded) or at the prepare handle, before the loop
 *   sleeps.
 * - A stream is closed or shut down only after sp_wbatch_settle, which hands a staged write to
 *   uv_write: no staged write names a closed descriptor (whose number a new socket may reuse).
 * - What a socket did not take goes to uv_write (which waits for POLLOUT), so a slow reader
 *   costs nothing new; an error goes to the callback as libuv's status (-errno on Linux).
 */
#include "http/wbatch.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <liburing.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "base/config.h"
#include "base/log.h"
#include "http/worker.h"

#define WB_MAX 256  /* staged writes per batch (the ring's size); more are written at once */
#define WB_IOV 8    /* buffers of one staged write; more are written at once */
#define WB_ROUNDS 4 /* batches sent from one check callback (writes staged by completions) */

typedef struct {
    uv_write_t *req;
    uv_stream_t *s;
    uv_write_cb cb;
    sp_wbatch_queued_cb queued;
    size_t total;
    unsigned n;
    int res;
    bool check_quiet;
    bool unsent; /* the quiet check failed: res is why, nothing went */
    struct msghdr msg;
    uv_buf_t iov[WB_IOV]; /* uv_buf_t is struct iovec's layout on Unix (libuv documents it) */
} wb_entry_t;

struct sp_wbatch {
    struct io_uring ring;
    bool ring_ok;
    uv_check_t check;
    uv_prepare_t prepare;
    wb_entry_t *staged, *sending;
    unsigned nstaged, nsending;
    char peek[1];
    _Atomic uint64_t *batches, *writes;
};

static void wb_flush(sp_wbatch_t *b, int rounds);
static void on_check(uv_check_t *h) { wb_flush(h->data, WB_ROUNDS); }
static void on_prepare(uv_prepare_t *h) { wb_flush(h->data, 1000); }

/* What this file relies on, checked on the running kernel: the operations exist, and a send
 * with MSG_DONTWAIT to a full socket completes at once with -EAGAIN inside io_uring_enter
 * instead of waiting in the kernel for room (which would leave a send in flight across loop
 * iterations and make io_uring_submit_and_wait block). Returns NULL or why not. */
static const char *wb_kernel_check(struct io_uring *ring)
{
    struct io_uring_probe *probe = io_uring_get_probe_ring(ring);
    if (!probe)
        return "no IORING_REGISTER_PROBE (kernel before 5.6)";
    bool ops = io_uring_opcode_supported(probe, IORING_OP_SENDMSG) &&
               io_uring_opcode_supported(probe, IORING_OP_RECV);
    io_uring_free_probe(probe);
    if (!ops)
        return "IORING_OP_SENDMSG or IORING_OP_RECV unsupported";
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) != 0)
        return "socketpair failed";
    const char *why = NULL;
    static char fill[4096];
    while (send(sv[0], fill, sizeof fill, MSG_DONTWAIT) > 0) {
    }
    struct iovec iov = {fill, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_sendmsg(sqe, sv[0], &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, 1);
    struct io_uring_cqe *cqe = NULL;
    if (io_uring_submit(ring) != 1) {
        why = "io_uring_submit failed";
    } else if (io_uring_peek_cqe(ring, &cqe) != 0 || !cqe) {
        /* in flight: cancel it and wait for both completions before the ring is given up */
        why = "a MSG_DONTWAIT send to a full socket waits in the kernel";
        sqe = io_uring_get_sqe(ring);
        io_uring_prep_cancel64(sqe, 1, 0);
        io_uring_submit(ring);
        for (int i = 0; i < 2 && io_uring_wait_cqe(ring, &cqe) == 0; i++)
            io_uring_cqe_seen(ring, cqe);
    } else {
        if (cqe->res != -EAGAIN)
            why = "a MSG_DONTWAIT send to a full socket did not answer -EAGAIN";
        io_uring_cqe_seen(ring, cqe);
    }
    close(sv[0]);
    close(sv[1]);
    return why;
}

sp_wbatch_t *sp_wbatch_new(uv_loop_t *loop, _Atomic uint64_t *batches, _Atomic uint64_t *writes)
{
    if (!sp_cfg.io_uring_writes)
        return NULL;
    sp_wbatch_t *b = sp_calloc(1, sizeof *b);
    int rc = io_uring_queue_init(WB_MAX, &b->ring, 0);
    const char *why = rc < 0 ? strerror(-rc) : wb_kernel_check(&b->ring);
    if (why) {
        static atomic_bool logged;
        if (!atomic_exchange(&logged, true))
            sp_log(SP_LOG_WARN, "io_uring unavailable: every write is sent at once", "s:error",
                   why, NULL);
        if (rc >= 0)
            io_uring_queue_exit(&b->ring);
        free(b);
        return NULL;
    }
    b->ring_ok = true;
    b->batches = batches;
    b->writes = writes;
    b->staged = sp_calloc(WB_MAX, sizeof *b->staged);
    b->sending = sp_calloc(WB_MAX, sizeof *b->sending);
    uv_check_init(loop, &b->check);
    b->check.data = b;
    uv_check_start(&b->check, on_check);
    uv_unref((uv_handle_t *)&b->check);
    uv_prepare_init(loop, &b->prepare);
    b->prepare.data = b;
    uv_prepare_start(&b->prepare, on_prepare);
    uv_unref((uv_handle_t *)&b->prepare);
    return b;
}

void sp_wbatch_free(sp_wbatch_t *b)
{
    if (!b)
        return;
    io_uring_queue_exit(&b->ring);
    free(b->staged);
    free(b->sending);
    free(b);
}

bool sp_wbatch_write(sp_wbatch_t *b, uv_write_t *req, uv_stream_t *s, const uv_buf_t *bufs,
                     unsigned n, size_t total, uv_write_cb cb, sp_wbatch_queued_cb queued,
                     bool check_quiet)
{
    if (!b || n == 0 || n > WB_IOV || total > SP_WB_SMALL || b->nstaged == WB_MAX ||
        s->write_queue_size ||
        uv_is_closing((uv_handle_t *)s))
        return false;
    wb_entry_t *e = &b->staged[b->nstaged++];
    e->req = req;
    e->s = s;
    e->cb = cb;
    e->queued = queued;
    e->total = total;
    e->n = n;
    e->check_quiet = check_quiet;
    e->unsent = false;
    memcpy(e->iov, bufs, n * sizeof *bufs);
    return true;
}

void sp_wbatch_settle(sp_wbatch_t *b, uv_write_t *req)
{
    if (!b)
        return;
    for (unsigned i = 0; i < b->nstaged; i++) {
        if (b->staged[i].req != req)
            continue;
        wb_entry_t e = b->staged[i];
        b->staged[i] = b->staged[--b->nstaged];
        int rc = uv_write(e.req, e.s, e.iov, e.n, e.cb);
        if (rc < 0)
            e.cb(e.req, rc); /* the owner is closing: its callback only lets go */
        return;
    }
    /* Not staged, or sent already in the batch being completed: that completes on its own. */
}

bool sp_wbatch_cancel(sp_wbatch_t *b, uv_write_t *req)
{
    if (!b)
        return false;
    for (unsigned i = 0; i < b->nstaged; i++) {
        if (b->staged[i].req == req) {
            b->staged[i] = b->staged[--b->nstaged];
            return true;
        }
    }
    return false;
}

/* The quiet check of e's connection found bytes (res > 0), the end (0) or an error. */
static void wb_not_quiet(wb_entry_t *e, int res)
{
    e->unsent = true;
    e->res = res > 0 ? SP_WB_NOT_QUIET : res == 0 ? UV_EOF : res;
}

/* A lone write: a ring entry costs more than a plain call. */
static void wb_send_one(sp_wbatch_t *b, wb_entry_t *e)
{
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)e->s, &fd) != 0) {
        e->res = UV_EBADF;
        return;
    }
    if (e->check_quiet) {
        ssize_t n = recv(fd, b->peek, 1, MSG_PEEK | MSG_DONTWAIT);
        int res = n < 0 ? -errno : (int)n;
        if (res != -EAGAIN && res != -EWOULDBLOCK) {
            wb_not_quiet(e, res);
            return;
        }
    }
    ssize_t w;
    do
        w = writev(fd, (const struct iovec *)e->iov, (int)e->n);
    while (w < 0 && errno == EINTR);
    e->res = w < 0 ? -errno : (int)w;
}

/* Submits the queued entries and collects every completion into res (they are all inline:
 * MSG_DONTWAIT). False if the ring failed: it is retired and the entries keep their res. */
static bool wb_submit(sp_wbatch_t *b, unsigned queued, bool peeks)
{
    unsigned submitted = 0;
    while (submitted < queued) {
        int rc = io_uring_submit_and_wait(&b->ring, queued - submitted);
        if (rc > 0) {
            submitted += (unsigned)rc;
        } else if (rc != -EINTR) {
            /* The kernel took none of them: they must never be sent later. The ring is retired
             * and the writes go through uv_write. */
            sp_log(SP_LOG_ERROR, "io_uring submit failed: writes are sent one by one", "s:error",
                   strerror(-rc), NULL);
            b->ring_ok = false;
            break;
        }
    }
    for (unsigned got = 0; got < submitted; got++) {
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&b->ring, &cqe) != 0)
            break;
        uint64_t i = io_uring_cqe_get_data64(cqe);
        if (i < b->nsending) {
            wb_entry_t *e = &b->sending[i];
            if (!peeks)
                e->res = cqe->res;
            else if (cqe->res != -EAGAIN && cqe->res != -EWOULDBLOCK)
                wb_not_quiet(e, cqe->res);
        }
        io_uring_cqe_seen(&b->ring, cqe);
    }
    return b->ring_ok;
}

static void wb_send_ring(sp_wbatch_t *b)
{
    /* First the quiet checks of pooled connections (one entry for all), then the sends. */
    unsigned queued = 0;
    for (unsigned i = 0; i < b->nsending; i++) {
        wb_entry_t *e = &b->sending[i];
        uv_os_fd_t fd;
        e->res = -EAGAIN; /* unless the ring says otherwise: uv_write sends it */
        if (uv_fileno((uv_handle_t *)e->s, &fd) != 0) {
            e->res = UV_EBADF;
            continue;
        }
        if (!e->check_quiet)
            continue;
        struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
        io_uring_prep_recv(sqe, fd, b->peek, 1, MSG_PEEK | MSG_DONTWAIT);
        io_uring_sqe_set_data64(sqe, i);
        queued++;
    }
    if (queued && !wb_submit(b, queued, true)) {
        for (unsigned i = 0; i < b->nsending; i++) /* nothing was sent: one by one */
            if (!b->sending[i].unsent)
                wb_send_one(b, &b->sending[i]);
        return;
    }
    queued = 0;
    for (unsigned i = 0; i < b->nsending; i++) {
        wb_entry_t *e = &b->sending[i];
        uv_os_fd_t fd;
        if (e->unsent || e->res != -EAGAIN || uv_fileno((uv_handle_t *)e->s, &fd) != 0)
            continue;
        memset(&e->msg, 0, sizeof e->msg);
        e->msg.msg_iov = (struct iovec *)e->iov;
        e->msg.msg_iovlen = e->n;
        struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
        io_uring_prep_sendmsg(sqe, fd, &e->msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        io_uring_sqe_set_data64(sqe, i);
        queued++;
    }
    if (queued) {
        SP_STAT_ADD(*b->batches, 1);
        SP_STAT_ADD(*b->writes, queued);
        wb_submit(b, queued, false);
    }
}

static void wb_complete(wb_entry_t *e)
{
    if (e->unsent) {
        e->cb(e->req, e->res); /* nothing was sent */
        return;
    }
    if (e->res >= 0 && (size_t)e->res == e->total) {
        e->cb(e->req, 0);
        return;
    }
    if (e->res >= 0 || e->res == -EAGAIN || e->res == -EWOULDBLOCK) {
        /* The socket took part (or none): libuv sends the rest when it drains. */
        unsigned k = sp_bufs_consume(e->iov, e->n, e->res > 0 ? (size_t)e->res : 0);
        int rc = uv_write(e->req, e->s, e->iov + k, e->n - k, e->cb);
        if (rc < 0)
            e->cb(e->req, rc);
        else if (e->queued)
            e->queued(e->req);
        return;
    }
    e->cb(e->req, e->res); /* -errno is libuv's error code on Linux */
}

static void wb_flush(sp_wbatch_t *b, int rounds)
{
    for (int round = 0; round < rounds && b->nstaged; round++) {
        wb_entry_t *t = b->sending;
        b->sending = b->staged;
        b->staged = t;
        b->nsending = b->nstaged;
        b->nstaged = 0;
        if (b->nsending == 1 || !b->ring_ok) {
            for (unsigned i = 0; i < b->nsending; i++)
                wb_send_one(b, &b->sending[i]);
        } else {
            wb_send_ring(b);
        }
        for (unsigned i = 0; i < b->nsending; i++)
            wb_complete(&b->sending[i]);
        b->nsending = 0;
    }
}
