/*
 * test_core.c: unit tests of the runtime's core C modules, without a loop or a Lua VM:
 *   util   (sp_ieq, sp_has_token, sp_iso8601, sp_strndup/sp_strdup),
 *   buf    (growth, SP_BUF_ON stack buffers, JSON string escaping, block pools),
 *   routes (set/get/delete, copies, fields, versions and generation, counts, snapshots,
 *           shard growth, concurrent readers and writers),
 *   shdict (types, SET/ADD/REPLACE, incr, TTLs, LRU eviction, E2BIG, flush, stats,
 *           iteration, atomic incr across threads),
 *   config (defaults, sp_config_set, sp_config_load_file, dump/help),
 *   log    (level names, sp_log output),
 *   http   (the obs-fold detector over llhttp at every read split, Connection-listed framing
 *           headers).
 * A tiny framework: CHECK* macros print file:line and the failing expression and count
 * failures; main returns non-zero on any failure. Checks run on the main thread only.
 */
#include "buf.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "routes.h"
#include "shdict.h"
#include "sp.h"
#include "trace.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- framework */

static int g_tests, g_checks, g_failures;

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

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* ---------------------------------------------------------------- util */

static void test_util_ieq(void)
{
    CHECK(sp_ieq("Content-Length", 14, "content-length"));
    CHECK(sp_ieq("CONTENT-LENGTH", 14, "content-length"));
    CHECK(sp_ieq("content-length", 14, "content-length"));
    CHECK(!sp_ieq("Content-Lengt", 13, "content-length"));
    CHECK(!sp_ieq("Content-Lengthx", 15, "content-length"));
    CHECK(!sp_ieq("Content-Langth", 14, "content-length"));
    CHECK(sp_ieq("", 0, ""));
    CHECK(!sp_ieq("a", 1, ""));
    /* only the span counts, not what follows it */
    CHECK(sp_ieq("HostXYZ", 4, "host"));
    /* case folding is for letters only: '[' (0x5b) is not '{' (0x7b) */
    CHECK(!sp_ieq("[", 1, "{"));
    CHECK(!sp_ieq("@", 1, "`"));
    CHECK(sp_ieq("X-Req-1", 7, "x-req-1"));
}

static void test_util_has_token(void)
{
    const char *h = "keep-alive, Upgrade";
    CHECK(sp_has_token(h, strlen(h), "upgrade"));
    CHECK(sp_has_token(h, strlen(h), "keep-alive"));
    CHECK(!sp_has_token(h, strlen(h), "close"));
    h = "\tUPGRADE\t";
    CHECK(sp_has_token(h, strlen(h), "upgrade"));
    h = "foo,,  ,upgrade";
    CHECK(sp_has_token(h, strlen(h), "upgrade"));
    CHECK(sp_has_token(h, strlen(h), "foo"));
    h = "close";
    CHECK(sp_has_token(h, strlen(h), "close"));
    h = "upgrade-x, x-upgrade, upgrades, upgrad";
    CHECK(!sp_has_token(h, strlen(h), "upgrade"));
    h = "keep alive";
    CHECK(!sp_has_token(h, strlen(h), "keep"));
    CHECK(sp_has_token(h, strlen(h), "keep alive"));
    h = " , ,\t, ";
    CHECK(!sp_has_token(h, strlen(h), "x"));
    /* the iterator underneath: every token once, trimmed, then 0 */
    h = " a ,, Bc\t,";
    size_t pos = 0, n;
    const char *t;
    n = sp_next_token(h, strlen(h), &pos, &t);
    CHECK_MEM(t, n, "a");
    n = sp_next_token(h, strlen(h), &pos, &t);
    CHECK_MEM(t, n, "Bc");
    CHECK_INT(sp_next_token(h, strlen(h), &pos, &t), 0);
    CHECK_INT(sp_next_token(h, strlen(h), &pos, &t), 0);
    CHECK(!sp_has_token("", 0, "close"));
    /* len bounds the list: "close, upgrade" cut to "close" */
    h = "close, upgrade";
    CHECK(sp_has_token(h, 5, "close"));
    CHECK(!sp_has_token(h, 5, "upgrade"));
    CHECK(!sp_has_token(h, 10, "upgrade"));
    h = "a ,\tChunked\t, b";
    CHECK(sp_has_token(h, strlen(h), "chunked"));
    CHECK(sp_has_token(h, strlen(h), "a"));
    CHECK(sp_has_token(h, strlen(h), "b"));
}

static void test_util_iso8601(void)
{
    char out[32];
    sp_iso8601(0, out);
    CHECK_STR(out, "1970-01-01T00:00:00.000Z");
    sp_iso8601(0.5, out);
    CHECK_STR(out, "1970-01-01T00:00:00.500Z");
    sp_iso8601(1.25, out);
    CHECK_STR(out, "1970-01-01T00:00:01.250Z");
    sp_iso8601(86399.75, out);
    CHECK_STR(out, "1970-01-01T23:59:59.750Z");
    sp_iso8601(1700000000.0, out);
    CHECK_STR(out, "2023-11-14T22:13:20.000Z");
    CHECK_INT(strlen(out), 24);
    sp_iso8601(951782400.0, out); /* a leap day */
    CHECK_STR(out, "2000-02-29T00:00:00.000Z");
    sp_iso8601(4102444800.0, out);
    CHECK_STR(out, "2100-01-01T00:00:00.000Z");
    sp_iso8601(1700000000.5, out);
    CHECK_STR(out, "2023-11-14T22:13:20.500Z");
    /* Fractional milliseconds that binary doubles cannot hold exactly: the nearest double to
     * x.123 is a hair below it, and must still print as .123 (a clock reading of
     * tv_nsec = 123000000 becomes exactly such a double). */
    sp_iso8601(1700000000.123, out);
    CHECK_STR(out, "2023-11-14T22:13:20.123Z");
    sp_iso8601(1.001, out);
    CHECK_STR(out, "1970-01-01T00:00:01.001Z");
    sp_iso8601(1700000000.999, out);
    CHECK_STR(out, "2023-11-14T22:13:20.999Z");
    /* the current time has the right shape */
    sp_iso8601(sp_wall_time(), out);
    CHECK_INT(strlen(out), 24);
    CHECK(out[4] == '-' && out[10] == 'T' && out[19] == '.' && out[23] == 'Z');
}

static void test_util_strndup(void)
{
    char *s = sp_strndup("hello world", 5);
    CHECK_STR(s, "hello");
    free(s);
    s = sp_strndup("abc", 0);
    CHECK_STR(s, "");
    free(s);
    s = sp_strndup("a\0b", 3);
    CHECK_MEM(s, 3, "a\0b");
    CHECK(s[3] == '\0');
    free(s);
    /* the source need not be NUL-terminated */
    char raw[4] = {'w', 'x', 'y', 'z'};
    s = sp_strndup(raw, 4);
    CHECK_STR(s, "wxyz");
    free(s);
    s = sp_strdup("copy me");
    CHECK_STR(s, "copy me");
    free(s);
}

/* ---------------------------------------------------------------- http framing */

typedef struct {
    sp_fold_t fold;
    size_t vlen;
    bool folded;
} fold_probe_t;

static int fp_field(llhttp_t *p, const char *at, size_t len)
{
    fold_probe_t *f = p->data;
    sp_fold_field(&f->fold, at + len);
    f->vlen = 0;
    return 0;
}

static int fp_value(llhttp_t *p, const char *at, size_t len)
{
    fold_probe_t *f = p->data;
    if (sp_fold_value(&f->fold, at, len, f->vlen > 0)) {
        f->folded = true;
        return HPE_USER;
    }
    f->vlen += len;
    return 0;
}

/* Parses head in two reads split at `split`, each from its own buffer as a connection's read
 * buffer would be reused; returns whether a fold was reported (*ok: parsed without error). */
static bool fold_parse(const char *head, size_t split, bool response, bool *ok)
{
    static const llhttp_settings_t st = {.on_header_field = fp_field,
                                         .on_header_value = fp_value};
    fold_probe_t f = {0};
    llhttp_t p;
    llhttp_init(&p, response ? HTTP_RESPONSE : HTTP_REQUEST, &st);
    p.data = &f;
    size_t n = strlen(head);
    char a[256], b[256];
    memcpy(a, head, split);
    memcpy(b, head + split, n - split);
    llhttp_errno_t e = HPE_OK;
    sp_fold_run(&f.fold, a);
    if (split)
        e = llhttp_execute(&p, a, split);
    if (e == HPE_OK) {
        sp_fold_skip(&f.fold, a + split);
        sp_fold_run(&f.fold, b);
        e = llhttp_execute(&p, b, n - split);
    }
    *ok = e == HPE_OK;
    return f.folded;
}

static void test_http_obs_fold(void)
{
    static const char *const plain[] = {
        "GET / HTTP/1.1\r\nX-A:\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A:   \r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: 1 2  3   \r\nHost:x\r\nY:\t\tz\t\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: \r\nB:\r\nC: \t \r\nHost: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A:\r\nContent-Length: 0\r\n\r\n",
    };
    static const char *const folded[] = {
        "GET / HTTP/1.1\r\nX-A:\r\n folded\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nTransfer-Encoding:\r\n chunked\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: \r\n\tfolded\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A:\r\n \r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: 1   \r\n  \r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\n 3\r\nHost: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A:\r\n folded\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\tchunked\r\n\r\n",
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(plain); i++)
        for (size_t k = 0; k <= strlen(plain[i]); k++) {
            bool ok;
            CHECK(!fold_parse(plain[i], k, plain[i][0] == 'H', &ok));
            CHECK(ok);
        }
    for (size_t i = 0; i < SP_ARRAY_LEN(folded); i++)
        for (size_t k = 0; k <= strlen(folded[i]); k++) {
            bool ok;
            CHECK(fold_parse(folded[i], k, folded[i][0] == 'H', &ok));
        }
}

/* W3C Trace Context level 1: which traceparent values parse, and what they yield. */
static void test_trace_parse(void)
{
    char tid[32], pid[16];
    uint8_t flags = 0xee;
    const char *ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    CHECK(sp_trace_parse(ok, strlen(ok), tid, pid, &flags));
    CHECK(memcmp(tid, "4bf92f3577b34da6a3ce929d0e0e4736", 32) == 0);
    CHECK(memcmp(pid, "00f067aa0ba902b7", 16) == 0);
    CHECK(flags == 1);
    const char *spaced = " \t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09\t ";
    CHECK(sp_trace_parse(spaced, strlen(spaced), tid, pid, &flags) && flags == 9);
    const char *later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-anything";
    CHECK(sp_trace_parse(later, strlen(later), tid, pid, &flags));
    static const char *const bad[] = {
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(bad); i++) {
        bool parsed = sp_trace_parse(bad[i], strlen(bad[i]), tid, pid, &flags);
        CHECK(!parsed);
        if (parsed)
            fprintf(stderr, "  accepted: %s\n", bad[i]);
    }
}

static void test_http_connection_framing(void)
{
    /* names and values in one buffer, as the parsed head keeps them */
    static const char head[] = "connectionkeep-alive, X-A"
                               "CONNECTIONclose ,\tCONTENT-LENGTH\t"
                               "Connectionte, upgrade";
    sp_hdr_t h[3] = {{0, 10, 10, 15}, {25, 10, 35, 23}, {58, 10, 68, 11}};
    size_t len = 0;
    const char *t = sp_connection_lists_framing(head, h, 3, &len);
    CHECK(t != NULL);
    CHECK_MEM(t, len, "CONTENT-LENGTH");
    CHECK(sp_connection_lists_framing(head, h, 1, &len) == NULL);
    CHECK(sp_connection_lists_framing(head, h + 2, 1, &len) == NULL);
    CHECK(sp_framing_header("Transfer-Encoding", 17));
    CHECK(sp_framing_header("HOST", 4));
    CHECK(!sp_framing_header("Upgrade", 7));
    CHECK(!sp_framing_header("te", 2));
}

/* ---------------------------------------------------------------- buf */

static void test_buf_growth(void)
{
    sp_buf_t b = {0};
    sp_buf_add(&b, "abc", 3);
    CHECK_MEM(b.p, b.len, "abc");
    CHECK(b.cap >= b.len);
    sp_buf_add(&b, "ignored", 0);
    CHECK_INT(b.len, 3);
    sp_buf_adds(&b, "def");
    sp_buf_addc(&b, '!');
    CHECK_MEM(b.p, b.len, "abcdef!");
    /* grow well past the first allocation, checking every byte survives */
    for (int i = 0; i < 1000; i++)
        sp_buf_addf(&b, "%04d", i);
    CHECK_INT(b.len, 7 + 4000);
    CHECK(b.cap >= b.len);
    int bad = 0;
    for (int i = 0; i < 1000; i++) {
        char want[8];
        snprintf(want, sizeof want, "%04d", i);
        if (memcmp(b.p + 7 + 4 * i, want, 4) != 0)
            bad++;
    }
    CHECK_INT(bad, 0);
    CHECK(memcmp(b.p, "abcdef!", 7) == 0);

    sp_buf_reset(&b);
    CHECK_INT(b.len, 0);
    sp_buf_addf(&b, "%d-%s-%.1f", 42, "abc", 2.5);
    CHECK_MEM(b.p, b.len, "42-abc-2.5");
    sp_buf_addf(&b, "%s", ""); /* empty output adds nothing */
    CHECK_INT(b.len, 10);

    /* one addf larger than the current capacity */
    size_t before = b.len;
    char *big = sp_malloc(10001);
    memset(big, 'q', 10000);
    big[10000] = '\0';
    sp_buf_addf(&b, "<%s>", big);
    CHECK_INT(b.len, before + 10002);
    CHECK(b.p[before] == '<' && b.p[before + 1] == 'q' && b.p[before + 10000] == 'q' &&
          b.p[before + 10001] == '>');
    free(big);

    sp_buf_reserve(&b, 100000);
    CHECK(b.cap >= b.len + 100000);
    CHECK_INT(b.len, before + 10002);
    sp_buf_free(&b);
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0);
}

static void test_buf_on_stack(void)
{
    char stack[16];
    sp_buf_t b = SP_BUF_ON(stack);
    CHECK(b.p == stack && b.cap == 16 && b.len == 0 && b.borrowed);
    sp_buf_add(&b, "0123456789", 10);
    CHECK(b.p == stack);
    sp_buf_add(&b, "abcdef", 6); /* exactly full: still on the stack */
    CHECK(b.p == stack);
    CHECK_INT(b.len, 16);
    sp_buf_addc(&b, 'X'); /* one more: moves to the heap */
    CHECK(b.p != stack);
    CHECK(!b.borrowed);
    CHECK(b.cap >= 17);
    CHECK_MEM(b.p, b.len, "0123456789abcdefX");
    CHECK(memcmp(stack, "0123456789abcdef", 16) == 0);
    for (int i = 0; i < 100; i++) /* keeps growing on the heap */
        sp_buf_adds(&b, " and more");
    CHECK_INT(b.len, 17 + 900);
    CHECK(memcmp(b.p, "0123456789abcdefX and more", 26) == 0);
    CHECK(memcmp(b.p + b.len - 9, " and more", 9) == 0);
    sp_buf_free(&b); /* frees the heap copy (LeakSanitizer would report otherwise) */
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0);

    /* a buffer that never grew: sp_buf_free must not free the stack array */
    char small[64];
    sp_buf_t c = SP_BUF_ON(small);
    sp_buf_addf(&c, "%s=%d", "x", 1);
    CHECK(c.p == small);
    CHECK_MEM(c.p, c.len, "x=1");
    sp_buf_free(&c);
    CHECK(c.p == NULL && c.len == 0);

    /* addf across the boundary (vsnprintf into the grown buffer) */
    char tiny[4];
    sp_buf_t d = SP_BUF_ON(tiny);
    sp_buf_addf(&d, "%s", "ab");
    CHECK(d.p == tiny);
    sp_buf_addf(&d, "%s", "cdefgh");
    CHECK(d.p != tiny);
    CHECK_MEM(d.p, d.len, "abcdefgh");
    sp_buf_free(&d);
}

/* The escaper byte by byte, as JSON (RFC 8259) wants it: the reference for the word-wise one. */
static size_t json_str_ref(char *out, const unsigned char *s, size_t n)
{
    size_t o = 0;
    out[o++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\')
            o += (size_t)sprintf(out + o, "\\%c", c);
        else if (c == '\n')
            o += (size_t)sprintf(out + o, "\\n");
        else if (c == '\r')
            o += (size_t)sprintf(out + o, "\\r");
        else if (c == '\t')
            o += (size_t)sprintf(out + o, "\\t");
        else if (c < 0x20 || c == 0x7f)
            o += (size_t)sprintf(out + o, "\\u%04x", c);
        else
            out[o++] = (char)c;
    }
    out[o++] = '"';
    return o;
}

/* Every byte value at every position of strings around the 8-byte word size, on plain, high
 * (0x80-0xff) and mixed backgrounds, alone and next to a second special byte. */
static void test_buf_json_str_words(void)
{
    static const unsigned char bg[] = {'a', 0xff, 0x80, 0x21, 0x7e, 0x5b};
    sp_buf_t b = {0};
    unsigned char s[24];
    char want[24 * 6 + 2];
    int bad = 0;
    for (size_t n = 1; n <= sizeof s && !bad; n++)
        for (size_t g = 0; g < sizeof bg && !bad; g++)
            for (int c = 0; c < 256 && !bad; c++)
                for (size_t p = 0; p < n && !bad; p++)
                    for (int second = 0; second < 2 && !bad; second++) {
                        memset(s, bg[g], n);
                        s[p] = (unsigned char)c;
                        if (second)
                            s[(p + 9) % n] = '\\';
                        sp_buf_reset(&b);
                        sp_buf_json_str(&b, (const char *)s, n);
                        size_t wl = json_str_ref(want, s, n);
                        if (b.len != wl || memcmp(b.p, want, wl) != 0) {
                            fprintf(stderr, "json_str: n=%zu bg=0x%02x byte 0x%02x at %zu: got %.*s want %.*s\n",
                                    n, bg[g], c, p, (int)b.len, b.p, (int)wl, want);
                            bad = 1;
                        }
                    }
    CHECK(!bad);
    sp_buf_free(&b);
}

static void test_buf_json_str(void)
{
    sp_buf_t b = {0};
    sp_buf_json_str(&b, "", 0);
    CHECK_MEM(b.p, b.len, "\"\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "plain text", 10);
    CHECK_MEM(b.p, b.len, "\"plain text\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "a\"b\\c/d", 7);
    CHECK_MEM(b.p, b.len, "\"a\\\"b\\\\c/d\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "\n\r\t", 3);
    CHECK_MEM(b.p, b.len, "\"\\n\\r\\t\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "\x01\x08\x0c\x1f\x7f", 5);
    CHECK_MEM(b.p, b.len, "\"\\u0001\\u0008\\u000c\\u001f\\u007f\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "a\0b", 3); /* embedded NUL */
    CHECK_MEM(b.p, b.len, "\"a\\u0000b\"");

    sp_buf_reset(&b);
    const char *utf8 = "h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9f\x98\x80";
    sp_buf_json_str(&b, utf8, strlen(utf8));
    CHECK_MEM(b.p, b.len, "\"h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9f\x98\x80\"");

    sp_buf_reset(&b);
    sp_buf_json_str(&b, "\x80\xff\x20", 3); /* high bytes pass through; space is not escaped */
    CHECK_MEM(b.p, b.len, "\"\x80\xff \"");

    /* only n bytes are read, and it appends to what is there */
    sp_buf_reset(&b);
    sp_buf_adds(&b, "{\"k\":");
    sp_buf_json_str(&b, "value-and-more", 5);
    sp_buf_addc(&b, '}');
    CHECK_MEM(b.p, b.len, "{\"k\":\"value\"}");

    /* a long string of control characters (6x expansion) grows correctly */
    sp_buf_reset(&b);
    char ctl[1000];
    memset(ctl, 0x02, sizeof ctl);
    sp_buf_json_str(&b, ctl, sizeof ctl);
    CHECK_INT(b.len, 2 + 6 * 1000);
    CHECK(memcmp(b.p + 1, "\\u0002", 6) == 0 && memcmp(b.p + 1 + 6 * 999, "\\u0002\"", 7) == 0);
    sp_buf_free(&b);

    /* from a stack buffer */
    char stack[8];
    sp_buf_t s = SP_BUF_ON(stack);
    sp_buf_json_str(&s, "quote\"me", 8);
    CHECK_MEM(s.p, s.len, "\"quote\\\"me\"");
    sp_buf_free(&s);
}

static void test_buf_pool(void)
{
    sp_pool_t p;
    sp_pool_init(&p, 64, 2);
    CHECK_INT(p.block_size, 64);
    CHECK_INT(p.in_use, 0);
    CHECK_INT(p.nfree, 0);
    char *a = sp_pool_get(&p), *b = sp_pool_get(&p), *c = sp_pool_get(&p);
    CHECK(a && b && c && a != b && b != c && a != c);
    CHECK_INT(p.in_use, 3);
    memset(a, 1, 64); /* whole blocks are usable (ASan checks the size) */
    memset(b, 2, 64);
    memset(c, 3, 64);
    sp_pool_put(&p, a);
    CHECK_INT(p.in_use, 2);
    CHECK_INT(p.nfree, 1);
    sp_pool_put(&p, b);
    CHECK_INT(p.nfree, 2);
    sp_pool_put(&p, c); /* beyond keep: freed, not retained */
    CHECK_INT(p.nfree, 2);
    CHECK_INT(p.in_use, 0);
    sp_pool_put(&p, NULL); /* no-op */
    CHECK_INT(p.in_use, 0);
    CHECK_INT(p.nfree, 2);
    char *d = sp_pool_get(&p); /* reused from the freelist */
    CHECK(d == a || d == b);
    CHECK_INT(p.nfree, 1);
    CHECK_INT(p.in_use, 1);
    char *e = sp_pool_get(&p);
    CHECK((e == a || e == b) && e != d);
    char *f = sp_pool_get(&p); /* freelist empty: fresh block */
    CHECK(f && f != d && f != e);
    CHECK_INT(p.nfree, 0);
    CHECK_INT(p.in_use, 3);
    sp_pool_put(&p, d);
    sp_pool_put(&p, e);
    sp_pool_put(&p, f);
    CHECK_INT(p.in_use, 0);
    sp_pool_destroy(&p);
    CHECK(p.free == NULL);
    CHECK_INT(p.nfree, 0);

    /* keep 0: nothing is retained */
    sp_pool_t q;
    sp_pool_init(&q, 32, 0);
    void *x = sp_pool_get(&q);
    CHECK_INT(q.in_use, 1);
    sp_pool_put(&q, x);
    CHECK_INT(q.nfree, 0);
    CHECK_INT(q.in_use, 0);
    sp_pool_destroy(&q);
}

/* ---------------------------------------------------------------- routes */

static void rin_field(sp_route_in_t *in, int f, const char *s)
{
    in->s[f] = s;
    in->n[f] = s ? strlen(s) : 0;
}

static sp_route_in_t rin(const char *ns, const char *name, const char *addr, int port, bool ready)
{
    sp_route_in_t in;
    memset(&in, 0, sizeof in);
    rin_field(&in, SP_RF_NAMESPACE, ns);
    rin_field(&in, SP_RF_NAME, name);
    rin_field(&in, SP_RF_ADDRESS, addr);
    in.port = port;
    in.ready = ready;
    return in;
}

static int rset(const char *key, const sp_route_in_t *in)
{
    return sp_routes_set(key, strlen(key), in);
}

static const sp_route_t *rget(const char *key, sp_buf_t *out)
{
    return sp_routes_get(key, strlen(key), out) ? (const sp_route_t *)out->p : NULL;
}

static void test_routes_set_get(void)
{
    sp_routes_init();
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    CHECK_STR(sp_route_field_names[SP_RF_NAMESPACE], "namespace");
    CHECK_STR(sp_route_field_names[SP_RF_ADDRESS], "address");
    CHECK_STR(sp_route_field_names[SP_RF_META], "meta");

    sp_buf_t out = {0};
    CHECK(rget("alice/box", &out) == NULL);
    CHECK_INT(sp_routes_version_of("alice/box", 9), 0);

    sp_route_in_t in = rin("ns-a", "box", "10.0.0.1", 8080, true);
    rin_field(&in, SP_RF_USER, "alice");
    rin_field(&in, SP_RF_META, "{\"x\":1}");
    double t0 = sp_wall_time();
    CHECK_INT(rset("alice/box", &in), 1);
    double t1 = sp_wall_time();
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);

    const sp_route_t *r = rget("alice/box", &out);
    CHECK(r != NULL);
    if (r) {
        CHECK_STR(sp_route_key(r), "alice/box");
        CHECK_INT(r->klen, 9);
        CHECK_STR(sp_route_field(r, SP_RF_NAMESPACE), "ns-a");
        CHECK_INT(r->len[SP_RF_NAMESPACE], 4);
        CHECK_STR(sp_route_field(r, SP_RF_NAME), "box");
        CHECK_INT(r->len[SP_RF_NAME], 3);
        CHECK_STR(sp_route_field(r, SP_RF_USER), "alice");
        CHECK_INT(r->len[SP_RF_USER], 5);
        CHECK_STR(sp_route_field(r, SP_RF_ADDRESS), "10.0.0.1");
        CHECK_INT(r->len[SP_RF_ADDRESS], 8);
        CHECK_STR(sp_route_field(r, SP_RF_META), "{\"x\":1}");
        CHECK_INT(r->len[SP_RF_META], 7);
        /* unset (NULL) fields are empty strings */
        CHECK_STR(sp_route_field(r, SP_RF_REASON), "");
        CHECK_INT(r->len[SP_RF_REASON], 0);
        CHECK_STR(sp_route_field(r, SP_RF_SERVICE), "");
        CHECK_STR(sp_route_field(r, SP_RF_CONFLICT), "");
        CHECK_STR(sp_route_field(r, SP_RF_MODE), "");
        CHECK_INT(r->port, 8080);
        CHECK(r->ready);
        CHECK_INT(r->size % 8, 0);
        CHECK_INT(out.len, r->size);
        CHECK(r->size >= sizeof(sp_route_t) + 10 + 5 + 4 + 6 + 9 + 8);
        CHECK(r->updated >= t0 - 0.001 && r->updated <= t1 + 0.001);
        CHECK(r->version >= 1);
        CHECK_INT(r->version, sp_routes_version_of("alice/box", 9));
        CHECK_INT(r->version, sp_routes_generation());
    }

    /* the copy is the caller's: mutating it does not change the table */
    if (r) {
        sp_route_t *w = (sp_route_t *)out.p;
        w->port = 1;
        w->ready = false;
        w->data[w->off[SP_RF_ADDRESS]] = 'X';
        w->data[0] = 'Z';
    }
    sp_buf_t out2 = {0};
    const sp_route_t *r2 = rget("alice/box", &out2);
    CHECK(r2 != NULL);
    if (r2) {
        CHECK_INT(r2->port, 8080);
        CHECK(r2->ready);
        CHECK_STR(sp_route_field(r2, SP_RF_ADDRESS), "10.0.0.1");
        CHECK_STR(sp_route_key(r2), "alice/box");
    }
    CHECK_INT(sp_routes_count_ready(), 1);

    /* keys and fields need not be NUL-terminated; empty non-NULL fields are empty */
    const char *rawkey = "bob/sbx-and-trailing-junk";
    sp_route_in_t in2;
    memset(&in2, 0, sizeof in2);
    in2.s[SP_RF_ADDRESS] = "10.1.2.3:junk";
    in2.n[SP_RF_ADDRESS] = 8;
    in2.s[SP_RF_REASON] = "";
    in2.n[SP_RF_REASON] = 0;
    in2.s[SP_RF_MODE] = NULL;
    in2.n[SP_RF_MODE] = 5; /* NULL means empty whatever the length */
    in2.port = 9;
    CHECK_INT(sp_routes_set(rawkey, 7, &in2), 1);
    r = rget("bob/sbx", &out);
    CHECK(r != NULL);
    if (r) {
        CHECK_STR(sp_route_key(r), "bob/sbx");
        CHECK_INT(r->klen, 7);
        CHECK_STR(sp_route_field(r, SP_RF_ADDRESS), "10.1.2.3");
        CHECK_INT(r->len[SP_RF_ADDRESS], 8);
        CHECK_STR(sp_route_field(r, SP_RF_REASON), "");
        CHECK_INT(r->len[SP_RF_REASON], 0);
        CHECK_STR(sp_route_field(r, SP_RF_MODE), "");
        CHECK_INT(r->len[SP_RF_MODE], 0);
        CHECK(!r->ready);
    }
    CHECK(rget("bob/sbx-and-trailing-junk", &out) == NULL);
    CHECK(rget("bob/sb", &out) == NULL);
    CHECK(rget("", &out) == NULL);
    CHECK_INT(sp_routes_count(), 2);
    CHECK_INT(sp_routes_count_ready(), 1);

    /* an empty key is a key like any other */
    sp_route_in_t e = rin(NULL, NULL, NULL, 0, false);
    CHECK_INT(sp_routes_set("", 0, &e), 1);
    CHECK(sp_routes_get("", 0, &out));
    CHECK_INT(sp_routes_count(), 3);
    CHECK(sp_routes_delete("", 0));

    sp_buf_free(&out);
    sp_buf_free(&out2);
    sp_routes_destroy();
}

static void test_routes_versions(void)
{
    sp_routes_init();
    sp_buf_t out = {0};
    uint64_t g0 = sp_routes_generation();
    sp_route_in_t in = rin("ns", "a", "10.0.0.1", 1, false);
    CHECK_INT(rset("u/a", &in), 1);
    uint64_t g1 = sp_routes_generation();
    CHECK(g1 > g0);
    uint64_t v1 = sp_routes_version_of("u/a", 3);
    CHECK(v1 > 0);
    CHECK_INT(v1, g1);

    /* replacing: returns 0, new content, newer version */
    sp_route_in_t in2 = rin("ns", "a", "10.0.0.2", 2, true);
    CHECK_INT(rset("u/a", &in2), 0);
    uint64_t g2 = sp_routes_generation();
    uint64_t v2 = sp_routes_version_of("u/a", 3);
    CHECK(g2 > g1);
    CHECK(v2 > v1);
    const sp_route_t *r = rget("u/a", &out);
    CHECK(r && r->version == v2);
    CHECK(r && r->port == 2 && r->ready);
    CHECK(r && strcmp(sp_route_field(r, SP_RF_ADDRESS), "10.0.0.2") == 0);
    CHECK_INT(sp_routes_count(), 1);

    /* setting another key does not change this key's version */
    CHECK_INT(rset("u/b", &in), 1);
    CHECK_INT(sp_routes_version_of("u/a", 3), v2);
    uint64_t g3 = sp_routes_generation();
    CHECK(g3 > g2);

    /* delete: true, generation moves; again: false, generation does not move */
    CHECK(sp_routes_delete("u/a", 3));
    uint64_t g4 = sp_routes_generation();
    CHECK(g4 > g3);
    CHECK_INT(sp_routes_version_of("u/a", 3), 0);
    CHECK(rget("u/a", &out) == NULL);
    CHECK(!sp_routes_delete("u/a", 3));
    CHECK(!sp_routes_delete("never", 5));
    CHECK_INT(sp_routes_generation(), g4);
    CHECK_INT(sp_routes_count(), 1);

    /* re-creating after delete: created again, version newer than any before */
    CHECK_INT(rset("u/a", &in), 1);
    CHECK(sp_routes_version_of("u/a", 3) > g4);
    sp_buf_free(&out);
    sp_routes_destroy();
}

static void test_routes_counts(void)
{
    sp_routes_init();
    sp_route_in_t ready = rin("ns", "n", "10.0.0.1", 80, true);
    sp_route_in_t down = rin("ns", "n", "", 0, false);
    rin_field(&down, SP_RF_REASON, "Pending");

    CHECK_INT(rset("a", &ready), 1);
    CHECK_INT(rset("b", &down), 1);
    CHECK_INT(rset("c", &ready), 1);
    CHECK_INT(sp_routes_count(), 3);
    CHECK_INT(sp_routes_count_ready(), 2);

    CHECK_INT(rset("a", &down), 0); /* ready -> not ready */
    CHECK_INT(sp_routes_count(), 3);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK_INT(rset("b", &ready), 0); /* not ready -> ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(rset("b", &ready), 0); /* ready -> ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(rset("a", &down), 0); /* not ready -> not ready */
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK_INT(sp_routes_count(), 3);

    CHECK(sp_routes_delete("a", 1)); /* not ready */
    CHECK_INT(sp_routes_count(), 2);
    CHECK_INT(sp_routes_count_ready(), 2);
    CHECK(sp_routes_delete("c", 1)); /* ready */
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK(!sp_routes_delete("c", 1));
    CHECK_INT(sp_routes_count(), 1);
    CHECK_INT(sp_routes_count_ready(), 1);
    CHECK(sp_routes_delete("b", 1));
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    sp_routes_destroy();

    /* init starts from an empty table again */
    sp_routes_init();
    CHECK_INT(sp_routes_count(), 0);
    CHECK_INT(sp_routes_count_ready(), 0);
    sp_buf_t out = {0};
    CHECK(rget("b", &out) == NULL);
    sp_buf_free(&out);
    sp_routes_destroy();
}

#define SNAP_N 10000

static int snap_key(char *buf, size_t n, int i)
{
    return snprintf(buf, n, "user%d/sandbox-%05d", i % 97, i);
}

static void test_routes_snapshot(void)
{
    sp_routes_init();
    sp_buf_t out = {0};
    CHECK_INT(sp_routes_snapshot(&out), 0);
    CHECK_INT(out.len, 0);

    size_t want_ready = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64], addr[32], name[32];
        int kl = snap_key(key, sizeof key, i);
        snprintf(addr, sizeof addr, "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        snprintf(name, sizeof name, "sandbox-%05d", i);
        sp_route_in_t in = rin("default", name, addr, 1000 + i, i % 3 == 0);
        if (i % 5 == 0)
            rin_field(&in, SP_RF_META, "{\"tier\":\"gold\"}");
        want_ready += i % 3 == 0;
        if (sp_routes_set(key, (size_t)kl, &in) != 1) {
            CHECK(!"sp_routes_set did not create a new key");
            break;
        }
    }
    CHECK_INT(sp_routes_count(), SNAP_N);
    CHECK_INT(sp_routes_count_ready(), want_ready);

    /* every key reads back with its own fields (after the shards grew) */
    int bad = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64], addr[32];
        int kl = snap_key(key, sizeof key, i);
        snprintf(addr, sizeof addr, "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        if (!sp_routes_get(key, (size_t)kl, &out)) {
            bad++;
            continue;
        }
        const sp_route_t *r = (const sp_route_t *)out.p;
        if (r->port != 1000 + i || r->ready != (i % 3 == 0) || strcmp(sp_route_key(r), key) ||
            strcmp(sp_route_field(r, SP_RF_ADDRESS), addr) ||
            strcmp(sp_route_field(r, SP_RF_META), i % 5 == 0 ? "{\"tier\":\"gold\"}" : ""))
            bad++;
    }
    CHECK_INT(bad, 0);

    /* the snapshot holds every entry once, packed, 8-aligned */
    size_t n = sp_routes_snapshot(&out);
    CHECK_INT(n, SNAP_N);
    unsigned char *seen = sp_calloc(SNAP_N, 1);
    size_t off = 0, walked = 0, ready = 0;
    int malformed = 0, dup = 0;
    while (off < out.len) {
        const sp_route_t *r = (const sp_route_t *)(out.p + off);
        if (r->size < sizeof(sp_route_t) || r->size % 8 || off + r->size > out.len) {
            malformed++;
            break;
        }
        int i = atoi(sp_route_key(r) + strlen(sp_route_key(r)) - 5);
        char key[64];
        snap_key(key, sizeof key, i);
        if (i < 0 || i >= SNAP_N || strcmp(key, sp_route_key(r)) || r->port != 1000 + i ||
            r->klen != strlen(key))
            malformed++;
        else if (seen[i]++)
            dup++;
        ready += r->ready;
        walked++;
        off += r->size;
    }
    CHECK_INT(off, out.len);
    CHECK_INT(walked, SNAP_N);
    CHECK_INT(malformed, 0);
    CHECK_INT(dup, 0);
    CHECK_INT(ready, want_ready);
    int missing = 0;
    for (int i = 0; i < SNAP_N; i++)
        missing += !seen[i];
    CHECK_INT(missing, 0);
    free(seen);

    /* delete half; the snapshot follows */
    int notdel = 0;
    for (int i = 0; i < SNAP_N; i += 2) {
        char key[64];
        int kl = snap_key(key, sizeof key, i);
        notdel += !sp_routes_delete(key, (size_t)kl);
    }
    CHECK_INT(notdel, 0);
    CHECK_INT(sp_routes_count(), SNAP_N / 2);
    CHECK_INT(sp_routes_snapshot(&out), SNAP_N / 2);
    int wrong = 0;
    for (int i = 0; i < SNAP_N; i++) {
        char key[64];
        int kl = snap_key(key, sizeof key, i);
        wrong += sp_routes_get(key, (size_t)kl, &out) != (i % 2 == 1);
    }
    CHECK_INT(wrong, 0);
    sp_buf_free(&out);
    sp_routes_destroy();
}

#define RT_THREADS 4
#define RT_OPS 20000
#define RT_KEYS 200

typedef struct {
    uint32_t seed;
    long sets, created, deleted, found, errors;
} rt_worker_t;

static int rt_key(char *buf, size_t n, int k) { return snprintf(buf, n, "u%d/sbx-%d", k % 7, k); }

static void *rt_thread(void *arg)
{
    rt_worker_t *w = arg;
    sp_buf_t out = {0};
    for (int i = 0; i < RT_OPS; i++) {
        uint32_t r = xorshift(&w->seed);
        int k = (int)(r % RT_KEYS);
        char key[32], addr[32];
        int kl = rt_key(key, sizeof key, k);
        snprintf(addr, sizeof addr, "10.0.%d.%d", k / 256, k % 256);
        switch ((r >> 12) % 3) {
        case 0: {
            sp_route_in_t in = rin("ns", key, addr, 1000 + k, (r >> 20) & 1);
            int c = sp_routes_set(key, (size_t)kl, &in);
            w->sets++;
            if (c == 1)
                w->created++;
            else if (c != 0)
                w->errors++;
            break;
        }
        case 1:
            if (sp_routes_get(key, (size_t)kl, &out)) {
                const sp_route_t *e = (const sp_route_t *)out.p;
                w->found++;
                if (out.len != e->size || e->klen != (uint32_t)kl ||
                    memcmp(sp_route_key(e), key, (size_t)kl + 1) || e->port != 1000 + k ||
                    strcmp(sp_route_field(e, SP_RF_ADDRESS), addr) ||
                    strcmp(sp_route_field(e, SP_RF_NAME), key))
                    w->errors++;
            }
            break;
        default:
            if (sp_routes_delete(key, (size_t)kl))
                w->deleted++;
            break;
        }
    }
    sp_buf_free(&out);
    return NULL;
}

static void test_routes_concurrent(void)
{
    sp_routes_init();
    uint64_t g0 = sp_routes_generation();
    pthread_t th[RT_THREADS];
    rt_worker_t w[RT_THREADS];
    for (int i = 0; i < RT_THREADS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].seed = 0x9e3779b9u * (uint32_t)(i + 1);
        CHECK_INT(pthread_create(&th[i], NULL, rt_thread, &w[i]), 0);
    }
    long sets = 0, created = 0, deleted = 0, found = 0, errors = 0;
    for (int i = 0; i < RT_THREADS; i++) {
        pthread_join(th[i], NULL);
        sets += w[i].sets;
        created += w[i].created;
        deleted += w[i].deleted;
        found += w[i].found;
        errors += w[i].errors;
    }
    CHECK_INT(errors, 0);
    CHECK(sets > 0 && deleted > 0 && found > 0);

    /* the counters agree with what is actually in the table */
    sp_buf_t out = {0};
    size_t present = 0, ready = 0;
    for (int k = 0; k < RT_KEYS; k++) {
        char key[32];
        int kl = rt_key(key, sizeof key, k);
        if (sp_routes_get(key, (size_t)kl, &out)) {
            present++;
            ready += ((const sp_route_t *)out.p)->ready;
        }
    }
    CHECK_INT(sp_routes_count(), present);
    CHECK_INT(sp_routes_count_ready(), ready);
    CHECK_INT(created - deleted, (long)present);
    CHECK_INT(sp_routes_snapshot(&out), present);
    /* every set and every successful delete moved the generation once */
    CHECK_INT(sp_routes_generation() - g0, (uint64_t)(sets + deleted));
    sp_buf_free(&out);
    sp_routes_destroy();
}

/* ---------------------------------------------------------------- shdict */

static sp_shval_t shnum(double n) { return (sp_shval_t){SP_SH_NUMBER, n, NULL, 0}; }
static sp_shval_t shstr(const char *s, size_t n) { return (sp_shval_t){SP_SH_STRING, 0, s, n}; }
static sp_shval_t shbool(bool b) { return (sp_shval_t){SP_SH_BOOL, b ? 1 : 0, NULL, 0}; }
static const sp_shval_t shnil = {SP_SH_NIL, 0, NULL, 0};

static int shset(sp_shdict_t *d, const char *k, sp_shval_t v, double ttl, int mode)
{
    return sp_shdict_set(d, k, strlen(k), &v, ttl, mode);
}

static int shget(sp_shdict_t *d, const char *k, sp_buf_t *buf, sp_shval_t *out, double *ttl)
{
    return sp_shdict_get(d, k, strlen(k), buf, out, ttl);
}

static bool shhas(sp_shdict_t *d, const char *k)
{
    sp_buf_t b = {0};
    sp_shval_t v;
    int rc = shget(d, k, &b, &v, NULL);
    sp_buf_free(&b);
    return rc == 0;
}

static sp_shdict_stats_t shstats(sp_shdict_t *d)
{
    sp_shdict_stats_t st;
    sp_shdict_stats(d, &st);
    return st;
}

static void test_shdict_create(void)
{
    char err[128] = "";
    sp_shdict_t *d = sp_shdict_create("t_create", 1 << 20, err);
    CHECK(d != NULL);
    CHECK_STR(sp_shdict_name(d), "t_create");
    CHECK(sp_shdict_find("t_create", 8) == d);
    CHECK(sp_shdict_find("t_creat", 7) == NULL);
    CHECK(sp_shdict_find("t_createx", 9) == NULL);
    CHECK(sp_shdict_find("t_create-and-more", 8) == d); /* by length */
    sp_shdict_stats_t st = shstats(d);
    CHECK_INT(st.capacity, 1 << 20);
    CHECK_INT(st.used, 0);
    CHECK_INT(st.count, 0);
    CHECK_INT(st.evictions, 0);

    err[0] = '\0';
    CHECK(sp_shdict_create("t_create", 4096, err) == NULL);
    CHECK_HAS(err, "t_create");
    CHECK_INT(shstats(d).capacity, 1 << 20); /* the first one is untouched */
}

static void test_shdict_types(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_types", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double ttl = -1;

    CHECK_INT(shget(d, "missing", &buf, &v, &ttl), -ENOENT);

    CHECK_INT(shset(d, "num", shnum(42.5), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, 42.5, 0);
    CHECK(v.str == NULL);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(shset(d, "neg", shnum(-1e300), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "neg", &buf, &v, NULL), 0); /* ttl_left may be NULL */
    CHECK_DBL(v.num, -1e300, 0);

    CHECK_INT(shset(d, "str", shstr("a\0b", 3), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "str", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "a\0b");
    CHECK(v.str && v.str[3] == '\0');
    CHECK_INT(shset(d, "empty", shstr("", 0), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "empty", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_INT(v.len, 0);
    CHECK(v.str && v.str[0] == '\0');

    CHECK_INT(shset(d, "t", shbool(true), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "f", shbool(false), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "t", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_BOOL);
    CHECK_DBL(v.num, 1, 0);
    CHECK_INT(shget(d, "f", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_BOOL);
    CHECK_DBL(v.num, 0, 0);

    /* overwrite with another type */
    CHECK_INT(shset(d, "num", shstr("now a string", 12), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "now a string");
    CHECK_INT(shset(d, "num", shnum(7), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "num", &buf, &v, &ttl), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, 7, 0);

    /* binary keys: "k" and "k\0" are different */
    sp_shval_t one = shnum(1), two = shnum(2);
    CHECK_INT(sp_shdict_set(d, "k", 1, &one, 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_set(d, "k\0", 2, &two, 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_get(d, "k", 1, &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 1, 0);
    CHECK_INT(sp_shdict_get(d, "k\0", 2, &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 2, 0);

    /* a string value into a stack buffer */
    char stack[4];
    sp_buf_t sb = SP_BUF_ON(stack);
    CHECK_INT(shget(d, "str", &sb, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "a\0b");
    CHECK(v.str == stack);
    CHECK_INT(shset(d, "long", shstr("longer than four", 16), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "long", &sb, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "longer than four");
    sp_buf_free(&sb);

    CHECK_INT(shstats(d).count, 9);
    sp_buf_free(&buf);
}

static void test_shdict_modes(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_modes", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;

    CHECK_INT(shset(d, "a", shnum(1), 0, SP_SH_ADD), 0);
    CHECK_INT(shset(d, "a", shnum(2), 0, SP_SH_ADD), -EEXIST);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 1, 0); /* unchanged */

    CHECK_INT(shset(d, "r", shnum(1), 0, SP_SH_REPLACE), -ENOENT);
    CHECK(!shhas(d, "r"));
    CHECK_INT(shset(d, "a", shnum(3), 0, SP_SH_REPLACE), 0);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 3, 0);
    CHECK_INT(shset(d, "a", shnum(4), 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "a", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, 4, 0);
    CHECK_INT(shstats(d).count, 1);

    /* a NIL value deletes */
    CHECK_INT(shset(d, "b", shnum(5), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).count, 2);
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_SET), 0);
    CHECK_INT(shget(d, "b", &buf, &v, NULL), -ENOENT);
    CHECK_INT(shstats(d).count, 1);
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_SET), 0); /* deleting a missing key is fine */
    CHECK_INT(shset(d, "b", shnil, 0, SP_SH_REPLACE), -ENOENT);

    /* delete */
    CHECK_INT(sp_shdict_delete(d, "a", 1), 0);
    CHECK_INT(sp_shdict_delete(d, "a", 1), -ENOENT);
    CHECK(!shhas(d, "a"));
    CHECK_INT(shstats(d).count, 0);
    CHECK_INT(shstats(d).used, 0);
    sp_buf_free(&buf);
}

static void test_shdict_incr(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_incr", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double out = -1, ttl = -1;

    CHECK_INT(shset(d, "n", shnum(10), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, 5, false, 0, 0, &out), 0);
    CHECK_DBL(out, 15, 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, -20, false, 0, 0, &out), 0);
    CHECK_DBL(out, -5, 0);
    CHECK_INT(sp_shdict_incr(d, "n", 1, 0.25, true, 1000, 0, &out), 0); /* init ignored */
    CHECK_DBL(out, -4.75, 0);
    CHECK_INT(shget(d, "n", &buf, &v, NULL), 0);
    CHECK_INT(v.type, SP_SH_NUMBER);
    CHECK_DBL(v.num, -4.75, 0);

    /* missing without init: -ENOENT and still missing */
    out = -1;
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, false, 0, 0, &out), -ENOENT);
    CHECK(!shhas(d, "m"));
    /* missing with init: init + delta */
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, true, 100, 0, &out), 0);
    CHECK_DBL(out, 101, 0);
    CHECK_INT(shget(d, "m", &buf, &v, &ttl), 0);
    CHECK_DBL(v.num, 101, 0);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(sp_shdict_incr(d, "m", 1, 1, true, 100, 0, &out), 0);
    CHECK_DBL(out, 102, 0);

    /* init_ttl applies to the created key */
    CHECK_INT(sp_shdict_incr(d, "w", 1, 2, true, 0, 10, &out), 0);
    CHECK_DBL(out, 2, 0);
    CHECK_INT(shget(d, "w", &buf, &v, &ttl), 0);
    CHECK(ttl > 9 && ttl <= 10);

    /* not a number: -EINVAL, value untouched */
    CHECK_INT(shset(d, "s", shstr("abc", 3), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "s", 1, 1, true, 0, 0, &out), -EINVAL);
    CHECK_INT(shget(d, "s", &buf, &v, NULL), 0);
    CHECK_INT(v.type, SP_SH_STRING);
    CHECK_MEM(v.str, v.len, "abc");
    CHECK_INT(shset(d, "b", shbool(true), 0, SP_SH_SET), 0);
    CHECK_INT(sp_shdict_incr(d, "b", 1, 1, false, 0, 0, &out), -EINVAL);
    sp_buf_free(&buf);
}

static void test_shdict_ttl(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_ttl", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    sp_buf_t buf = {0};
    sp_shval_t v;
    double ttl = -1;

    CHECK_INT(shset(d, "short", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "long", shstr("x", 1), 30, SP_SH_SET), 0);
    CHECK_INT(shset(d, "forever", shnum(3), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "expire", shnum(4), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "unexpire", shnum(5), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "reset", shnum(6), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "reset", shnum(6), 0, SP_SH_SET), 0); /* a plain set clears the TTL */

    CHECK_INT(shget(d, "short", &buf, &v, &ttl), 0);
    CHECK(ttl > 0 && ttl <= 0.05 + 1e-9);
    CHECK_INT(shget(d, "long", &buf, &v, &ttl), 0);
    CHECK(ttl > 29 && ttl <= 30 + 1e-9); /* now + 30 - now rounds in binary */
    CHECK_INT(shget(d, "forever", &buf, &v, &ttl), 0);
    CHECK_DBL(ttl, 0, 0);

    CHECK_INT(sp_shdict_expire(d, "expire", 6, 0.05), 0);
    CHECK_INT(shget(d, "expire", &buf, &v, &ttl), 0);
    CHECK(ttl > 0 && ttl <= 0.05 + 1e-9);
    CHECK_INT(sp_shdict_expire(d, "unexpire", 8, 0), 0); /* removes the TTL */
    CHECK_INT(shget(d, "unexpire", &buf, &v, &ttl), 0);
    CHECK_DBL(ttl, 0, 0);
    CHECK_INT(sp_shdict_expire(d, "nothere", 7, 1), -ENOENT);

    sleep_s(0.1);
    CHECK_INT(shget(d, "short", &buf, &v, &ttl), -ENOENT);
    CHECK_INT(shget(d, "expire", &buf, &v, &ttl), -ENOENT);
    CHECK_INT(shget(d, "long", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "forever", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "unexpire", &buf, &v, &ttl), 0);
    CHECK_INT(shget(d, "reset", &buf, &v, &ttl), 0);
    CHECK_INT(shstats(d).count, 4); /* expired entries were dropped when touched */

    /* an expired key behaves as missing for ADD, REPLACE, incr and expire */
    CHECK_INT(shset(d, "a", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "r", shnum(1), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "i", shnum(50), 0.05, SP_SH_SET), 0);
    CHECK_INT(shset(d, "e", shnum(1), 0.05, SP_SH_SET), 0);
    sleep_s(0.1);
    CHECK_INT(shset(d, "a", shnum(2), 0, SP_SH_ADD), 0);
    CHECK_INT(shset(d, "r", shnum(2), 0, SP_SH_REPLACE), -ENOENT);
    double out = 0;
    CHECK_INT(sp_shdict_incr(d, "i", 1, 1, false, 0, 0, &out), -ENOENT);
    CHECK_INT(sp_shdict_expire(d, "e", 1, 10), -ENOENT);
    sp_buf_free(&buf);
}

static void test_shdict_lru(void)
{
    char err[128];
    /* the size of one entry with a 2-byte key and a number, as the dict accounts it */
    sp_shdict_t *probe = sp_shdict_create("t_lru_probe", 1 << 20, err);
    CHECK(probe != NULL);
    if (!probe)
        return;
    CHECK_INT(shset(probe, "k0", shnum(0), 0, SP_SH_SET), 0);
    size_t S = shstats(probe).used;
    CHECK(S >= 2);
    CHECK_INT(shset(probe, "k1", shstr("abcd", 4), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(probe).used, 2 * S + 4); /* strings count their bytes */

    sp_shdict_t *d = sp_shdict_create("t_lru", 8 * S + S / 2, err);
    CHECK(d != NULL);
    if (!d)
        return;
    char key[8];
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "k%d", i);
        CHECK_INT(shset(d, key, shnum(i), 0, SP_SH_SET), 0);
    }
    sp_shdict_stats_t st = shstats(d);
    CHECK_INT(st.count, 8);
    CHECK_INT(st.used, 8 * S);
    CHECK_INT(st.evictions, 0);

    /* reading k0 and k1 makes them recent; k2 and k3 are now the oldest */
    CHECK(shhas(d, "k0"));
    CHECK(shhas(d, "k1"));
    CHECK_INT(shset(d, "k8", shnum(8), 0, SP_SH_SET), 0);
    CHECK_INT(shset(d, "k9", shnum(9), 0, SP_SH_SET), 0);
    st = shstats(d);
    CHECK_INT(st.count, 8);
    CHECK_INT(st.used, 8 * S);
    CHECK_INT(st.evictions, 2);
    CHECK(st.used <= st.capacity);
    CHECK(!shhas(d, "k2"));
    CHECK(!shhas(d, "k3"));
    for (int i = 0; i < 10; i++) {
        if (i == 2 || i == 3)
            continue;
        snprintf(key, sizeof key, "k%d", i);
        if (!shhas(d, key))
            CHECK(!"a recently used or new key was evicted");
    }

    /* the reads above left k0, k1, k4 as the oldest; incr and set count as use too, so
     * after touching k0 and k1 the next insert evicts k4 */
    double out;
    CHECK_INT(sp_shdict_incr(d, "k0", 2, 1, false, 0, 0, &out), 0);
    CHECK_INT(shset(d, "k1", shnum(11), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).evictions, 2); /* overwriting in place evicts nothing */
    CHECK_INT(shset(d, "ka", shnum(10), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).evictions, 3);
    CHECK(!shhas(d, "k4"));
    CHECK(shhas(d, "k0"));
    CHECK(shhas(d, "k1"));
    CHECK(shhas(d, "k5"));

    /* E2BIG: larger than the whole dict; the old value stays */
    CHECK_INT(shset(d, "ka", shstr("v", 1), 0, SP_SH_SET), 0);
    size_t cap = shstats(d).capacity;
    char *big = sp_malloc(cap + 1);
    memset(big, 'b', cap + 1);
    CHECK_INT(sp_shdict_set(d, "ka", 2, &(sp_shval_t){SP_SH_STRING, 0, big, cap}, 0, SP_SH_SET),
              -E2BIG);
    sp_buf_t buf = {0};
    sp_shval_t v;
    CHECK_INT(shget(d, "ka", &buf, &v, NULL), 0);
    CHECK_MEM(v.str, v.len, "v");
    /* an entry exactly the capacity fits, evicting every other entry */
    uint64_t ev = shstats(d).evictions;
    size_t others = shstats(d).count - 1;
    size_t exact = cap - S; /* S: entry overhead of a 2-byte key */
    CHECK_INT(sp_shdict_set(d, "ka", 2, &(sp_shval_t){SP_SH_STRING, 0, big, exact}, 0,
                            SP_SH_SET),
              0);
    st = shstats(d);
    CHECK_INT(st.count, 1);
    CHECK_INT(st.used, cap);
    CHECK_INT(st.evictions, ev + others);
    CHECK_INT(shget(d, "ka", &buf, &v, NULL), 0);
    CHECK_INT(v.len, exact);
    CHECK_INT(sp_shdict_set(d, "kb", 2, &(sp_shval_t){SP_SH_STRING, 0, big, exact + 1}, 0,
                            SP_SH_SET),
              -E2BIG);
    CHECK_INT(shstats(d).count, 1);
    free(big);

    /* flush empties the dict; it stays usable */
    sp_shdict_flush(d);
    st = shstats(d);
    CHECK_INT(st.count, 0);
    CHECK_INT(st.used, 0);
    CHECK_INT(st.capacity, cap);
    CHECK(!shhas(d, "ka"));
    CHECK_INT(shset(d, "k0", shnum(1), 0, SP_SH_SET), 0);
    CHECK_INT(shstats(d).count, 1);

    /* expired entries make room before live ones are evicted (and are not evictions) */
    sp_shdict_t *e = sp_shdict_create("t_lru_ttl", 4 * S + S / 2, err);
    CHECK(e != NULL);
    if (e) {
        CHECK_INT(shset(e, "k0", shnum(0), 0, SP_SH_SET), 0);   /* oldest, live */
        CHECK_INT(shset(e, "k1", shnum(1), 0.05, SP_SH_SET), 0); /* expires */
        CHECK_INT(shset(e, "k2", shnum(2), 0, SP_SH_SET), 0);
        CHECK_INT(shset(e, "k3", shnum(3), 0, SP_SH_SET), 0);
        sleep_s(0.1);
        CHECK_INT(shset(e, "k4", shnum(4), 0, SP_SH_SET), 0);
        st = shstats(e);
        CHECK_INT(st.evictions, 0);
        CHECK_INT(st.count, 4);
        CHECK(shhas(e, "k0"));
        CHECK(!shhas(e, "k1"));
    }
    sp_buf_free(&buf);
}

static void test_shdict_grow(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_grow", 64 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    const int n = 5000; /* well past the initial 1024 buckets */
    for (int i = 0; i < n; i++) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        sp_shval_t v = shnum(i);
        if (sp_shdict_set(d, key, (size_t)kl, &v, 0, SP_SH_SET) != 0) {
            CHECK(!"set failed");
            break;
        }
    }
    CHECK_INT(shstats(d).count, n);
    CHECK_INT(shstats(d).evictions, 0);
    sp_buf_t buf = {0};
    int bad = 0;
    for (int i = 0; i < n; i++) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        sp_shval_t v;
        if (sp_shdict_get(d, key, (size_t)kl, &buf, &v, NULL) != 0 || v.num != i)
            bad++;
    }
    CHECK_INT(bad, 0);
    for (int i = 0; i < n; i += 2) {
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%d", i);
        bad += sp_shdict_delete(d, key, (size_t)kl) != 0;
    }
    CHECK_INT(bad, 0);
    CHECK_INT(shstats(d).count, n / 2);
    sp_buf_free(&buf);
}

#define INC_THREADS 4
#define INC_OPS 50000

typedef struct {
    sp_shdict_t *d;
    double *seen; /* every value incr returned */
    long errors;
} inc_worker_t;

static void *inc_thread(void *arg)
{
    inc_worker_t *w = arg;
    for (int i = 0; i < INC_OPS; i++) {
        double out = -1;
        if (sp_shdict_incr(w->d, "hits", 4, 1, true, 0, 0, &out) != 0)
            w->errors++;
        w->seen[i] = out;
    }
    return NULL;
}

static void test_shdict_incr_threads(void)
{
    char err[128];
    sp_shdict_t *d = sp_shdict_create("t_incr_threads", 1 << 20, err);
    CHECK(d != NULL);
    if (!d)
        return;
    pthread_t th[INC_THREADS];
    inc_worker_t w[INC_THREADS];
    for (int i = 0; i < INC_THREADS; i++) {
        w[i].d = d;
        w[i].seen = sp_malloc(INC_OPS * sizeof(double));
        w[i].errors = 0;
        CHECK_INT(pthread_create(&th[i], NULL, inc_thread, &w[i]), 0);
    }
    long errors = 0;
    for (int i = 0; i < INC_THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += w[i].errors;
    }
    CHECK_INT(errors, 0);
    sp_buf_t buf = {0};
    sp_shval_t v;
    CHECK_INT(shget(d, "hits", &buf, &v, NULL), 0);
    CHECK_DBL(v.num, INC_THREADS * INC_OPS, 0);
    /* each value 1..N was handed out exactly once; each thread saw increasing values */
    const int total = INC_THREADS * INC_OPS;
    unsigned char *mark = sp_calloc((size_t)total + 1, 1);
    int bad = 0, order = 0;
    for (int t = 0; t < INC_THREADS; t++) {
        for (int i = 0; i < INC_OPS; i++) {
            double x = w[t].seen[i];
            if (x < 1 || x > total || x != (int)x || mark[(int)x]++)
                bad++;
            if (i && x <= w[t].seen[i - 1])
                order++;
        }
        free(w[t].seen);
    }
    CHECK_INT(bad, 0);
    CHECK_INT(order, 0);
    free(mark);
    sp_buf_free(&buf);
}

static void test_shdict_iterate(void)
{
    char err[128];
    const char *names[] = {"t_iter_a", "t_iter_b", "t_iter_c"};
    for (size_t i = 0; i < SP_ARRAY_LEN(names); i++)
        CHECK(sp_shdict_create(names[i], 4096, err) != NULL);
    int found[3] = {0, 0, 0}, n = 0;
    for (sp_shdict_t *d = sp_shdict_next(NULL); d && n < 1000; d = sp_shdict_next(d)) {
        n++;
        for (size_t i = 0; i < SP_ARRAY_LEN(names); i++)
            if (strcmp(sp_shdict_name(d), names[i]) == 0)
                found[i]++;
        CHECK(sp_shdict_find(sp_shdict_name(d), strlen(sp_shdict_name(d))) == d);
    }
    CHECK(n >= 3 && n < 1000);
    CHECK_INT(found[0], 1);
    CHECK_INT(found[1], 1);
    CHECK_INT(found[2], 1);
}

static void test_shdict_destroy_all(void)
{
    char err[128];
    sp_shdict_destroy_all();
    CHECK(sp_shdict_next(NULL) == NULL);
    CHECK(sp_shdict_find("t_types", 7) == NULL);
    /* names are free again */
    sp_shdict_t *d = sp_shdict_create("t_types", 4096, err);
    CHECK(d != NULL);
    if (d) {
        CHECK_INT(shset(d, "x", shstr("y", 1), 0, SP_SH_SET), 0);
        CHECK(shhas(d, "x"));
    }
    CHECK(sp_shdict_next(NULL) == d);
    CHECK(d == NULL || sp_shdict_next(d) == NULL);
    sp_shdict_destroy_all(); /* frees the entries too (LeakSanitizer) */
    CHECK(sp_shdict_next(NULL) == NULL);
}

/* ---------------------------------------------------------------- config */

static void config_free(sp_config_t *c)
{
    char **strs[] = {&c->listen,         &c->demo_listen,      &c->metrics_listen,
                     &c->scripts_dir,    &c->builtin_dir,      &c->config_file,
                     &c->sandboxes_file, &c->log_level,        &c->kube_api,
                     &c->kube_token_file, &c->kube_ca_file,    &c->kubeconfig,
                     &c->kube_api_version, &c->kube_namespace, &c->kube_label_selector,
                     &c->kube_serviceaccount_dir};
    for (size_t i = 0; i < SP_ARRAY_LEN(strs); i++) {
        free(*strs[i]);
        *strs[i] = NULL;
    }
}

static void test_config_defaults(void)
{
    sp_config_t c;
    memset(&c, 0, sizeof c);
    sp_config_defaults(&c);
    CHECK_STR(c.listen, "0.0.0.0:8080");
    CHECK_STR(c.demo_listen, "127.0.0.1:8888");
    CHECK_STR(c.log_level, "info");
    CHECK(c.metrics_listen == NULL);
    CHECK(c.kube_api == NULL);
    CHECK_INT(c.workers, 0);
    CHECK_INT(c.max_connections, 10000);
    CHECK_INT(c.max_headers, 100);
    CHECK_INT(c.upstream_buffer_size, 65536);
    CHECK_INT(c.kube_page_size, 500);
    CHECK_DBL(c.header_timeout, 10, 0);
    CHECK_DBL(c.connect_retry_delay, 0.2, 0);
    CHECK_DBL(c.max_body_size, 0, 0);
    CHECK(!c.kube_insecure_skip_verify);
    config_free(&c);
}

static void test_config_set(void)
{
    sp_config_t c;
    memset(&c, 0, sizeof c);
    sp_config_defaults(&c);
    char err[256];

    CHECK_INT(sp_config_set(&c, "workers", "8", err), 0);
    CHECK_INT(c.workers, 8);
    CHECK_INT(sp_config_set(&c, "workers", "256", err), 0); /* the bounds are inclusive */
    CHECK_INT(c.workers, 256);
    CHECK_INT(sp_config_set(&c, "workers", "0", err), 0);
    CHECK_INT(c.workers, 0);
    CHECK_INT(sp_config_set(&c, "max_url_size", "64", err), 0);
    CHECK_INT(c.max_url_size, 64);
    CHECK_INT(sp_config_set(&c, "workers", "4.0", err), 0); /* integral value */
    CHECK_INT(c.workers, 4);
    CHECK_INT(sp_config_set(&c, "header_timeout", "2.5", err), 0);
    CHECK_DBL(c.header_timeout, 2.5, 0);
    CHECK_INT(sp_config_set(&c, "connect_retry_delay", "0.001", err), 0);
    CHECK_DBL(c.connect_retry_delay, 0.001, 0);
    CHECK_INT(sp_config_set(&c, "max_body_size", "1e9", err), 0);
    CHECK_DBL(c.max_body_size, 1e9, 0);

    const char *yes[] = {"true", "1", "yes"}, *no[] = {"false", "0", "no"};
    for (size_t i = 0; i < 3; i++) {
        CHECK_INT(sp_config_set(&c, "kube_insecure_skip_verify", yes[i], err), 0);
        CHECK(c.kube_insecure_skip_verify);
        CHECK_INT(sp_config_set(&c, "kube_insecure_skip_verify", no[i], err), 0);
        CHECK(!c.kube_insecure_skip_verify);
    }

    CHECK_INT(sp_config_set(&c, "listen", "127.0.0.1:9000", err), 0); /* frees the old one */
    CHECK_STR(c.listen, "127.0.0.1:9000");
    CHECK_INT(sp_config_set(&c, "kube_api", "http://127.0.0.1:8001", err), 0);
    CHECK_STR(c.kube_api, "http://127.0.0.1:8001");
    CHECK_INT(sp_config_set(&c, "kube_api", "", err), 0);
    CHECK_STR(c.kube_api, "");

    /* errors: -1, a message naming the knob, the value unchanged */
    CHECK_INT(c.workers, 4);
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "no_such_knob", "1", err), -1);
    CHECK_HAS(err, "no_such_knob");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "abc", err), -1);
    CHECK_HAS(err, "workers");
    CHECK_HAS(err, "abc");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "", err), -1);
    CHECK_HAS(err, "workers");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "8x", err), -1);
    CHECK_HAS(err, "workers");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "257", err), -1);
    CHECK_HAS(err, "workers");
    CHECK_HAS(err, "range");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "-1", err), -1);
    CHECK_HAS(err, "workers");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "max_url_size", "63", err), -1);
    CHECK_HAS(err, "max_url_size");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "workers", "2.5", err), -1);
    CHECK_HAS(err, "workers");
    CHECK_HAS(err, "integer");
    CHECK_INT(c.workers, 4);
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "header_timeout", "0.001", err), -1); /* min 0.01 */
    CHECK_HAS(err, "header_timeout");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "header_timeout", "1e400", err), -1); /* overflows */
    CHECK_HAS(err, "header_timeout");
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "header_timeout", "inf", err), -1);
    CHECK_HAS(err, "header_timeout");
    CHECK_DBL(c.header_timeout, 2.5, 0);
    /* NaN compares false against both bounds; it must still be rejected */
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "header_timeout", "nan", err), -1);
    CHECK_HAS(err, "header_timeout");
    CHECK_DBL(c.header_timeout, 2.5, 0);
    err[0] = '\0';
    CHECK_INT(sp_config_set(&c, "kube_insecure_skip_verify", "maybe", err), -1);
    CHECK_HAS(err, "kube_insecure_skip_verify");
    CHECK_HAS(err, "maybe");
    CHECK(!c.kube_insecure_skip_verify);
    config_free(&c);
}

/* Writes text to a new temporary file; its path goes into path[64]. */
static bool write_temp(char path[64], const char *text)
{
    snprintf(path, 64, "/tmp/sp_test_cfg_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0)
        return false;
    size_t n = strlen(text);
    bool ok = write(fd, text, n) == (ssize_t)n;
    close(fd);
    return ok;
}

/* Loads text as a config file into c; err filled on failure. */
static int load_text(sp_config_t *c, const char *text, char err[256], char path[64])
{
    if (!write_temp(path, text)) {
        snprintf(err, 256, "cannot write a temporary file");
        return -2;
    }
    err[0] = '\0';
    int rc = sp_config_load_file(c, path, err);
    unlink(path);
    return rc;
}

static void test_config_load_file(void)
{
    sp_config_t c;
    memset(&c, 0, sizeof c);
    sp_config_defaults(&c);
    char err[256], path[64];

    CHECK_INT(load_text(&c,
                        "-- a config file\n"
                        "return {\n"
                        "  workers = 4,\n"
                        "  header_timeout = 1.5,\n"
                        "  connect_retry_delay = 0.2,\n"
                        "  listen = '127.0.0.1:1234',\n"
                        "  kube_insecure_skip_verify = true,\n"
                        "  max_body_size = 1048576,\n"
                        "  max_headers = '50',\n"
                        "}\n",
                        err, path),
              0);
    CHECK_INT(c.workers, 4);
    CHECK_DBL(c.header_timeout, 1.5, 0);
    CHECK_DBL(c.connect_retry_delay, 0.2, 0);
    CHECK_STR(c.listen, "127.0.0.1:1234");
    CHECK(c.kube_insecure_skip_verify);
    CHECK_DBL(c.max_body_size, 1048576, 0);
    CHECK_INT(c.max_headers, 50);

    /* script sections (tables) are ignored */
    CHECK_INT(load_text(&c,
                        "local x = 3\n"
                        "return { workers = x, kube_insecure_skip_verify = false,\n"
                        "  router = { default = 'x', list = {1, 2, 3} }, ratelimit = {} }\n",
                        err, path),
              0);
    CHECK_INT(c.workers, 3);
    CHECK(!c.kube_insecure_skip_verify);
    CHECK_STR(c.listen, "127.0.0.1:1234");

    /* an unknown key */
    CHECK_INT(load_text(&c, "return { workers = 2, bogus_knob = 1 }\n", err, path), -1);
    CHECK_HAS(err, "bogus_knob");
    CHECK_HAS(err, path);

    /* a bad value: the message names the knob */
    CHECK_INT(load_text(&c, "return { workers = 2.5 }\n", err, path), -1);
    CHECK_HAS(err, "workers");
    CHECK_INT(load_text(&c, "return { max_connections = 0 }\n", err, path), -1);
    CHECK_HAS(err, "max_connections");
    CHECK_INT(load_text(&c, "return { kube_insecure_skip_verify = 'perhaps' }\n", err, path), -1);
    CHECK_HAS(err, "kube_insecure_skip_verify");
    CHECK_INT(load_text(&c, "return { listen = function() end }\n", err, path), -1);
    CHECK_HAS(err, "listen");

    /* not a table */
    CHECK_INT(load_text(&c, "return 42\n", err, path), -1);
    CHECK_HAS(err, "table");
    CHECK_INT(load_text(&c, "local x = 1\n", err, path), -1);
    CHECK_HAS(err, "table");
    CHECK_INT(load_text(&c, "return 'workers = 4'\n", err, path), -1);
    CHECK_HAS(err, "table");
    /* keys must be names */
    CHECK_INT(load_text(&c, "return { 1, 2 }\n", err, path), -1);
    CHECK_HAS(err, "keys");

    /* a syntax error and a runtime error: the message names the file */
    CHECK_INT(load_text(&c, "return { workers = \n", err, path), -1);
    CHECK_HAS(err, path);
    CHECK_INT(load_text(&c, "error('boom from config')\n", err, path), -1);
    CHECK_HAS(err, "boom from config");

    /* a missing file */
    err[0] = '\0';
    CHECK_INT(sp_config_load_file(&c, "/nonexistent/sp_test.lua", err), -1);
    CHECK_HAS(err, "/nonexistent/sp_test.lua");

    /* the last good values survived the failed loads (earlier keys of a failed file may apply) */
    CHECK_DBL(c.header_timeout, 1.5, 0);
    CHECK_STR(c.listen, "127.0.0.1:1234");
    config_free(&c);
}

static void test_config_dump_help(void)
{
    sp_config_t c;
    memset(&c, 0, sizeof c);
    sp_config_defaults(&c);
    char err[256];
    CHECK_INT(sp_config_set(&c, "workers", "4", err), 0);
    CHECK_INT(sp_config_set(&c, "listen", "a\"b", err), 0);
    sp_buf_t b = {0};
    sp_config_dump_json(&c, &b);
    sp_buf_addc(&b, '\0');
    CHECK(b.p[0] == '{' && b.p[b.len - 2] == '}');
    CHECK_HAS(b.p, "\"workers\":4");
    CHECK_HAS(b.p, "\"listen\":\"a\\\"b\"");
    CHECK_HAS(b.p, "\"metrics_listen\":null");
    CHECK_HAS(b.p, "\"kube_insecure_skip_verify\":false");
    CHECK_HAS(b.p, "\"header_timeout\":10");
    sp_buf_free(&b);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    CHECK(f != NULL);
    if (f) {
        sp_config_print_help(f);
        fclose(f);
        CHECK_HAS(text, "max_connections");
        CHECK_HAS(text, "kube_token_refresh");
        CHECK_HAS(text, "(default: 10000)");
        free(text);
    }
    config_free(&c);
}

/* ---------------------------------------------------------------- log */

static void test_log_levels(void)
{
    CHECK_INT(sp_log_level_parse("debug"), SP_LOG_DEBUG);
    CHECK_INT(sp_log_level_parse("info"), SP_LOG_INFO);
    CHECK_INT(sp_log_level_parse("warn"), SP_LOG_WARN);
    CHECK_INT(sp_log_level_parse("error"), SP_LOG_ERROR);
    CHECK_INT(sp_log_level_parse("WARN"), -1);
    CHECK_INT(sp_log_level_parse("warning"), -1);
    CHECK_INT(sp_log_level_parse(""), -1);
    CHECK_INT(sp_log_level_parse("fatal"), -1);
    CHECK_STR(sp_log_level_name(SP_LOG_DEBUG), "debug");
    CHECK_STR(sp_log_level_name(SP_LOG_INFO), "info");
    CHECK_STR(sp_log_level_name(SP_LOG_WARN), "warn");
    CHECK_STR(sp_log_level_name(SP_LOG_ERROR), "error");
    CHECK_STR(sp_log_level_name(-1), "info");
    CHECK_STR(sp_log_level_name(4), "info");
    for (int l = SP_LOG_DEBUG; l <= SP_LOG_ERROR; l++)
        CHECK_INT(sp_log_level_parse(sp_log_level_name(l)), l);
}

/* Redirects fd 2 into a pipe; capture_stderr_end restores it and returns what was written
 * (the caller frees it). No CHECK may run in between: its output would be captured. */
static bool capture_stderr_begin(int pipefd[2], int *saved)
{
    if (pipe(pipefd) != 0)
        return false;
    fflush(stderr);
    *saved = dup(2);
    dup2(pipefd[1], 2);
    return true;
}

static char *capture_stderr_end(int pipefd[2], int saved)
{
    dup2(saved, 2);
    close(saved);
    close(pipefd[1]);
    sp_buf_t b = {0};
    char chunk[4096];
    ssize_t n;
    while ((n = read(pipefd[0], chunk, sizeof chunk)) > 0)
        sp_buf_add(&b, chunk, (size_t)n);
    close(pipefd[0]);
    sp_buf_addc(&b, '\0');
    return b.p;
}

static void test_log_output(void)
{
    int pipefd[2], saved, old_min = sp_log_min_level;
    char longmsg[2001];
    memset(longmsg, 'm', 2000);
    longmsg[2000] = '\0';
    if (!capture_stderr_begin(pipefd, &saved)) {
        CHECK(!"pipe failed");
        return;
    }
    sp_log_min_level = SP_LOG_INFO;
    sp_log(SP_LOG_DEBUG, "hidden", NULL); /* below the minimum level */
    sp_log(SP_LOG_WARN, "say \"hi\"", "s:user", "bob", "s:none", (const char *)NULL, "S:span",
           "abcdef", (size_t)3, "i:n", (int64_t)-5, "d:f", 1.5, "b:ok", 1, "j:raw", "{\"a\":1}",
           NULL);
    sp_log(SP_LOG_ERROR, longmsg, NULL); /* longer than the 1024-byte stack buffer */
    sp_log_min_level = old_min;
    char *text = capture_stderr_end(pipefd, saved);

    CHECK(strstr(text, "hidden") == NULL);
    CHECK_HAS(text, "\"level\":\"warn\",\"msg\":\"say \\\"hi\\\"\"");
    CHECK_HAS(text, ",\"user\":\"bob\",\"none\":null,\"span\":\"abc\",\"n\":-5,\"f\":1.5,"
                    "\"ok\":true,\"raw\":{\"a\":1}}\n");
    CHECK(strncmp(text, "{\"time\":\"", 9) == 0);
    CHECK(strlen(text) > 9 + 24 && text[9 + 23] == 'Z' && text[9 + 24] == '"');
    const char *second = strchr(text, '\n');
    CHECK(second != NULL);
    if (second) {
        second++;
        CHECK_HAS(second, "\"level\":\"error\"");
        CHECK_HAS(second, longmsg);
        CHECK_INT(strlen(second), strlen("{\"time\":\"1970-01-01T00:00:00.000Z\",\"level\":"
                                         "\"error\",\"msg\":\"\"}\n") +
                                      2000);
    }
    free(text);
}

/* ---------------------------------------------------------------- main */

int main(void)
{
    RUN(test_util_ieq);
    RUN(test_util_has_token);
    RUN(test_util_iso8601);
    RUN(test_util_strndup);
    RUN(test_http_obs_fold);
    RUN(test_trace_parse);
    RUN(test_http_connection_framing);

    RUN(test_buf_growth);
    RUN(test_buf_on_stack);
    RUN(test_buf_json_str);
    RUN(test_buf_json_str_words);
    RUN(test_buf_pool);

    RUN(test_routes_set_get);
    RUN(test_routes_versions);
    RUN(test_routes_counts);
    RUN(test_routes_snapshot);
    RUN(test_routes_concurrent);

    RUN(test_shdict_create);
    RUN(test_shdict_types);
    RUN(test_shdict_modes);
    RUN(test_shdict_incr);
    RUN(test_shdict_ttl);
    RUN(test_shdict_lru);
    RUN(test_shdict_grow);
    RUN(test_shdict_incr_threads);
    RUN(test_shdict_iterate);
    RUN(test_shdict_destroy_all);

    RUN(test_config_defaults);
    RUN(test_config_set);
    RUN(test_config_load_file);
    RUN(test_config_dump_help);

    RUN(test_log_levels);
    RUN(test_log_output);

    printf("%d tests, %d checks, %d failures\n", g_tests, g_checks, g_failures);
    return g_failures ? 1 : 0;
}
