/*
 * util.c: the helpers declared in sp.h (allocation, clocks, string matching).
 */
#include "sp.h"

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
    long long total_ms = llround(t * 1000.0);
    time_t s = (time_t)(total_ms / 1000);
    int ms = (int)(total_ms % 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    char date[24];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, 32, "%.19s.%03dZ", date, ms);
}

bool sp_ieq(const char *a, size_t alen, const char *lower_lit)
{
    size_t n = strlen(lower_lit);
    if (alen != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)a[i]) != lower_lit[i])
            return false;
    return true;
}

bool sp_has_token(const char *hay, size_t len, const char *tok)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (hay[i] == ' ' || hay[i] == '\t' || hay[i] == ','))
            i++;
        size_t start = i;
        while (i < len && hay[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (hay[end - 1] == ' ' || hay[end - 1] == '\t'))
            end--;
        if (end > start && sp_ieq(hay + start, end - start, tok))
            return true;
    }
    return false;
}
