/*
 * test_util.c: unit tests of util (sp_ieq, sp_has_token, sp_iso8601, sp_strndup/sp_strdup).
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

void suite_util(void)
{
    RUN(test_util_ieq);
    RUN(test_util_has_token);
    RUN(test_util_iso8601);
    RUN(test_util_strndup);
}
