/*
 * log.c: event lines to stderr. Each line is built in a local buffer and written with one
 * write(2) under a mutex, so lines from different worker threads never interleave.
 */
#include "base/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

int sp_log_min_level = SP_LOG_INFO;
/* One lock per stream, so lines from several threads stay whole: the access log's writer blocked
 * on a full stdout must not hold up an event line to stderr from a loop thread. When stdout and
 * stderr are the same file or pipe (2>&1), one lock serves both: a pipe interleaves writes over
 * PIPE_BUF bytes, and an event line would wait for that full pipe anyway. */
static pthread_mutex_t log_mu[2] = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};
static pthread_once_t log_once = PTHREAD_ONCE_INIT;
static int stderr_lock = 1; /* the index of stderr's lock: 0 when it shares stdout's */

static void log_init(void)
{
    struct stat a, b;
    if (fstat(1, &a) == 0 && fstat(2, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
        stderr_lock = 0;
}
static const char *level_names[] = {"debug", "info", "warn", "error"};

int sp_log_level_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

const char *sp_log_level_name(int level)
{
    return (level >= 0 && level < 4) ? level_names[level] : "info";
}

void sp_log_raw(int fd, const char *line, size_t len)
{
    pthread_once(&log_once, log_init);
    pthread_mutex_t *mu = &log_mu[fd == 1 ? 0 : stderr_lock];
    pthread_mutex_lock(mu);
    while (len > 0) {
        ssize_t n = write(fd, line, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        line += n;
        len -= (size_t)n;
    }
    pthread_mutex_unlock(mu);
}

void sp_log(int level, const char *msg, ...)
{
    if (level < sp_log_min_level)
        return;
    char stack[1024];
    sp_buf_t b = SP_BUF_ON(stack);
    char ts[32];
    sp_iso8601(sp_wall_time(), ts);
    sp_buf_add(&b, "{\"time\":\"", 9);
    sp_buf_adds(&b, ts);
    sp_buf_adds(&b, "\",\"level\":\"");
    sp_buf_adds(&b, sp_log_level_name(level));
    sp_buf_adds(&b, "\",\"msg\":");
    sp_buf_json_str(&b, msg, strlen(msg));
    va_list ap;
    va_start(ap, msg);
    const char *key;
    while ((key = va_arg(ap, const char *)) != NULL) {
        char type = key[0];
        const char *name = key + 2;
        sp_buf_addc(&b, ',');
        sp_buf_json_str(&b, name, strlen(name));
        sp_buf_addc(&b, ':');
        switch (type) {
        case 's': {
            const char *v = va_arg(ap, const char *);
            if (v)
                sp_buf_json_str(&b, v, strlen(v));
            else
                sp_buf_adds(&b, "null");
            break;
        }
        case 'S': {
            const char *v = va_arg(ap, const char *);
            size_t n = va_arg(ap, size_t);
            sp_buf_json_str(&b, v ? v : "", v ? n : 0);
            break;
        }
        case 'i': sp_buf_addf(&b, "%lld", (long long)va_arg(ap, int64_t)); break;
        case 'd': sp_buf_addf(&b, "%.6g", va_arg(ap, double)); break;
        case 'b': sp_buf_adds(&b, va_arg(ap, int) ? "true" : "false"); break;
        case 'j': {
            const char *v = va_arg(ap, const char *);
            sp_buf_adds(&b, v ? v : "null");
            break;
        }
        default: sp_buf_adds(&b, "null"); break;
        }
    }
    va_end(ap);
    sp_buf_add(&b, "}\n", 2);
    sp_log_raw(2, b.p, b.len);
    sp_buf_free(&b);
}
