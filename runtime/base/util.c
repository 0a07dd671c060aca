/*
 * util.c: the helpers declared in sp.h (allocation, clocks, string matching).
 */
#include "base/sp.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void oom(size_t n)
{
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory\",\"bytes\":%zu}\n", n);
    abort();
}

void *sp_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *sp_calloc(size_t count, size_t n)
{
    void *p = calloc(count ? count : 1, n ? n : 1);
    if (!p)
        oom(count * n);
    return p;
}

void *sp_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *sp_strndup(const char *s, size_t n)
{
    char *p = sp_malloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *sp_strdup(const char *s) { return sp_strndup(s, strlen(s)); }

uint64_t sp_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

double sp_wall_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void sp_iso8601(double t, char out[32])
{
    /* The date and time of day change once a second: format them then, not per call (every
     * access-log line and log event asks). One cache per thread. */
    static _Thread_local time_t cached_s = (time_t)-1;
    static _Thread_local char cached[24];
    long long total_ms = llround(t * 1000.0);
    if (total_ms < 0)
        total_ms = 0;
    time_t s = (time_t)(total_ms / 1000);
    int ms = (int)(total_ms % 1000);
    if (s != cached_s) {
        struct tm tm;
        gmtime_r(&s, &tm);
        strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &tm);
        cached_s = s;
    }
    memcpy(out, cached, 19);
    out[19] = '.';
    out[20] = (char)('0' + ms / 100);
    out[21] = (char)('0' + ms / 10 % 10);
    out[22] = (char)('0' + ms % 10);
    out[23] = 'Z';
    out[24] = '\0';
}

size_t sp_next_token(const char *list, size_t len, size_t *pos, const char **tok)
{
    size_t i = *pos;
    while (i < len && (list[i] == ' ' || list[i] == '\t' || list[i] == ','))
        i++;
    size_t start = i;
    while (i < len && list[i] != ',')
        i++;
    size_t end = i;
    while (end > start && (list[end - 1] == ' ' || list[end - 1] == '\t'))
        end--;
    *pos = i;
    *tok = list + start;
    return end - start;
}

bool sp_has_token(const char *hay, size_t len, const char *tok)
{
    size_t i = 0, n;
    const char *t;
    while ((n = sp_next_token(hay, len, &i, &t)) > 0)
        if (sp_ieq(t, n, tok))
            return true;
    return false;
}
