/*
 * main.c: the command line, the configuration precedence (defaults < --config file < command
 * line), binding the listening sockets, starting the workers, and signals: SIGTERM/SIGINT
 * drain then exit 0, a second one stops at once; SIGHUP reloads the scripts. The watchdog
 * timer reports workers stuck in a script and lets a stop finish without them. Also the two
 * non-serving modes: --check and `sandbox-proxy test` (busted inside the runtime).
 */
#include "base/config.h"
#include "base/fswatch.h"
#include "lua/lua_config.h"
#include "base/log.h"
#include "lua/lua_vm.h"
#include "state/routes.h"
#include "state/shdict.h"
#include "process/workers.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>


static const char usage_text[] =
    "Usage: sandbox-proxy [OPTIONS]\n"
    "       sandbox-proxy test [--scripts DIR] [BUSTED-OPTIONS] [SPEC-PATHS]\n"
    "\n"
    "A Lua-scriptable HTTP proxy for agent sandboxes: routes {METHOD} /{user}/{sandbox}/{path}\n"
    "to the sandbox. Without a sandbox source it runs the local demo (a demo sandbox list and a\n"
    "demo sandbox on 127.0.0.1:8888).\n"
    "\n"
    "Options:\n"
    "  --listen ADDR:PORT         proxy listener (default 0.0.0.0:8080; $PORT sets the port)\n"
    "  --workers N                worker threads (default: the CPUs this process may use)\n"
    "  --scripts DIR              override directory, searched before the built-in scripts\n"
    "                             (mount a ConfigMap here)\n"
    "  --config FILE              Lua config file returning a table (every knob below, plus\n"
    "                             script sections such as router = {...})\n"
    "  --sandboxes-file FILE      local sandbox source: a JSON SandboxList, re-read on change\n"
    "  --demo                     local demo mode: demo sandbox list + demo sandbox listener\n"
    "  --kube-api URL             Kubernetes API server (e.g. http://127.0.0.1:8001 from\n"
    "                             `kubectl proxy`); else in-cluster, else kubeconfig\n"
    "  --kube-token-file FILE     bearer token for --kube-api (re-read on change and on 401)\n"
    "  --kube-ca-file FILE        CA bundle for --kube-api\n"
    "  --kube-insecure-skip-verify  do not verify the API server certificate (development only)\n"
    "  --kubeconfig FILE          kubeconfig to use (else $KUBECONFIG); current context\n"
    "  --kube-api-version V       pin agents.x-k8s.io to v1beta1 or v1alpha1 (default: discovered)\n"
    "  --kube-namespace NS        watch one namespace (default: all)\n"
    "  --set NAME=VALUE           set any knob below (repeatable; wins over --config)\n"
    "  --log-level LEVEL          debug, info, warn or error (default info)\n"
    "  --check                    load the config and scripts, report problems, exit 0 or 1\n"
    "  --version                  print the version and exit\n"
    "  -h, --help                 this text\n"
    "\n"
    "`test` runs busted specs inside the runtime, with the real C bindings and the test kit\n"
    "(sp.testkit: fake requests, routes and upstream answers); --scripts puts your override\n"
    "directory first, as in production.\n"
    "\n"
    "Exit codes: 0 success (also after a graceful SIGTERM drain), 1 start-up or check failure,\n"
    "2 bad command line.\n"
    "\n"
    "Knobs (config file keys, or --set NAME=VALUE):\n";

/* The script defaults that can refuse a request (config file sections; docs/scripts.md and the
 * README's table of refusing defaults). The cli spec checks that every row of that README table
 * is named here, and that the numbers match the scripts' own defaults. */
static const char script_defaults_text[] =
    "\n"
    "Script defaults that can refuse a request (config file sections; docs/scripts.md):\n"
    "  ratelimit.limits             429 + Retry-After beyond a token bucket; defaults:\n"
    "    client  key unauthenticated  1000/s, burst 2000, per client address, for callers auth\n"
    "                                 did not identify (every caller when auth is off)\n"
    "    user    key identity         1000/s, burst 2000, per authenticated user (wherever they\n"
    "                                 connect from; users behind one address never share)\n"
    "  ratelimit.trusted_proxies    X-Forwarded-For believed from these CIDRs (default: none;\n"
    "                               the k8s Service uses externalTrafficPolicy: Local)\n"
    "  ratelimit.concurrency.per_sandbox  503 beyond 256 requests in flight per sandbox\n"
    "  ratelimit.enabled            true (false: no rate or concurrency limit)\n"
    "  ratelimit.redis              off: the limits are per replica (enabled: cluster-wide,\n"
    "                               in one Redis shared by every replica)\n"
    "  ratelimit.redis.fallback     local: this replica's limits while Redis is unavailable\n"
    "                               (down, or no reply within timeout_ms, 50 ms); closed:\n"
    "                               503; open: no rate limit\n"
    "  auth                         401 without valid credentials, 403 for another user's or an\n"
    "                               unowned sandbox and for /metrics without admin; on when\n"
    "                               auth.keys_file or auth.jwt is set (off by default)\n"
    "  wake.max_wait                60 s a request is held while its sandbox wakes (503 beyond;\n"
    "                               wake is off by default)\n"
    "  wake.max_held_per_sandbox    100 held requests per sandbox (503 beyond)\n"
    "  wake.max_held                1000 held requests per process (503 beyond)\n"
    "  router                       404 unknown sandbox, 503 + Retry-After 2 not ready, 400 an\n"
    "                               unsafe path (., .., encoded slash)\n"
    "  router.ports                 none: only a sandbox's own port and its\n"
    "                               sandbox-proxy.dev/ports annotation (403, never dialled)\n"
    "  router.prefix                strip: the sandbox gets /{rest} and X-Forwarded-Prefix\n"
    "                               (keep: the whole path; annotation sandbox-proxy.dev/prefix)\n"
    "  router.rewrite_response_headers  true: in strip mode Location and Set-Cookie Path come\n"
    "                               back under the prefix (never a body)\n"
    "  browser                      on with auth: ?sp_token= on GET/HEAD -> 302 + a cookie scoped\n"
    "                               to the sandbox; cookie requests that change state or upgrade\n"
    "                               need a same-host Origin (403); the cookie never reaches it\n"
    "  sandbox_path.base_domain     unset: host routing off; set: {port}-{sandbox}--{user}.DOMAIN\n"
    "                               hosts go to that sandbox, never to the proxy's endpoints\n";

static void usage_error(const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "sandbox-proxy: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, " (see --help)\n");
    exit(2);
}

/* ---------------------------------------------------------------- paths */

static bool is_file(const char *p)
{
    struct stat st;
    return p && stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static bool is_dir(const char *p)
{
    struct stat st;
    return p && stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The built-in scripts: <bindir>/../scripts (build tree) or <bindir>/../share/sandbox-proxy/
 * scripts (installed tree), whichever holds init.lua. */
static char *find_builtin_dir(void)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return NULL;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = '\0';
    static const char *rel[] = {"/../scripts", "/../share/sandbox-proxy/scripts", "/scripts"};
    for (size_t i = 0; i < SP_ARRAY_LEN(rel); i++) {
        char cand[PATH_MAX + 64], probe[PATH_MAX + 80], real[PATH_MAX];
        snprintf(cand, sizeof cand, "%s%s", exe, rel[i]);
        snprintf(probe, sizeof probe, "%s/init.lua", cand);
        if (is_file(probe) && realpath(cand, real))
            return sp_strdup(real);
    }
    return NULL;
}

/* ---------------------------------------------------------------- listening sockets */

/* Parses "ADDR:PORT", "[V6]:PORT" or ":PORT" into a socket address. */
static int parse_addr(const char *s, struct sockaddr_storage *ss, char err[256])
{
    char host[128];
    const char *colon = strrchr(s, ':');
    if (!colon) {
        snprintf(err, 256, "'%s': expected ADDR:PORT", s);
        return -1;
    }
    size_t hl = (size_t)(colon - s);
    if (hl >= sizeof host) {
        snprintf(err, 256, "'%s': address too long", s);
        return -1;
    }
    memcpy(host, s, hl);
    host[hl] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535) {
        snprintf(err, 256, "'%s': bad port", s);
        return -1;
    }
    if (hl == 0)
        strcpy(host, "0.0.0.0");
    if (host[0] == '[') {
        size_t l = strlen(host);
        if (l < 3 || host[l - 1] != ']') {
            snprintf(err, 256, "'%s': bad IPv6 address", s);
            return -1;
        }
        memmove(host, host + 1, l - 2);
        host[l - 2] = '\0';
    }
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
        return 0;
    snprintf(err, 256, "'%s': the address must be an IP address", s);
    return -1;
}

static int port_of(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET ? ntohs(((const struct sockaddr_in *)ss)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

/* Binds n SO_REUSEPORT sockets to addr (port 0: the first picks, the rest follow). */
static int bind_set(const char *addr, int n, int *fds, int *out_port, char err[256])
{
    struct sockaddr_storage ss;
    if (parse_addr(addr, &ss, err))
        return -1;
    for (int i = 0; i < n; i++) {
        int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) {
            snprintf(err, 256, "socket: %s", strerror(errno));
            return -1;
        }
        socklen_t len = ss.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                                : sizeof(struct sockaddr_in6);
        if (bind(fd, (struct sockaddr *)&ss, len) != 0) {
            snprintf(err, 256, "cannot bind %s: %s", addr, strerror(errno));
            close(fd);
            for (int j = 0; j < i; j++)
                close(fds[j]);
            return -1;
        }
        if (i == 0) {
            struct sockaddr_storage got;
            socklen_t gl = sizeof got;
            getsockname(fd, (struct sockaddr *)&got, &gl);
            if (ss.ss_family == AF_INET)
                ((struct sockaddr_in *)&ss)->sin_port = ((struct sockaddr_in *)&got)->sin_port;
            else
                ((struct sockaddr_in6 *)&ss)->sin6_port = ((struct sockaddr_in6 *)&got)->sin6_port;
        }
        fds[i] = fd;
    }
    *out_port = port_of(&ss);
    return 0;
}

/* ---------------------------------------------------------------- signals */

static uv_signal_t sig_term, sig_int, sig_hup;
static sp_fswatch_t *script_watch;
static uv_timer_t drain_timer;
static uv_async_t worker_exited;
static int exited_workers, total_workers, started_workers;
static bool draining;

static uv_timer_t watchdog_timer;

/* The watchdog (every quarter of worker_stall_timeout, at most 250 ms): reports stuck workers
 * (sp_workers_watch). While stopping, once every worker still running is stuck there is
 * nothing left to wait for: the process exits 0 without joining them (their threads cannot be
 * stopped, and tearing down state they may still touch is not safe, hence _exit). */
static void on_watchdog(uv_timer_t *t)
{
    SP_UNUSED(t);
    int running = 0;
    int stuck = sp_workers_watch(&running);
    if (draining && stuck > 0 && running == 0) {
        int ids[256];
        int n = sp_workers_stuck(ids, (int)SP_ARRAY_LEN(ids));
        char list[256] = "";
        size_t at = 0;
        for (int i = 0; i < n && at < sizeof list - 8; i++)
            at += (size_t)snprintf(list + at, sizeof list - at, i ? ",%d" : "%d", ids[i]);
        sp_log(SP_LOG_ERROR, "stopped without the stuck workers (their script calls never "
               "returned; their connections are dropped)", "i:stuck", (int64_t)stuck,
               "s:workers", list, NULL);
        _exit(0);
    }
}

static uint64_t watchdog_ms(void)
{
    double ms = sp_cfg.worker_stall_timeout * 1000 / 4;
    return (uint64_t)(ms < 20 ? 20 : ms > 250 ? 250 : ms);
}

static void on_drain_timeout(uv_timer_t *t)
{
    SP_UNUSED(t);
    sp_log(SP_LOG_WARN, "drain timeout: closing remaining connections", "d:drain_timeout",
           sp_cfg.drain_timeout, NULL);
    sp_workers_command(SP_CMD_STOP);
}

static void on_stop_signal(uv_signal_t *s, int signum)
{
    SP_UNUSED(s);
    if (draining) {
        sp_log(SP_LOG_WARN, "second stop signal: stopping now", "i:signal", (int64_t)signum, NULL);
        sp_workers_command(SP_CMD_STOP);
        return;
    }
    draining = true;
    sp_log(SP_LOG_INFO, "draining", "i:signal", (int64_t)signum, "d:drain_timeout",
           sp_cfg.drain_timeout, NULL);
    sp_workers_command(SP_CMD_DRAIN);
    uv_timer_start(&drain_timer, on_drain_timeout, (uint64_t)(sp_cfg.drain_timeout * 1000), 0);
}

static void on_hup(uv_signal_t *s, int signum)
{
    SP_UNUSED(s);
    SP_UNUSED(signum);
    if (draining)
        return;
    sp_log(SP_LOG_INFO, "SIGHUP: reloading the scripts", NULL);
    if (script_watch) /* the watcher must not reload this edit a second time */
        sp_fswatch_rebase(script_watch);
    sp_workers_command(SP_CMD_RELOAD);
}

/* ---------------------------------------------------------------- script reload on change */

/* A fingerprint of the override directory (every entry, links followed, so a ConfigMap's
 * ..data swap changes it) and of the config file. */
static uint64_t scripts_signature(void *ud)
{
    SP_UNUSED(ud);
    uint64_t h = SP_HASH_INIT;
    if (sp_cfg.scripts_dir) {
        uv_fs_t req;
        if (uv_fs_scandir(NULL, &req, sp_cfg.scripts_dir, 0, NULL) >= 0) {
            uv_dirent_t ent;
            while (uv_fs_scandir_next(&req, &ent) != UV_EOF) {
                char p[PATH_MAX];
                snprintf(p, sizeof p, "%s/%s", sp_cfg.scripts_dir, ent.name);
                h = sp_hash_more(h, ent.name, strlen(ent.name));
                h = sp_stat_sig(h, p);
                /* one level of subdirectories (lib/), not the ConfigMap's ..data internals */
                struct stat st;
                if (ent.name[0] != '.' && stat(p, &st) == 0 && S_ISDIR(st.st_mode)) {
                    uv_fs_t sub;
                    if (uv_fs_scandir(NULL, &sub, p, 0, NULL) >= 0) {
                        uv_dirent_t e2;
                        while (uv_fs_scandir_next(&sub, &e2) != UV_EOF) {
                            char p2[PATH_MAX + 256];
                            snprintf(p2, sizeof p2, "%s/%s", p, e2.name);
                            h = sp_stat_sig(h, p2);
                        }
                    }
                    uv_fs_req_cleanup(&sub);
                }
            }
        }
        uv_fs_req_cleanup(&req);
    }
    if (sp_cfg.config_file)
        h = sp_stat_sig(h, sp_cfg.config_file);
    return h;
}

static void on_scripts_changed(void *ud)
{
    SP_UNUSED(ud);
    if (draining)
        return;
    sp_log(SP_LOG_INFO, "scripts or config changed: reloading", "s:scripts",
           sp_cfg.scripts_dir ? sp_cfg.scripts_dir : "", "s:config",
           sp_cfg.config_file ? sp_cfg.config_file : "", NULL);
    sp_workers_command(SP_CMD_RELOAD);
}

/* The override directory and the config file's directory: inotify, settled for 200 ms, with a
 * 2 s poll as the backstop. */
static void start_script_watch(uv_loop_t *loop)
{
    if (!sp_cfg.scripts_dir && !sp_cfg.config_file)
        return;
    char config_dir[PATH_MAX];
    const char *dirs[SP_FSWATCH_MAX_DIRS];
    int n = 0;
    if (sp_cfg.scripts_dir)
        dirs[n++] = sp_cfg.scripts_dir;
    if (sp_cfg.config_file) {
        sp_dir_of(sp_cfg.config_file, config_dir, sizeof config_dir);
        dirs[n++] = config_dir;
    }
    script_watch = sp_fswatch_start(loop, dirs, n, 200, 2000, scripts_signature,
                                    on_scripts_changed, NULL);
}

static void stop_script_watch(void)
{
    sp_fswatch_stop(script_watch);
    script_watch = NULL;
}

static void on_worker_exited(uv_async_t *a)
{
    SP_UNUSED(a);
    /* async sends coalesce: count the workers whose threads are done by asking each */
    exited_workers++;
    int done = 0;
    for (int i = 0; i < total_workers; i++) {
        sp_worker_t *w = sp_worker_get(i);
        if (!w || atomic_load(&w->exited) || i >= started_workers)
            done++;
    }
    if (done >= total_workers) {
        uv_close((uv_handle_t *)&sig_term, NULL);
        uv_close((uv_handle_t *)&sig_int, NULL);
        uv_close((uv_handle_t *)&sig_hup, NULL);
        uv_close((uv_handle_t *)&drain_timer, NULL);
        uv_close((uv_handle_t *)&watchdog_timer, NULL);
        uv_close((uv_handle_t *)&worker_exited, NULL);
        stop_script_watch();
    }
}

/* ---------------------------------------------------------------- test mode */

/* Present only in sanitizer builds. */
extern void __lsan_disable(void) __attribute__((weak));

static int run_tests(int argc, char **argv)
{
    /* busted ends the process with os.exit and never closes its Lua state: the test runner's
     * own memory is not a leak worth reporting (the proxies it starts are still checked). */
    if (__lsan_disable)
        __lsan_disable();
    /* A state with the runtime modules and no strict globals, running busted's runner. */
    static sp_worker_t tw;
    uv_loop_init(&tw.loop);
    tw.id = 0;
    char err[1024];
    sp_vm_t *vm = sp_vm_create(&tw, NULL, err, sizeof err);
    if (!vm) {
        fprintf(stderr, "sandbox-proxy test: %s\n", err);
        return 1;
    }
    tw.vm = vm;
    return sp_vm_run_busted(vm, argc, argv);
}

/* ---------------------------------------------------------------- main */

/* The dicts from the config's shared_dicts, plus the defaults the built-in scripts use:
 * "sp" (runtime state, 1m), "ratelimit" (10m) and "wake" (4m), unless declared otherwise. */
static int create_dicts(void)
{
    char err[128];
    for (int i = 0; i < sp_cfg.ndicts; i++)
        if (!sp_shdict_create(sp_cfg.dict_names[i], sp_cfg.dict_sizes[i], err)) {
            fprintf(stderr, "sandbox-proxy: %s\n", err);
            return -1;
        }
    if (!sp_shdict_find("sp", 2))
        sp_shdict_create("sp", 1 << 20, err);
    if (!sp_shdict_find("ratelimit", 9))
        sp_shdict_create("ratelimit", 10 << 20, err);
    if (!sp_shdict_find("wake", 4))
        sp_shdict_create("wake", 4 << 20, err);
    return 0;
}

/* The value of option a: the next argument, which must exist. */
static const char *next_arg(int argc, char **argv, int *i, const char *a)
{
    if (*i + 1 >= argc)
        usage_error("option '%s' needs a value%s", a, "");
    return argv[++*i];
}

static void set_or_die(const char *name, const char *value)
{
    char err[256];
    if (sp_config_set(&sp_cfg, name, value, err)) {
        fprintf(stderr, "sandbox-proxy: %s (see --help)\n", err);
        exit(2);
    }
}

static int cpu_count(void)
{
    int n = (int)uv_available_parallelism();
    return n > 0 ? n : 1;
}

/* The (name, value) pairs collected from the command line: names are heap copies. */
static void free_sets(const char **sets, int nsets)
{
    for (int i = 0; i < nsets; i += 2)
        free((char *)sets[i]);
    free(sets);
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sp_config_defaults(&sp_cfg);
    sp_cfg.builtin_dir = find_builtin_dir();

    if (argc > 1 && strcmp(argv[1], "test") == 0) {
        sp_cfg.test_mode = true;
        int skip = 2;
        if (argc > 3 && strcmp(argv[2], "--scripts") == 0) {
            if (!is_dir(argv[3]))
                usage_error("--scripts: '%s' is not a directory%s", argv[3], "");
            char real[PATH_MAX];
            sp_cfg.scripts_dir = sp_strdup(realpath(argv[3], real) ? real : argv[3]);
            skip = 4;
        }
        sp_routes_init();
        create_dicts();
        return run_tests(argc - skip, argv + skip);
    }

    /* Command line: collected first so that it wins over the config file. */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage_text, stdout);
            sp_config_print_help(stdout);
            fputs(script_defaults_text, stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("sandbox-proxy %s\n", SP_VERSION);
            return 0;
        }
    }
    /* (name, value) pairs; names are heap copies (freed below), values point into argv */
    const char **sets = sp_calloc((size_t)argc * 2 + 2, sizeof(char *));
    int nsets = 0;
    bool listen_given = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        char opt[64];
        const char *val = NULL;
        if (a[0] == '-' && a[1] == '-' && eq && (size_t)(eq - a) < sizeof opt) {
            memcpy(opt, a, (size_t)(eq - a));
            opt[eq - a] = '\0';
            val = eq + 1;
            a = opt;
        }
#define VALUE() (val ? val : next_arg(argc, argv, &i, a))
        if (!strcmp(a, "--listen")) {
            sets[nsets++] = sp_strdup("listen");
            sets[nsets++] = VALUE();
            listen_given = true;
        } else if (!strcmp(a, "--workers")) {
            sets[nsets++] = sp_strdup("workers");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--log-level")) {
            sets[nsets++] = sp_strdup("log_level");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--scripts")) {
            const char *d = VALUE();
            if (!is_dir(d))
                usage_error("--scripts: '%s' is not a directory%s", d, "");
            char real[PATH_MAX];
            sp_cfg.scripts_dir = sp_strdup(realpath(d, real) ? real : d);
        } else if (!strcmp(a, "--config")) {
            const char *f = VALUE();
            if (!is_file(f))
                usage_error("--config: '%s' is not a readable file%s", f, "");
            sp_cfg.config_file = sp_strdup(f);
        } else if (!strcmp(a, "--sandboxes-file")) {
            sp_cfg.sandboxes_file = sp_strdup(VALUE());
        } else if (!strcmp(a, "--kube-api")) {
            sets[nsets++] = sp_strdup("kube_api");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--kube-token-file")) {
            sets[nsets++] = sp_strdup("kube_token_file");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--kube-ca-file")) {
            sets[nsets++] = sp_strdup("kube_ca_file");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--kube-insecure-skip-verify")) {
            sets[nsets++] = sp_strdup("kube_insecure_skip_verify");
            sets[nsets++] = "true";
        } else if (!strcmp(a, "--kubeconfig")) {
            sets[nsets++] = sp_strdup("kubeconfig");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--kube-api-version")) {
            sets[nsets++] = sp_strdup("kube_api_version");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--kube-namespace")) {
            sets[nsets++] = sp_strdup("kube_namespace");
            sets[nsets++] = VALUE();
        } else if (!strcmp(a, "--demo")) {
            sp_cfg.demo = true;
        } else if (!strcmp(a, "--check")) {
            sp_cfg.check_only = true;
        } else if (!strcmp(a, "--set")) {
            const char *kv = VALUE();
            const char *e = strchr(kv, '=');
            if (!e || e == kv)
                usage_error("--set: expected NAME=VALUE, got '%s'%s", kv, "");
            sets[nsets++] = sp_strndup(kv, (size_t)(e - kv));
            sets[nsets++] = e + 1;
        } else {
            usage_error("unknown option '%s'%s", argv[i], "");
        }
#undef VALUE
    }
    if (sp_cfg.config_file) {
        char err[256];
        if (sp_config_load_file(&sp_cfg, sp_cfg.config_file, err)) {
            fprintf(stderr, "sandbox-proxy: %s\n", err);
            free_sets(sets, nsets);
            return sp_cfg.check_only ? 1 : 2;
        }
    }
    const char *port_env = getenv("PORT");
    if (!listen_given && port_env && *port_env) {
        char buf[64];
        snprintf(buf, sizeof buf, "0.0.0.0:%s", port_env);
        char err[256];
        if (sp_config_set(&sp_cfg, "listen", buf, err)) {
            fprintf(stderr, "sandbox-proxy: PORT=%s: %s\n", port_env, err);
            free_sets(sets, nsets);
            return 2;
        }
    }
    for (int i = 0; i < nsets; i += 2)
        set_or_die(sets[i], sets[i + 1]);
    free_sets(sets, nsets);
    sp_log_min_level = sp_log_level_parse(sp_cfg.log_level);
    if (sp_cfg.kube_api_version && strcmp(sp_cfg.kube_api_version, "v1beta1") != 0 &&
        strcmp(sp_cfg.kube_api_version, "v1alpha1") != 0)
        usage_error("--kube-api-version: expected v1beta1 or v1alpha1, got '%s'%s",
                    sp_cfg.kube_api_version, "");
    if (sp_cfg.kube_api && strncmp(sp_cfg.kube_api, "http://", 7) != 0 &&
        strncmp(sp_cfg.kube_api, "https://", 8) != 0)
        usage_error("--kube-api: expected an http:// or https:// URL, got '%s'%s", sp_cfg.kube_api,
                    "");
    if (sp_log_min_level < 0) {
        fprintf(stderr, "sandbox-proxy: log_level: expected debug, info, warn or error\n");
        return 2;
    }
    {
        struct sockaddr_storage ss;
        char err[256];
        if (parse_addr(sp_cfg.listen, &ss, err))
            usage_error("--listen: %s%s", err, "");
        if (sp_cfg.metrics_listen && parse_addr(sp_cfg.metrics_listen, &ss, err))
            usage_error("metrics_listen: %s%s", err, "");
        if (parse_addr(sp_cfg.demo_listen, &ss, err))
            usage_error("demo_listen: %s%s", err, "");
    }
    if (!sp_cfg.builtin_dir) {
        fprintf(stderr, "sandbox-proxy: cannot find the built-in scripts next to the binary\n");
        return 1;
    }
    /* The sandbox source: a file, else (no cluster settings) the local demo. */
    if (!sp_cfg.sandboxes_file && !sp_cfg.kube_api && !getenv("KUBERNETES_SERVICE_HOST") &&
        !sp_cfg.kubeconfig && !getenv("KUBECONFIG"))
        sp_cfg.demo = true;
    if (sp_cfg.demo)
        sp_cfg.allow_loopback_sandboxes = true; /* the demo sandbox listens on 127.0.0.1 */
    if (sp_cfg.demo && !sp_cfg.sandboxes_file) {
        char p[PATH_MAX + 64];
        snprintf(p, sizeof p, "%s/demo/sandboxes.json", sp_cfg.builtin_dir);
        sp_cfg.sandboxes_file = sp_strdup(p);
    }
    if (sp_cfg.workers <= 0)
        sp_cfg.workers = cpu_count();

    sp_routes_init();
    if (create_dicts())
        return 1;

    if (sp_cfg.check_only) {
        char err[2048];
        sp_vm_t *vm = sp_vm_create(NULL, "init", err, sizeof err);
        if (!vm) {
            fprintf(stderr, "sandbox-proxy: check: %s\n", err);
            return 1;
        }
        int problems = sp_vm_check(vm);
        sp_vm_destroy(vm);
        if (problems) {
            fprintf(stderr, "sandbox-proxy: check: %d problem(s)\n", problems);
            return 1;
        }
        printf("sandbox-proxy: check: configuration and scripts OK\n");
        return 0;
    }

    /* Bind every listener before starting anything, so a busy port fails fast. */
    int n = sp_cfg.workers;
    const char *names[3];
    int *fds[3];
    int ports[3];
    int nl = 0;
    char err[256];
    names[nl] = "main";
    fds[nl] = sp_calloc((size_t)n, sizeof(int));
    if (bind_set(sp_cfg.listen, n, fds[nl], &ports[nl], err)) {
        sp_log(SP_LOG_ERROR, "cannot listen", "s:listen", sp_cfg.listen, "s:error", err, NULL);
        return 1;
    }
    nl++;
    if (sp_cfg.demo) {
        names[nl] = "demo";
        fds[nl] = sp_calloc((size_t)n, sizeof(int));
        if (bind_set(sp_cfg.demo_listen, n, fds[nl], &ports[nl], err)) {
            sp_log(SP_LOG_WARN, "demo sandbox not started", "s:listen", sp_cfg.demo_listen,
                   "s:error", err, NULL);
            free(fds[nl]);
        } else {
            char a[80];
            snprintf(a, sizeof a, "%.*s:%d",
                     (int)(strrchr(sp_cfg.demo_listen, ':') - sp_cfg.demo_listen),
                     sp_cfg.demo_listen, ports[nl]);
            set_or_die("demo_listen", a);
            nl++;
        }
    }
    if (sp_cfg.metrics_listen) {
        names[nl] = "metrics";
        fds[nl] = sp_calloc((size_t)n, sizeof(int));
        if (bind_set(sp_cfg.metrics_listen, n, fds[nl], &ports[nl], err)) {
            sp_log(SP_LOG_ERROR, "cannot listen", "s:listen", sp_cfg.metrics_listen, "s:error",
                   err, NULL);
            return 1;
        }
        nl++;
    }
    sp_workers_set_listeners(nl, names, fds, ports);

    uv_loop_t *loop = uv_default_loop();
    uv_signal_init(loop, &sig_term);
    uv_signal_init(loop, &sig_int);
    uv_signal_init(loop, &sig_hup);
    uv_timer_init(loop, &drain_timer);
    uv_async_init(loop, &worker_exited, on_worker_exited);
    uv_signal_start(&sig_term, on_stop_signal, SIGTERM);
    uv_signal_start(&sig_int, on_stop_signal, SIGINT);
    uv_signal_start(&sig_hup, on_hup, SIGHUP);
    sp_workers_set_exit_notify(&worker_exited);
    start_script_watch(loop);

    sp_buf_t knobs = {0};
    sp_config_dump_json(&sp_cfg, &knobs);
    sp_buf_addc(&knobs, '\0');
    sp_log(SP_LOG_INFO, "starting", "s:version", SP_VERSION, "i:workers", (int64_t)n, "s:source",
           sp_cfg.demo ? "demo" : sp_cfg.sandboxes_file ? "file" : "kubernetes", "j:settings",
           knobs.p, NULL);
    sp_buf_free(&knobs);

    total_workers = n;
    int rc = sp_workers_start(n);
    started_workers = sp_workers_started();
    uv_timer_init(loop, &watchdog_timer);
    uv_timer_start(&watchdog_timer, on_watchdog, watchdog_ms(), watchdog_ms());
    if (rc == 0) {
        for (int i = 0; i < nl; i++)
            sp_log(SP_LOG_INFO, "listening", "s:listener", names[i], "i:port",
                   (int64_t)ports[i], NULL);
        if (sp_cfg.demo)
            sp_log(SP_LOG_WARN, "local demo mode: no authentication, demo sandbox list",
                   "s:sandboxes_file", sp_cfg.sandboxes_file, NULL);
    } else {
        draining = true; /* no reload may replace the stop */
        sp_workers_command(SP_CMD_STOP);
    }
    uv_run(loop, UV_RUN_DEFAULT);
    sp_workers_join();
    uv_loop_close(loop);
    for (int i = 0; i < nl; i++)
        free(fds[i]);
    sp_routes_destroy();
    sp_shdict_destroy_all();
    if (rc == 0)
        sp_log(SP_LOG_INFO, "stopped", NULL);
    return rc == 0 ? 0 : 1;
}
