/*
 * test_buf.c: unit tests of buf (growth, SP_BUF_ON stack buffers, JSON string escaping, block
 * pools).
 */
#include "test.h"

#include "base/buf.h"
#include "base/config.h"
#include "http/http.h"
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

void suite_buf(void)
{
    RUN(test_buf_growth);
    RUN(test_buf_on_stack);
    RUN(test_buf_json_str);
    RUN(test_buf_json_str_words);
    RUN(test_buf_pool);
}
