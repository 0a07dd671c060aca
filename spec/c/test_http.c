/*
 * test_http.c: unit tests of HTTP framing (the obs-fold detector over llhttp at every read
 * split, Connection-listed framing headers).
 */
#include "test.h"

#include "base/buf.h"
#include "base/config.h"
#include "http/http.h"
#include "http/trace.h"
#include "base/log.h"
#include "state/routes.h"
#include "state/shdict.h"
#include "base/sp.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

void suite_http(void)
{
    RUN(test_trace_parse);
    RUN(test_http_obs_fold);
    RUN(test_http_connection_framing);
}
