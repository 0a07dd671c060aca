/*
 * test.h: the C unit tests' tiny framework, shared by spec/c/test_*.c (one file per runtime
 * module, linked into one runner, test_main.c). CHECK* macros print file:line and the failing
 * expression and count failures; the runner returns non-zero on any failure. Checks run on
 * the main thread only.
 */
#ifndef SP_TEST_H
#define SP_TEST_H

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "base/sp.h"

extern int g_tests, g_checks, g_failures;

#define CHECK(expr)                                                                        \
    do {                                                                                   \
        g_checks++;                                                                        \
        if (!(expr)) {                                                                     \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr);       \
        }                                                                                  \
    } while (0)

#define CHECK_INT(a, b)                                                                    \
    do {                                                                                   \
        long long va_ = (long long)(a), vb_ = (long long)(b);                              \
        g_checks++;                                                                        \
        if (va_ != vb_) {                                                                  \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n", __FILE__,    \
                    __LINE__, #a, #b, va_, vb_);                                           \
        }                                                                                  \
    } while (0)

#define CHECK_DBL(a, b, eps)                                                               \
    do {                                                                                   \
        double va_ = (double)(a), vb_ = (double)(b);                                        \
        g_checks++;                                                                        \
        if (!(fabs(va_ - vb_) <= (eps))) {                                                 \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%.17g != %.17g)\n", __FILE__,  \
                    __LINE__, #a, #b, va_, vb_);                                           \
        }                                                                                  \
    } while (0)

#define CHECK_STR(a, b)                                                                    \
    do {                                                                                   \
        const char *sa_ = (a), *sb_ = (b);                                                 \
        g_checks++;                                                                        \
        if (!sa_ || !sb_ ? sa_ != sb_ : strcmp(sa_, sb_) != 0) {                           \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (\"%s\" != \"%s\")\n", __FILE__, \
                    __LINE__, #a, #b, sa_ ? sa_ : "(null)", sb_ ? sb_ : "(null)");         \
        }                                                                                  \
    } while (0)

/* A span (p, n) equals the bytes of a string literal (which may hold NULs). */
#define CHECK_MEM(p, n, lit)                                                               \
    do {                                                                                   \
        const char *mp_ = (const char *)(p);                                               \
        size_t mn_ = (size_t)(n);                                                          \
        g_checks++;                                                                        \
        if (mn_ != sizeof(lit) - 1 || (mn_ && memcmp(mp_, lit, mn_) != 0)) {               \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%zu bytes: \"%.*s\")\n",       \
                    __FILE__, __LINE__, #p, #lit, mn_, (int)SP_MIN(mn_, 200), mp_);        \
        }                                                                                  \
    } while (0)

/* The string s contains needle. */
#define CHECK_HAS(s, needle)                                                               \
    do {                                                                                   \
        const char *hs_ = (s), *hn_ = (needle);                                            \
        g_checks++;                                                                        \
        if (!hs_ || !strstr(hs_, hn_)) {                                                   \
            g_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: \"%s\" in %s (\"%s\")\n", __FILE__,      \
                    __LINE__, hn_, #s, hs_ ? hs_ : "(null)");                              \
        }                                                                                  \
    } while (0)

#define RUN(test)                                                                          \
    do {                                                                                   \
        int before_ = g_failures;                                                          \
        test();                                                                            \
        g_tests++;                                                                         \
        printf("%s %s\n", g_failures == before_ ? "ok  " : "FAIL", #test);                 \
        fflush(stdout);                                                                    \
    } while (0)

static inline void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static inline uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* One suite per module (test_<module>.c), run in this order by test_main.c. */
void suite_util(void);
void suite_http(void);
void suite_buf(void);
void suite_routes(void);
void suite_shdict(void);
void suite_config(void);
void suite_log(void);
void suite_json_scan(void);
void suite_deadline(void);
void suite_fswatch(void);

#endif
