/*
 * fuzz_h2.c: libFuzzer harness for the HTTP/2 server side: the fuzzer's bytes follow the client
 * preface on a connection to the real server, so they reach nghttp2's frame and HPACK decoding
 * and the proxy's stream handling (runtime/http/h2.c: headers into requests, limits, request bodies,
 * resets, the response path) with the real default scripts on a real worker loop, over a
 * socketpair. Routes point at a port where nothing listens. Anything that crashes, leaks or
 * trips a sanitizer is a finding.
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

static void self_test(const char *path, int want_status_frames);

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
        fprintf(stderr, "fuzz_h2: cannot load the scripts: %s\n", err);
        abort();
    }
    listener.w = &w;
    listener.name = "main";
    self_test("/health", 1);
    self_test("/alice/nosuch/x", 1);
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

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/* The preface and an empty SETTINGS frame, then `data`. */
static size_t with_preface(const uint8_t *data, size_t size, uint8_t *buf, size_t cap)
{
    static const uint8_t settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
    size_t n = 0;
    memcpy(buf, preface, 24);
    n += 24;
    memcpy(buf + n, settings, 9);
    n += 9;
    if (size > cap - n)
        size = cap - n;
    memcpy(buf + n, data, size);
    return n + size;
}

/* The harness must reach the HTTP/2 server and the scripts: a GET on stream 1 (HPACK literals)
 * must be answered with a HEADERS frame on stream 1 before fuzzing starts. */
static void self_test(const char *path, int want)
{
    uint8_t req[256], in[512];
    size_t plen = strlen(path), n = 0;
    uint8_t block[128];
    size_t bl = 0;
    block[bl++] = 0x82; /* :method GET */
    block[bl++] = 0x86; /* :scheme http */
    block[bl++] = 0x04; /* :path, literal */
    block[bl++] = (uint8_t)plen;
    memcpy(block + bl, path, plen);
    bl += plen;
    block[bl++] = 0x01; /* :authority x */
    block[bl++] = 1;
    block[bl++] = 'x';
    req[n++] = 0;
    req[n++] = 0;
    req[n++] = (uint8_t)bl;
    req[n++] = 1;        /* HEADERS */
    req[n++] = 0x4 | 0x1; /* END_HEADERS | END_STREAM */
    req[n++] = 0;
    req[n++] = 0;
    req[n++] = 0;
    req[n++] = 1;
    memcpy(req + n, block, bl);
    n += bl;
    size_t len = with_preface(req, n, in, sizeof in);
    char out[4096];
    size_t got = run_one(in, len, out, sizeof out);
    int found = 0;
    for (size_t p = 0; p + 9 <= got;) {
        size_t fl = ((size_t)(uint8_t)out[p] << 16) | ((size_t)(uint8_t)out[p + 1] << 8) |
                    (uint8_t)out[p + 2];
        if (out[p + 3] == 1 && out[p + 8] == 1)
            found++;
        p += 9 + fl;
    }
    if (found < want) {
        fprintf(stderr, "fuzz_h2: self-test failed: GET %s answered %zu bytes, no HEADERS on stream 1\n",
                path, got);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t in[65536];
    if (size > 60000)
        return 0; /* one write into the socketpair */
    size_t n = with_preface(data, size, in, sizeof in);
    static char out[4096];
    run_one(in, n, out, sizeof out);
    return 0;
}
