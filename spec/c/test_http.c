/*
 * test_http.c: unit tests of HTTP framing (the obs-fold detector over llhttp at every read
 * split, Connection-listed framing headers).
 */
#include "test.h"

#include "base/buf.h"
#include "base/config.h"
#include "http/http.h"
#include "http/trace.h"
#include "http/worker.h"
#include "base/log.h"
#include "state/routes.h"
#include "state/shdict.h"
#include "base/sp.h"

#include <errno.h>
#include <stddef.h>
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

/* A slot reused for a new exchange starts with nothing of the last one: every byte of the
 * exchange part is zero but the fields acquire sets (start time, listener, id), and the slot's
 * buffers keep their storage with nothing in them. */
static void test_request_reuse_clears_the_exchange(void)
{
    sp_worker_t w;
    memset(&w, 0, sizeof w);
    memcpy(w.id_prefix, "abcdef", 7);
    sp_request_t *r = sp_request_acquire(&w);
    sp_buf_adds(&r->head, "GET /a HTTP/1.1");
    sp_buf_adds(&r->resp_head, "HTTP/1.1 200 OK");
    char *head_storage = r->head.p;
    uint32_t gen = r->gen;
    /* the last exchange wrote every field, including any added later */
    memset(&r->conn, 0xAB, sizeof *r - offsetof(sp_request_t, conn));
    w.free_slots[w.nfree++] = r;
    SP_STAT_ADD(w.active_requests, -1);
    sp_request_t *r2 = sp_request_acquire(&w);
    CHECK(r2 == r);
    CHECK_INT(r2->gen, gen + 1);
    CHECK(r2->head.p == head_storage);
    CHECK_INT(r2->head.len, 0);
    CHECK_INT(r2->resp_head.len, 0);
    CHECK(r2->t_start > 0);
    CHECK_STR(r2->listener, "");
    CHECK_INT(r2->id_len, 16);
    CHECK(memcmp(r2->id, "abcdef", 6) == 0);
    /* everything else in the exchange part is zero */
    sp_request_t expect;
    memcpy(&expect, r2, sizeof expect);
    expect.t_start = 0;
    expect.listener = NULL;
    memset(expect.id, 0, sizeof expect.id);
    expect.id_len = 0;
    const unsigned char *p = (const unsigned char *)&expect.conn;
    size_t n = sizeof expect - offsetof(sp_request_t, conn), dirty = 0;
    for (size_t i = 0; i < n; i++)
        dirty += p[i] != 0;
    CHECK_INT(dirty, 0);
    sp_buf_free(&r->head);
    sp_buf_free(&r->resp_head);
    free(r);
    free(w.slots);
    free(w.free_slots);
}

/* One response header value through sp_response_header_value with prefix pre (NULL: none). */
static char *rewritten(sp_request_t *r, const char *pre, const char *name, const char *value)
{
    static char out[512];
    sp_buf_t o = {0};
    sp_response_header_value(r, pre, pre ? strlen(pre) : 0, name, strlen(name), value,
                             strlen(value), &o);
    snprintf(out, sizeof out, "%.*s", (int)o.len, o.p ? o.p : "");
    sp_buf_free(&o);
    return out;
}

static void test_response_prefix(void)
{
    /* a request whose Host is proxy.test:8080 */
    static const char head[] = "Hostproxy.test:8080";
    sp_hdr_t h[1] = {{0, 4, 4, 15}};
    sp_request_t r;
    memset(&r, 0, sizeof r);
    sp_buf_add(&r.head, head, sizeof head - 1);
    r.hdrs = h;
    r.nhdrs = 1;
    size_t plen = 0;
    CHECK(sp_request_response_prefix(&r, &plen) == NULL); /* nobody asked */
    const char *P = "/alice/sb";
    /* Location */
    CHECK_STR(rewritten(&r, P, "Location", "/tree?"), "/alice/sb/tree?");
    CHECK_STR(rewritten(&r, P, "LOCATION", "/"), "/alice/sb/");
    CHECK_STR(rewritten(&r, P, "location", "http://proxy.test:8080/x?a=/b"),
              "http://proxy.test:8080/alice/sb/x?a=/b");
    CHECK_STR(rewritten(&r, P, "location", "HTTPS://PROXY.test:8080"), "HTTPS://PROXY.test:8080/alice/sb/");
    CHECK_STR(rewritten(&r, P, "location", "https://proxy.test:8080?q"), "https://proxy.test:8080/alice/sb/?q");
    static const char *const same[] = {"//evil.test/x", "/\\evil.test", "tree", "../x", "?q", "",
                                       "http://other.test/x", "http://proxy.test/x",
                                       "http://proxy.test:8080.evil/x", "ftp://proxy.test:8080/x",
                                       "/alice/sb", "/alice/sb/", "/alice/sb?x", "/alice/sb#f"};
    for (size_t i = 0; i < SP_ARRAY_LEN(same); i++)
        CHECK_STR(rewritten(&r, P, "Location", same[i]), same[i]);
    CHECK_STR(rewritten(&r, P, "Location", "/alice/sbx"), "/alice/sb/alice/sbx");
    /* Set-Cookie: every Path attribute, nothing else */
    CHECK_STR(rewritten(&r, P, "Set-Cookie", "a=1; Path=/"), "a=1; Path=/alice/sb");
    CHECK_STR(rewritten(&r, P, "set-cookie", "a=1;path=/x;Path = /y ; HttpOnly"),
              "a=1;path=/alice/sb/x;Path = /alice/sb/y ; HttpOnly");
    CHECK_STR(rewritten(&r, P, "Set-Cookie", "Path=/v; Secure"), "Path=/v; Secure");
    CHECK_STR(rewritten(&r, P, "Set-Cookie", "a=1; Path=/alice/sb/q; pathx=/z; Path=rel; Path="),
              "a=1; Path=/alice/sb/q; pathx=/z; Path=rel; Path=");
    CHECK_STR(rewritten(&r, P, "Set-Cookie", "a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/"),
              "a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/alice/sb");
    /* other headers, and no prefix: as they are */
    CHECK_STR(rewritten(&r, P, "Content-Location", "/x"), "/x");
    CHECK_STR(rewritten(&r, NULL, "Location", "/x"), "/x");
    CHECK_STR(rewritten(&r, NULL, "Set-Cookie", "a=1; Path=/"), "a=1; Path=/");
    sp_buf_free(&r.head);
}

void suite_http(void)
{
    RUN(test_request_reuse_clears_the_exchange);
    RUN(test_response_prefix);
    RUN(test_trace_parse);
    RUN(test_http_obs_fold);
    RUN(test_http_connection_framing);
}
