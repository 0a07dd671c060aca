/*
 * fuzz_request.c: libFuzzer harness for the request path: bytes from a client go through the
 * real server (llhttp in strict mode, limits, pipelining, body framing) and the real default
 * scripts (routing, rate limits, the access log) on a real worker loop, over a socketpair.
 * Routes point at a port where nothing listens, so forwarding is exercised up to the upstream
 * connect. Anything that crashes, leaks or trips a sanitizer is a finding.
 */
#include "http/http.h"
#include "http/worker.h"
#include "base/config.h"
#include "base/log.h"
#include "lua/lua_vm.h"
#include "state/routes.h"
#include "state/shdict.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static sp_worker_t w;
static sp_listener_t listener;

static void self_test(const char *req, const char *want);

static void add_route(const char *key, const char *ns, const char *name, const char *user,
                      bool ready)
{
    sp_route_in_t in = {0};
    in.s[SP_RF_NAMESPACE] = ns;
    in.n[SP_RF_NAMESPACE] = strlen(ns);
    in.s[SP_RF_NAME] = name;
    in.n[SP_RF_NAME] = strlen(name);
    in.s[SP_RF_USER] = user;
    in.n[SP_RF_USER] = strlen(user);
    in.s[SP_RF_ADDRESS] = "127.0.0.1";
    in.n[SP_RF_ADDRESS] = 9;
    in.port = 1; /* refused at once */
    in.ready = ready;
    sp_routes_set(key, strlen(key), &in);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    sp_config_defaults(&sp_cfg);
    sp_cfg.builtin_dir = sp_strdup(SP_SOURCE_DIR "/scripts");
    sp_cfg.test_mode = true; /* no sandbox source */
    sp_cfg.connect_retries = 0;
    sp_cfg.lingering_timeout = 0;
    sp_log_min_level = SP_LOG_ERROR + 1; /* quiet */
    sp_routes_init();
    char err[1024];
    sp_shdict_create("sp", 1 << 20, err);
    sp_shdict_create("ratelimit", 1 << 20, err);
    add_route("alice/sb", "default", "sb", "alice", true);
    add_route("bob/down", "default", "down", "bob", false);
    uv_loop_init(&w.loop);
    sp_worker_buffers_init(&w, 16, 16);
    strcpy(w.id_prefix, "fuzz00");
    w.hooks = &sp_vm_hooks;
    w.vm = sp_vm_create(&w, "init", err, sizeof err);
    if (!w.vm) {
        fprintf(stderr, "fuzz_request: cannot load the scripts: %s\n", err);
        abort();
    }
    listener.w = &w;
    listener.name = "main";
    self_test("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 ");
    self_test("GET /alice/nosuch/x HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 404 ");
    self_test("GET /bob/down/x HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 503 ");
    self_test("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
              "HTTP/1.1 400 ");
    return 0;
}

/* Feeds one client byte stream to the server and runs the loop until the proxy has closed the
 * connection (bounded); the first outcap bytes of what it answered land in out. */
static size_t run_one(const uint8_t *data, size_t size, char *out, size_t outcap)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        abort();
    int big = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (sp_server_adopt(&listener, sv[0]) != 0)
        abort();
    if (size && write(sv[1], data, size) != (ssize_t)size)
        abort();
    shutdown(sv[1], SHUT_WR);
    fcntl(sv[1], F_SETFL, O_NONBLOCK);
    char sink[65536];
    size_t got = 0;
    ssize_t n;
    for (int i = 0; i < 20000 && w.nconns > 0; i++) {
        uv_run(&w.loop, UV_RUN_NOWAIT);
        while ((n = read(sv[1], sink, sizeof sink)) > 0) {
            size_t k = (size_t)n < outcap - got ? (size_t)n : outcap - got;
            memcpy(out + got, sink, k);
            got += k;
        }
        if (i > 50)
            usleep(100);
    }
    close(sv[1]);
    /* let the closes finish */
    for (int i = 0; i < 10; i++)
        uv_run(&w.loop, UV_RUN_NOWAIT);
    return got;
}

/* The harness must reach the parser, the scripts and the upstream connect: if a change to the
 * worker's set-up left it answering nothing, every input would look harmless. Known requests
 * must get their known answers before fuzzing starts. (A routed request is not among them: the
 * harness half-closes after writing, and a client gone before the upstream answers aborts it.) */
static void self_test(const char *req, const char *want)
{
    char out[512];
    size_t n = run_one((const uint8_t *)req, strlen(req), out, sizeof out - 1);
    out[n] = 0;
    if (strncmp(out, want, strlen(want)) != 0) {
        fprintf(stderr, "fuzz_request: self-test failed: %.40s... answered %zu bytes \"%.60s\", want \"%s\"\n",
                req, n, out, want);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 60000)
        return 0; /* one write into the socketpair */
    static char out[4096];
    run_one(data, size, out, sizeof out);
    return 0;
}
