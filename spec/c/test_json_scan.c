/*
 * test_json_scan.c: unit tests of the JSON scanner (runtime/json_scan.c) the watch engine
 * reads list pages and events with: validation by the RFC 8259 grammar, the nesting limit,
 * key lookup (first match, escaped keys), paths, string unescaping (surrogate pairs), array
 * walking and integers. Every input is copied into a heap block of exactly its size, so a
 * read past the span's end is caught by AddressSanitizer (the spans are not NUL-terminated).
 */
#include "test.h"

#include "base/buf.h"
#include "base/json_scan.h"

#include <stdlib.h>

/* A heap copy of s without its NUL; *end is set just past it. Freed with free(). */
static char *span(const char *s, const char **end)
{
    size_t n = strlen(s);
    char *p = malloc(n ? n : 1);
    memcpy(p, s, n);
    *end = p + n;
    return p;
}

/* Does the whole text skip as one value (trailing whitespace allowed)? */
static bool valid(const char *s)
{
    const char *end;
    char *p = span(s, &end);
    const char *e = sp_json_skip(p, end);
    bool ok = e && sp_json_ws(e, end) == end;
    free(p);
    return ok;
}

static void test_json_skip_valid(void)
{
    static const char *const good[] = {
        "0", "-0", "1", "-12", "1.5", "1e3", "1E+3", "-1.25e-10", "true", "false", "null",
        "\"\"", "\"a\"", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\u00e9\\uD83D\\uDE00\"",
        "\"\xc3\xa9 raw utf-8\"", "[]", "{}", " [ 1 , 2 ] ", "{\"a\":1}",
        "{ \"a\" : [ {}, [], \"x\", null ] , \"b\" : { \"c\" : false } }", "\t\r\n1\n",
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(good); i++) {
        bool ok = valid(good[i]);
        CHECK(ok);
        if (!ok)
            fprintf(stderr, "  rejected: %s\n", good[i]);
    }
}

static void test_json_skip_invalid(void)
{
    static const char *const bad[] = {
        "", " ", "01", "-", "+1", "1.", ".5", "1e", "1e+", "0x10", "NaN", "Infinity", "tru",
        "nul", "True", "\"", "\"abc", "\"a\\x\"", "\"\\u12\"", "\"\\u12g4\"", "\"tab\there\"",
        "[", "[1,", "[1,]", "[,1]", "[1 2]", "{", "{\"a\"}", "{\"a\":}", "{\"a\":1,}",
        "{a:1}", "{\"a\" 1}", "{'a':1}", "{\"a\":1", "]", "}",
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(bad); i++) {
        bool ok = valid(bad[i]);
        CHECK(!ok);
        if (ok)
            fprintf(stderr, "  accepted: %s\n", bad[i]);
    }
    /* a value ends where the span ends: "true" cut to "tru" is invalid, not read beyond */
    const char *end;
    char *p = span("true", &end);
    CHECK(sp_json_skip(p, end - 1) == NULL);
    CHECK(sp_json_skip(p, end) == end);
    free(p);
    /* the value is the first one: what follows is the caller's */
    p = span("[1] [2]", &end);
    CHECK(sp_json_skip(p, end) == p + 3);
    free(p);
}

static void test_json_depth(void)
{
    /* 500 levels are fine; 600 exceed the limit (512) and are refused, not a stack overflow */
    for (int depth = 500; depth <= 600; depth += 100) {
        char *s = malloc((size_t)depth * 2 + 1);
        for (int i = 0; i < depth; i++) {
            s[i] = '[';
            s[depth * 2 - 1 - i] = ']';
        }
        s[depth * 2] = '\0';
        CHECK_INT(valid(s), depth == 500);
        free(s);
    }
    /* deep inside an object too */
    sp_buf_t b = {0};
    for (int i = 0; i < 10000; i++)
        sp_buf_adds(&b, "{\"a\":");
    sp_buf_adds(&b, "1");
    for (int i = 0; i < 10000; i++)
        sp_buf_addc(&b, '}');
    sp_buf_addc(&b, '\0');
    CHECK(!valid(b.p));
    sp_buf_free(&b);
}

static void test_json_get_path(void)
{
    const char *end;
    char *p = span("{\"kind\":\"Sandbox\",\"metadata\":{\"name\":\"sb\",\"labels\":{\"a/b\":\"1\"},"
                   "\"resourceVersion\":\"42\"},\"kind\":\"Second\",\"n\\u0061me\":7,"
                   "\"status\":{\"conditions\":[{\"type\":\"Ready\"}]}}",
                   &end);
    sp_buf_t b = {0};
    const char *v = sp_json_get(p, end, "kind"); /* the first of two equal keys */
    CHECK(v != NULL);
    CHECK_INT(sp_json_string(v, end, &b), 0);
    CHECK_MEM(b.p, b.len, "Sandbox");
    b.len = 0;
    v = sp_json_path(p, end, "metadata", "resourceVersion", NULL);
    CHECK(v != NULL);
    CHECK_INT(sp_json_string(v, end, &b), 0);
    CHECK_MEM(b.p, b.len, "42");
    b.len = 0;
    v = sp_json_path(p, end, "metadata", "labels", "a/b", NULL);
    CHECK(v != NULL && sp_json_string(v, end, &b) == 0);
    CHECK_MEM(b.p, b.len, "1");
    /* a key written with an escape matches its unescaped form */
    long long n = 0;
    v = sp_json_get(p, end, "name");
    CHECK(v != NULL && sp_json_int(v, end, &n) == 0);
    CHECK_INT(n, 7);
    /* absent keys, paths through non-objects, non-objects */
    CHECK(sp_json_get(p, end, "missing") == NULL);
    CHECK(sp_json_path(p, end, "metadata", "name", "deeper", NULL) == NULL);
    CHECK(sp_json_path(p, end, "status", "conditions", "type", NULL) == NULL);
    const char *aend;
    char *a = span("[{\"a\":1}]", &aend);
    CHECK(sp_json_get(a, aend, "a") == NULL);
    free(a);
    char *e = span("{}", &aend);
    CHECK(sp_json_get(e, aend, "a") == NULL);
    free(e);
    /* an object cut short: the key is never reached, nothing is read past the end */
    CHECK(sp_json_get(p, p + 20, "status") == NULL);
    sp_buf_free(&b);
    free(p);
}

static void test_json_string(void)
{
    const char *end;
    sp_buf_t b = {0};
    char *p = span(" \"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac\\ud83d\\ude00\"", &end);
    CHECK_INT(sp_json_string(p, end, &b), 0);
    CHECK_MEM(b.p, b.len, "a\"b\\c/d\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
    free(p);
    b.len = 0;
    p = span("\"nul \\u0000 inside\"", &end);
    CHECK_INT(sp_json_string(p, end, &b), 0);
    CHECK_MEM(b.p, b.len, "nul \0 inside");
    free(p);
    static const char *const bad[] = {"abc", "\"open", "\"bad \\q\"", "42", "\"\\u00\""};
    for (size_t i = 0; i < SP_ARRAY_LEN(bad); i++) {
        b.len = 0;
        p = span(bad[i], &end);
        CHECK_INT(sp_json_string(p, end, &b), -1);
        free(p);
    }
    sp_buf_free(&b);
}

static void test_json_array(void)
{
    const char *end;
    char *p = span(" [ {\"n\":1} , \"two\" , [3] ] ", &end);
    const char *e = sp_json_array_first(p, end);
    CHECK(e != NULL && *e == '{');
    /* walking by skip + ',' as the watch engine does */
    int count = 0;
    while (e) {
        count++;
        const char *after = sp_json_ws(sp_json_skip(e, end), end);
        e = (after < end && *after == ',') ? sp_json_ws(after + 1, end) : NULL;
    }
    CHECK_INT(count, 3);
    free(p);
    p = span("[]", &end);
    CHECK(sp_json_array_first(p, end) == NULL);
    free(p);
    p = span("{\"items\":[]}", &end);
    CHECK(sp_json_array_first(p, end) == NULL);
    free(p);
}

static void test_json_int(void)
{
    static const struct {
        const char *text;
        int rc;
        long long v;
    } cases[] = {
        {"0", 0, 0},
        {"42", 0, 42},
        {"-17", 0, -17},
        {" 9223372036854775807", 0, 9223372036854775807LL},
        {"1.5", -1, 0},
        {"1e3", -1, 0},
        {"\"42\"", -1, 0},
        {"123456789012345678901", -1, 0},
        {"", -1, 0},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(cases); i++) {
        const char *end;
        char *p = span(cases[i].text, &end);
        long long v = 0;
        int rc = sp_json_int(p, end, &v);
        CHECK_INT(rc, cases[i].rc);
        if (rc == 0)
            CHECK_INT(v, cases[i].v);
        free(p);
    }
}

void suite_json_scan(void)
{
    RUN(test_json_skip_valid);
    RUN(test_json_skip_invalid);
    RUN(test_json_depth);
    RUN(test_json_get_path);
    RUN(test_json_string);
    RUN(test_json_array);
    RUN(test_json_int);
}
