/*
 * bench/uring_probe.c: what a small send on loopback TCP costs the sending process, made as
 * the proxy makes it today (one write(2) per socket) and through io_uring (one
 * io_uring_enter(2) for a batch of sends on many sockets), on this machine. It measures the
 * one thing an io_uring rewrite of the hot socket paths would change (the system call entries
 * per request), before anyone argues for that rewrite (issue 16). Built and run by
 * bench/uring_probe; needs liburing (Debian liburing-dev). Loopback only.
 *
 *   uring_probe SOCKETS ROUNDS SIZE
 *
 * SOCKETS connected pairs on 127.0.0.1; a child process (the receiver, its own CPU) drains
 * every pair with epoll + read. The parent (the sender) sends SIZE bytes on each socket in turn,
 * ROUNDS times, in each mode:
 *   bare      getppid(2) ROUNDS x SOCKETS times: the cost of entering the kernel at all
 *   write     write(2) per socket
 *   uring-1   io_uring: one send per io_uring_enter (its per-operation cost, no batching)
 *   uring-N   io_uring: SOCKETS sends per io_uring_enter (as a loop iteration would batch them)
 * The sender should run pinned on one CPU (bench/uring_probe uses taskset -c 0); the receiver
 * pins itself to the last CPU. It prints, per mode, the sender's CPU (user + system, getrusage) per send in ns and the
 * receiver's per send. Every send must be complete (SIZE bytes) or the probe exits non-zero.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <sched.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXS 256

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static double cpu_ns(int who)
{
    struct rusage ru;
    if (getrusage(who, &ru) != 0)
        die("getrusage");
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e9 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e3;
}

/* The receiver: drains `n` sockets until each has delivered `want` bytes, then reports its
 * CPU in ns on `report` and exits. */
static void receiver(int *fds, int n, long long want, int report)
{
    int ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) != 0)
            die("epoll_ctl");
    }
    long long got = 0, total = want * n;
    static char buf[1 << 16];
    struct epoll_event evs[MAXS];
    double c0 = cpu_ns(RUSAGE_SELF);
    while (got < total) {
        int k = epoll_wait(ep, evs, MAXS, 10000);
        if (k <= 0)
            die("receiver: epoll_wait (the sender stalled)");
        for (int j = 0; j < k; j++) {
            ssize_t r = read(fds[evs[j].data.u32], buf, sizeof buf);
            if (r <= 0)
                die("receiver: read");
            got += r;
        }
    }
    double ns = cpu_ns(RUSAGE_SELF) - c0;
    if (write(report, &ns, sizeof ns) != (ssize_t)sizeof ns)
        die("receiver: report");
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: uring_probe SOCKETS ROUNDS SIZE\n");
        return 2;
    }
    int n = atoi(argv[1]);
    long rounds = atol(argv[2]);
    int size = atoi(argv[3]);
    if (n < 1 || n > MAXS || rounds < 1 || rounds > 10000000 || size < 1 || size > 65536) {
        fprintf(stderr, "uring_probe: SOCKETS 1..%d, ROUNDS 1..10000000, SIZE 1..65536\n", MAXS);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, MAXS) != 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) != 0)
        die("listen on 127.0.0.1");
    int snd[MAXS], rcv[MAXS];
    for (int i = 0; i < n; i++) {
        snd[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (snd[i] < 0 || connect(snd[i], (struct sockaddr *)&a, sizeof a) != 0)
            die("connect");
        int one = 1;
        setsockopt(snd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        rcv[i] = accept(ls, NULL, NULL);
        if (rcv[i] < 0)
            die("accept");
    }
    char *msg = malloc((size_t)size);
    memset(msg, 'x', (size_t)size);
    struct io_uring ring;
    int rc = io_uring_queue_init(MAXS, &ring, 0);
    if (rc < 0) {
        fprintf(stderr, "uring_probe: io_uring_queue_init: %s\n", strerror(-rc));
        return 3;
    }
    const char *modes[] = {"bare", "write", "uring-1", "uring-N"};
    printf("| mode | system calls per send | sender CPU per send (ns) | receiver CPU per send (ns) |\n");
    printf("|---|---:|---:|---:|\n");
    for (int m = 0; m < 4; m++) {
        int pfd[2];
        if (pipe(pfd) != 0)
            die("pipe");
        pid_t child = -1;
        if (m > 0) {
            child = fork();
            if (child < 0)
                die("fork");
            if (child == 0) {
                /* the receiver on the last CPU, as the bench puts wrk and the backend apart */
                long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
                if (ncpu > 1) {
                    cpu_set_t set;
                    CPU_ZERO(&set);
                    CPU_SET((int)ncpu - 1, &set);
                    sched_setaffinity(0, sizeof set, &set);
                }
                receiver(rcv, n, (long long)rounds * size, pfd[1]);
            }
        }
        double c0 = cpu_ns(RUSAGE_SELF);
        for (long r = 0; r < rounds; r++) {
            if (m == 0) {
                for (int i = 0; i < n; i++)
                    syscall(SYS_getppid);
            } else if (m == 1) {
                for (int i = 0; i < n; i++)
                    if (write(snd[i], msg, (size_t)size) != size)
                        die("write (short)");
            } else {
                int batch = m == 2 ? 1 : n;
                for (int i = 0; i < n; i += batch) {
                    for (int j = i; j < i + batch; j++) {
                        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                        io_uring_prep_send(sqe, snd[j], msg, (size_t)size, 0);
                    }
                    rc = io_uring_submit_and_wait(&ring, (unsigned)batch);
                    if (rc < 0) {
                        fprintf(stderr, "io_uring_submit_and_wait: %s\n", strerror(-rc));
                        return 3;
                    }
                    for (int j = 0; j < batch; j++) {
                        struct io_uring_cqe *cqe;
                        if (io_uring_wait_cqe(&ring, &cqe) != 0 || cqe->res != size) {
                            fprintf(stderr, "uring_probe: a send did not complete whole\n");
                            return 3;
                        }
                        io_uring_cqe_seen(&ring, cqe);
                    }
                }
            }
        }
        double sender = (cpu_ns(RUSAGE_SELF) - c0) / ((double)rounds * n);
        double recv_ns = 0;
        if (child > 0) {
            if (read(pfd[0], &recv_ns, sizeof recv_ns) != (ssize_t)sizeof recv_ns)
                die("the receiver's report");
            int st;
            waitpid(child, &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "uring_probe: the receiver failed\n");
                return 3;
            }
            recv_ns /= (double)rounds * n;
        }
        close(pfd[0]);
        close(pfd[1]);
        double calls = m == 0 || m == 1 || m == 2 ? 1.0 : 1.0 / n;
        if (m == 0)
            printf("| %s (getppid) | 1 | %.0f | - |\n", modes[m], sender);
        else
            printf("| %s | %.3g | %.0f | %.0f |\n", modes[m], calls, sender, recv_ns);
        fflush(stdout);
    }
    io_uring_queue_exit(&ring);
    return 0;
}
