/*
 * test_log.c: unit tests of log (level names, sp_log output).
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

void suite_log(void)
{
    RUN(test_log_levels);
    RUN(test_log_output);
}
