/*
 * test_config.c: unit tests of config (defaults, sp_config_set, sp_config_load_file, dump/help).
 */
#include "test.h"

#include "base/buf.h"
#include "base/config.h"
#include "lua/lua_config.h"
#include "http/http.h"
#include "base/log.h"
#include "base/netaddr.h"
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
#include <uv.h>

/* Frees every string knob, from the knob table itself (a knob added later cannot be missed). */
static void free_string_knob(const char *name, sp_knob_type_t type, const void *value, void *ud)
{
    (void)name;
    (void)ud;
    if (type == SP_KNOB_STR || type == SP_KNOB_CIDRS) {
        char **p = (char **)value;
        free(*p);
        *p = NULL;
    }
}

static void config_free(sp_config_t *c)
{
    sp_config_each(c, free_string_knob, NULL);
    /* the strings that are not knobs */
    char **strs[] = {&c->scripts_dir, &c->builtin_dir, &c->config_file, &c->sandboxes_file};
    for (size_t i = 0; i < SP_ARRAY_LEN(strs); i++) {
        free(*strs[i]);
        *strs[i] = NULL;
    }
    free(c->trusted_nets);
    c->trusted_nets = NULL;
    c->ntrusted = 0;
}

static struct sockaddr_storage addr_of(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    if (uv_ip4_addr(ip, 80, (struct sockaddr_in *)&ss) != 0)
        CHECK(uv_ip6_addr(ip, 80, (struct sockaddr_in6 *)&ss) == 0);
    return ss;
}

static void test_netaddr(void)
{
    /* the classes a sandbox is never dialled at */
    const char *cases[][2] = {
        {"0.0.0.0", "unspecified address"}, {"0.1.2.3", "unspecified address"},
        {"::", "unspecified address"},      {"127.0.0.1", "loopback address"},
        {"127.9.9.9", "loopback address"},  {"::1", "loopback address"},
        {"::ffff:127.0.0.1", "loopback address"},
        {"169.254.169.254", "link-local address"}, {"fe80::1", "link-local address"},
        {"febf::1", "link-local address"},  {"224.0.0.1", "multicast address"},
        {"239.255.255.255", "multicast address"}, {"ff02::1", "multicast address"},
        {"255.255.255.255", "broadcast address"},
    };
    for (size_t i = 0; i < SP_ARRAY_LEN(cases); i++) {
        struct sockaddr_storage ss = addr_of(cases[i][0]);
        const char *why = sp_addr_refusal((struct sockaddr *)&ss, false);
        CHECK(why != NULL);
        if (why)
            CHECK_STR(why, cases[i][1]);
    }
    const char *ok[] = {"10.8.1.23", "192.168.1.1", "169.255.0.1", "223.255.255.255",
                        "240.0.0.1", "fd00::17", "2001:db8::1", "fec0::1", "::2"};
    for (size_t i = 0; i < SP_ARRAY_LEN(ok); i++) {
        struct sockaddr_storage ss = addr_of(ok[i]);
        CHECK(sp_addr_refusal((struct sockaddr *)&ss, false) == NULL);
    }
    /* loopback only with the knob; the others never */
    struct sockaddr_storage lo = addr_of("127.0.0.1"), lo6 = addr_of("::1"),
                            zero = addr_of("0.0.0.0");
    CHECK(sp_addr_refusal((struct sockaddr *)&lo, true) == NULL);
    CHECK(sp_addr_refusal((struct sockaddr *)&lo6, true) == NULL);
    CHECK(sp_addr_refusal((struct sockaddr *)&zero, true) != NULL);

    /* CIDR sets: IPv4 peers match IPv4 CIDRs also when seen as ::ffff:a.b.c.d */
    sp_cidr_t *set;
    char err[256];
    CHECK_INT(sp_cidrs_parse("10.0.0.0/8, fd00::/8 192.0.2.1", &set, err), 3);
    struct sockaddr_storage a = addr_of("10.1.2.3"), b = addr_of("::ffff:10.9.9.9"),
                            c = addr_of("11.0.0.1"), d = addr_of("fd12::1"),
                            e = addr_of("192.0.2.1"), f = addr_of("192.0.2.2");
    CHECK(sp_cidrs_contain(set, 3, (struct sockaddr *)&a));
    CHECK(sp_cidrs_contain(set, 3, (struct sockaddr *)&b));
    CHECK(!sp_cidrs_contain(set, 3, (struct sockaddr *)&c));
    CHECK(sp_cidrs_contain(set, 3, (struct sockaddr *)&d));
    CHECK(sp_cidrs_contain(set, 3, (struct sockaddr *)&e));
    CHECK(!sp_cidrs_contain(set, 3, (struct sockaddr *)&f));
    CHECK(!sp_cidrs_contain(set, 0, (struct sockaddr *)&a));
    free(set);
    CHECK_INT(sp_cidrs_parse("", &set, err), 0);
    CHECK(set == NULL);
    CHECK_INT(sp_cidrs_parse("10.0.0.0/33", &set, err), -1);
    CHECK_HAS(err, "10.0.0.0/33");
    CHECK_INT(sp_cidrs_parse("10.0.0.0/8,example.com", &set, err), -1);
    CHECK_HAS(err, "example.com");

    /* the knob: text, or a list in the config file */
    sp_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sp_config_defaults(&cfg);
    CHECK_INT(cfg.max_connections_per_ip, 1000);
    CHECK_INT(cfg.ntrusted, 0);
    CHECK(!cfg.allow_loopback_sandboxes);
    CHECK_INT(sp_config_set(&cfg, "trusted_proxies", "10.0.0.0/8,fd00::/8", err), 0);
    CHECK_INT(cfg.ntrusted, 2);
    CHECK_INT(sp_config_set(&cfg, "trusted_proxies", "10.0.0.0/99", err), -1);
    CHECK_HAS(err, "trusted_proxies");
    CHECK_INT(cfg.ntrusted, 2); /* a bad value changes nothing */
    CHECK_INT(sp_config_set(&cfg, "trusted_proxies", "", err), 0);
    CHECK_INT(cfg.ntrusted, 0);
    config_free(&cfg);
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
    CHECK_INT(c.upstream_body_buffer_size, 262144);
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

void suite_config(void)
{
    RUN(test_config_defaults);
    RUN(test_config_set);
    RUN(test_config_load_file);
    RUN(test_config_dump_help);
    RUN(test_netaddr);
}
