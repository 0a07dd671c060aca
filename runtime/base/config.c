/*
 * config.c: the knob table (see config.h; the config file is read by lua/lua_config.c). Each knob is one row:
 * name, type, offset, default, bounds and a one-line meaning; --help prints the same rows, so
 * the documentation cannot drift from the code.
 */
#include "base/config.h"
#include "base/buf.h"
#include "base/netaddr.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>


sp_config_t sp_cfg;

typedef sp_knob_type_t ktype_t; /* short names for the table below */
#define K_INT SP_KNOB_INT
#define K_DOUBLE SP_KNOB_DOUBLE
#define K_STR SP_KNOB_STR
#define K_BOOL SP_KNOB_BOOL
#define K_CIDRS SP_KNOB_CIDRS

typedef struct knob {
    const char *name;
    ktype_t type;
    size_t off;
    const char *def; /* NULL: unset string */
    double min, max;
    const char *help;
} knob_t;

#define O(f) offsetof(sp_config_t, f)
static const knob_t knobs[] = {
    {"listen", K_STR, O(listen), "0.0.0.0:8080", 0, 0,
     "address:port of the proxy listener (the PORT environment variable sets the port)"},
    {"workers", K_INT, O(workers), "0", 0, 256,
     "worker threads, each with its own loop, Lua state and SO_REUSEPORT listener (0: CPUs)"},
    {"log_level", K_STR, O(log_level), "info", 0, 0, "debug, info, warn or error"},
    {"demo_listen", K_STR, O(demo_listen), "127.0.0.1:8888", 0, 0,
     "address:port of the demo sandbox in local demo mode"},
    {"metrics_listen", K_STR, O(metrics_listen), NULL, 0, 0,
     "optional separate listener for /metrics (named \"metrics\")"},
    {"max_connections", K_INT, O(max_connections), "10000", 1, 1000000,
     "open client connections per process; more are accepted and closed at once"},
    {"max_connections_per_ip", K_INT, O(max_connections_per_ip), "1000", 0, 1000000,
     "open client connections per client address, trusted_proxies exempt; more are accepted "
     "and closed at once (0: no limit)"},
    {"trusted_proxies", K_CIDRS, O(trusted_proxies), NULL, 0, 0,
     "CIDRs of load balancers / proxies in front (comma-separated, or a list in the config "
     "file): exempt from max_connections_per_ip; ratelimit.lua believes their X-Forwarded-For"},
    {"max_tunnels", K_INT, O(max_tunnels), "10000", 0, 1000000,
     "open upgraded (WebSocket) tunnels per process; more upgrades get 503 (0: no limit)"},
    {"max_chunk_extension_size", K_INT, O(max_chunk_extension_size), "1024", 0, 65536,
     "bytes of chunk extensions in one request body (400 beyond)"},
    {"max_url_size", K_INT, O(max_url_size), "8192", 64, 1048576,
     "longest request target in bytes (414 beyond)"},
    {"max_header_size", K_INT, O(max_header_size), "16384", 512, 1048576,
     "total bytes of request line and headers (431 beyond)"},
    {"max_headers", K_INT, O(max_headers), "100", 4, 10000, "request header count (431 beyond)"},
    {"http2", K_BOOL, O(http2), "true", 0, 0,
     "serve HTTP/2 with prior knowledge (h2c: a connection that opens with the HTTP/2 preface) "
     "on the same listeners as HTTP/1.1"},
    {"h2_max_concurrent_streams", K_INT, O(h2_max_concurrent_streams), "100", 1, 100000,
     "HTTP/2 streams a client connection may have open at once (more are refused with "
     "REFUSED_STREAM)"},
    {"h2_stream_window", K_INT, O(h2_stream_window), "262144", 65535, 2147483647,
     "bytes of an HTTP/2 request body held per stream (its flow-control window: given back only "
     "as the bytes go to the sandbox)"},
    {"h2_connection_window", K_INT, O(h2_connection_window), "1048576", 65535, 2147483647,
     "bytes of HTTP/2 request bodies held per connection, all streams together (the connection "
     "flow-control window)"},
    {"h2_stream_buffer", K_INT, O(h2_stream_buffer), "65536", 4096, 16777216,
     "bytes of an HTTP/2 response held per stream for a client that reads slowly; beyond it the "
     "sandbox is not read (at most this plus upstream_buffer_size per stream)"},
    {"h2_max_outbound_ack", K_INT, O(h2_max_outbound_ack), "1000", 1, 1000000,
     "HTTP/2 SETTINGS/PING acknowledgements queued for a client that does not read; beyond it "
     "the connection ends with ENHANCE_YOUR_CALM (SETTINGS and PING floods)"},
    {"h2_max_settings", K_INT, O(h2_max_settings), "32", 1, 65536,
     "entries in one HTTP/2 SETTINGS frame (a connection error beyond)"},
    {"h2_reset_burst", K_INT, O(h2_reset_burst), "1000", 1, 1000000,
     "HTTP/2 streams a client may reset in a burst (rapid reset, CVE-2023-44487); beyond it and "
     "h2_reset_rate the connection ends"},
    {"h2_reset_rate", K_INT, O(h2_reset_rate), "33", 1, 1000000,
     "HTTP/2 stream resets per second a client may sustain after the burst"},
    {"h2_max_continuations", K_INT, O(h2_max_continuations), "8", 1, 10000,
     "CONTINUATION frames after one HTTP/2 HEADERS frame (CONTINUATION floods; a connection "
     "error beyond)"},
    {"h2_stream_idle_timeout", K_DOUBLE, O(h2_stream_idle_timeout), "300", 0.01, 604800,
     "longest time in seconds an HTTP/2 stream may go without moving a byte either way (request "
     "body received, response sent to the client): beyond it the stream ends (408 or 504 if "
     "nothing was answered yet, else RST_STREAM CANCEL) and its sandbox stream is cancelled"},
    {"h2c_upstream_ports", K_STR, O(h2c_upstream_ports), NULL, 0, 0,
     "comma-separated sandbox ports that speak h2c (HTTP/2 without TLS, e.g. sandboxd's gRPC "
     "port 9090): every request from an HTTP/2 client to such a port is relayed over h2c, not "
     "only gRPC ones (unset: only requests with content-type application/grpc)"},
    {"header_timeout", K_DOUBLE, O(header_timeout), "10", 0.01, 3600,
     "seconds to receive a whole request head (408 and close beyond)"},
    {"keepalive_timeout", K_DOUBLE, O(keepalive_timeout), "75", 0.01, 86400,
     "seconds an idle keep-alive client connection is kept"},
    {"body_timeout", K_DOUBLE, O(body_timeout), "60", 0.01, 86400,
     "longest gap in seconds between two reads of a request body"},
    {"send_timeout", K_DOUBLE, O(send_timeout), "60", 0.01, 86400,
     "longest time in seconds a client may take to accept more response bytes (closed and "
     "logged beyond)"},
    {"lingering_timeout", K_DOUBLE, O(lingering_timeout), "2", 0, 60,
     "seconds to drain a client's unread input after an error response before closing"},
    {"keepalive_requests", K_INT, O(keepalive_requests), "10000", 1, 100000000,
     "requests served on one client connection before it is closed"},
    {"client_buffer_size", K_INT, O(client_buffer_size), "16384", 1024, 16777216,
     "bytes of the per-connection read buffer (the most a client's upload holds in memory)"},
    {"max_body_size", K_DOUBLE, O(max_body_size), "0", 0, 1e18,
     "largest request body in bytes (413 beyond); 0: unlimited"},
    {"upstream_buffer_size", K_INT, O(upstream_buffer_size), "65536", 4096, 16777216,
     "bytes of the per-upstream-connection read buffer"},
    {"io_uring_writes", K_BOOL, O(io_uring_writes), "true", 0, 0,
     "gather the small socket writes (under 16 KiB) of one loop iteration and send them with "
     "one io_uring_enter(2) per worker; off, or where the kernel or a seccomp profile refuses "
     "io_uring (logged once): every write is sent at once"},
    {"upstream_body_buffer_size", K_INT, O(upstream_body_buffer_size), "262144", 0, 16777216,
     "bytes of the larger read buffer a sandbox connection switches to once a response body to "
     "an HTTP/1.1 client is larger than its upstream_buffer_size buffer (by Content-Length, or "
     "a read filled it): fewer, larger reads and writes per MiB; 0 or not above "
     "upstream_buffer_size: never"},
    {"max_upstream_header_size", K_INT, O(max_upstream_header_size), "65536", 1024, 16777216,
     "largest response head accepted from a sandbox (502 beyond)"},
    {"connect_timeout", K_DOUBLE, O(connect_timeout), "5", 0.01, 600,
     "seconds to connect to a sandbox (504 beyond)"},
    {"first_byte_timeout", K_DOUBLE, O(first_byte_timeout), "180", 0.01, 86400,
     "seconds from the request being sent to the response head (504 beyond)"},
    {"upstream_idle_timeout", K_DOUBLE, O(upstream_idle_timeout), "300", 0.01, 86400,
     "longest gap in seconds between two reads of a response body (connection closed beyond)"},
    {"tunnel_idle_timeout", K_DOUBLE, O(tunnel_idle_timeout), "3600", 0.01, 604800,
     "seconds an upgraded (WebSocket) tunnel may be idle in both directions; no total limit"},
    {"upstream_keepalive", K_INT, O(upstream_keepalive), "64", 0, 100000,
     "idle keep-alive connections kept per sandbox address per worker"},
    {"upstream_keepalive_timeout", K_DOUBLE, O(upstream_keepalive_timeout), "60", 0.01, 86400,
     "seconds an idle pooled upstream connection is kept (HTTP/1.1, and h2c connections without "
     "a call)"},
    {"connect_retries", K_INT, O(connect_retries), "3", 0, 20,
     "retries of a refused connect (a sandbox binds its port just after Ready)"},
    {"connect_retry_delay", K_DOUBLE, O(connect_retry_delay), "0.2", 0.001, 60,
     "first retry delay in seconds; doubles each retry (0.2, 0.4, 0.8)"},
    {"allow_loopback_sandboxes", K_BOOL, O(allow_loopback_sandboxes), "false", 0, 0,
     "dial sandboxes at loopback addresses (on in the local demo); unspecified, link-local, "
     "multicast and broadcast addresses are always refused (503)"},
    {"drain_timeout", K_DOUBLE, O(drain_timeout), "25", 0, 3600,
     "seconds SIGTERM waits for in-flight requests and tunnels before closing them"},
    {"worker_stall_timeout", K_DOUBLE, O(worker_stall_timeout), "10", 0.1, 3600,
     "seconds a worker's loop may make no progress before it is reported stuck (error log, "
     "/live 503) and a stop stops waiting for it"},
    {"max_timers", K_INT, O(max_timers), "10000", 1, 10000000,
     "pending script timers per worker"},
    {"lua_memory_limit_mb", K_INT, O(lua_memory_limit_mb), "512", 0, 1048576,
     "memory cap of each Lua state in MiB (0: none)"},
    {"script_time_budget", K_DOUBLE, O(script_time_budget), "1", 0, 3600,
     "CPU seconds a request hook may run between yields (0: none)"},
    {"access_log_flush", K_DOUBLE, O(access_log_flush), "0.2", 0.001, 60,
     "seconds between flushes of the buffered access log"},
    {"access_log_buffer", K_INT, O(access_log_buffer), "65536", 1024, 67108864,
     "bytes buffered per worker before the access log is flushed early"},
    {"trace_propagation", K_BOOL, O(trace_propagation), "true", 0, 0,
     "send sandboxes a W3C traceparent (the client's trace, or a new one; the proxy's span as "
     "parent) and log trace_id"},
    {"otlp_endpoint", K_STR, O(otlp_endpoint), NULL, 0, 0,
     "OTLP/HTTP JSON traces URL (e.g. http://127.0.0.1:4318/v1/traces); unset: no span export"},
    {"otlp_batch_interval", K_DOUBLE, O(otlp_batch_interval), "1", 0.001, 3600,
     "seconds between span exports (one POST per worker)"},
    {"otlp_queue_size", K_INT, O(otlp_queue_size), "4096", 1, 10000000,
     "spans queued per worker between exports; more are dropped and counted"},
    {"otlp_timeout", K_DOUBLE, O(otlp_timeout), "5", 0.01, 600,
     "seconds for one export POST (its spans are dropped and counted on failure)"},
    {"otlp_service_name", K_STR, O(otlp_service_name), "sandbox-proxy", 0, 0,
     "service.name of the exported spans"},
    {"auth_required", K_BOOL, O(auth_required), "false", 0, 0,
     "refuse to start unless auth.lua has API keys or JWT configured (the k8s manifests set it)"},
    {"kube_api", K_STR, O(kube_api), NULL, 0, 0,
     "Kubernetes API URL (e.g. http://127.0.0.1:8001 for kubectl proxy)"},
    {"kube_token_file", K_STR, O(kube_token_file), NULL, 0, 0, "bearer token file for kube_api"},
    {"kube_ca_file", K_STR, O(kube_ca_file), NULL, 0, 0, "CA bundle for kube_api"},
    {"kubeconfig", K_STR, O(kubeconfig), NULL, 0, 0, "kubeconfig file (else $KUBECONFIG)"},
    {"kube_api_version", K_STR, O(kube_api_version), NULL, 0, 0,
     "pin agents.x-k8s.io version (v1beta1 or v1alpha1); default: discovered"},
    {"kube_insecure_skip_verify", K_BOOL, O(kube_insecure_skip_verify), "false", 0, 0,
     "do not verify the API server certificate (development only)"},
    {"kube_namespace", K_STR, O(kube_namespace), NULL, 0, 0, "watch one namespace (default: all)"},
    {"kube_label_selector", K_STR, O(kube_label_selector), NULL, 0, 0,
     "label selector for the Sandbox watch"},
    {"kube_page_size", K_INT, O(kube_page_size), "500", 1, 100000, "LIST page size"},
    {"kube_watch_timeout", K_INT, O(kube_watch_timeout), "300", 5, 86400,
     "base watch timeoutSeconds (jittered up to twice this)"},
    {"kube_relist_jitter", K_DOUBLE, O(kube_relist_jitter), "2", 0, 300,
     "a relist after 410 waits a random 0..this many seconds (spreads replicas' relists)"},
    {"kube_token_refresh", K_DOUBLE, O(kube_token_refresh), "60", 1, 3600,
     "seconds between re-reads of the token file (also re-read on 401)"},
    {"kube_serviceaccount_dir", K_STR, O(kube_serviceaccount_dir),
     "/var/run/secrets/kubernetes.io/serviceaccount", 0, 0,
     "in-cluster service account directory (token, ca.crt, namespace)"},
    {"kube_compression", K_BOOL, O(kube_compression), "false", 0, 0,
     "ask the API server for gzip responses (saves bandwidth, costs API server CPU)"},
};
#undef O

static int set_knob(sp_config_t *c, const knob_t *k, const char *value, char err[256])
{
    char *p = (char *)c + k->off;
    switch (k->type) {
    case K_STR: {
        char **s = (char **)p;
        free(*s);
        *s = value ? sp_strdup(value) : NULL;
        return 0;
    }
    case K_CIDRS: {
        /* the text is kept for --help and the start-up log; the parsed set is what C uses */
        sp_cidr_t *set;
        char perr[256];
        int n = sp_cidrs_parse(value, &set, perr);
        if (n < 0) {
            snprintf(err, 256, "%s: %.200s", k->name, perr);
            return -1;
        }
        char **s = (char **)p;
        free(*s);
        *s = value && *value ? sp_strdup(value) : NULL;
        free(c->trusted_nets);
        c->trusted_nets = set;
        c->ntrusted = n;
        return 0;
    }
    case K_BOOL: {
        bool *b = (bool *)p;
        if (!strcmp(value, "true") || !strcmp(value, "1") || !strcmp(value, "yes"))
            *b = true;
        else if (!strcmp(value, "false") || !strcmp(value, "0") || !strcmp(value, "no"))
            *b = false;
        else {
            snprintf(err, 256, "%s: expected true or false, got '%s'", k->name, value);
            return -1;
        }
        return 0;
    }
    case K_INT:
    case K_DOUBLE: {
        char *end;
        errno = 0;
        double v = strtod(value, &end);
        if (errno || end == value || *end || isnan(v)) {
            snprintf(err, 256, "%s: expected a number, got '%s'", k->name, value);
            return -1;
        }
        if (v < k->min || v > k->max) {
            snprintf(err, 256, "%s: %s is out of range [%g, %g]", k->name, value, k->min, k->max);
            return -1;
        }
        if (k->type == K_INT) {
            if (v != (double)(int)v) {
                snprintf(err, 256, "%s: expected an integer, got '%s'", k->name, value);
                return -1;
            }
            *(int *)p = (int)v;
        } else {
            *(double *)p = v;
        }
        return 0;
    }
    }
    return 0;
}

void sp_config_defaults(sp_config_t *c)
{
    char err[256];
    for (size_t i = 0; i < SP_ARRAY_LEN(knobs); i++) {
        const knob_t *k = &knobs[i];
        if (k->type == K_STR || k->type == K_CIDRS) {
            char **s = (char **)((char *)c + k->off);
            *s = k->def ? sp_strdup(k->def) : NULL;
        } else {
            set_knob(c, k, k->def, err);
        }
    }
}

static const knob_t *find_knob(const char *name)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(knobs); i++)
        if (!strcmp(knobs[i].name, name))
            return &knobs[i];
    return NULL;
}

int sp_config_set(sp_config_t *c, const char *name, const char *value, char err[256])
{
    const knob_t *k = find_knob(name);
    if (!k) {
        snprintf(err, 256, "unknown setting '%s' (see --help)", name);
        return -1;
    }
    return set_knob(c, k, value, err);
}

int sp_config_parse_size(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0 || isnan(v))
        return -1;
    double mult = 1;
    if (*end == 'k' || *end == 'K')
        mult = 1024, end++;
    else if (*end == 'm' || *end == 'M')
        mult = 1024.0 * 1024, end++;
    else if (*end == 'g' || *end == 'G')
        mult = 1024.0 * 1024 * 1024, end++;
    if (*end)
        return -1;
    *out = (size_t)(v * mult);
    return 0;
}

bool sp_config_has(const char *name) { return find_knob(name) != NULL; }

void sp_config_each(const sp_config_t *c,
                    void (*fn)(const char *name, sp_knob_type_t type, const void *value, void *ud),
                    void *ud)
{
    for (size_t i = 0; i < SP_ARRAY_LEN(knobs); i++)
        fn(knobs[i].name, knobs[i].type, (const char *)c + knobs[i].off, ud);
}

void sp_config_print_help(void *file)
{
    FILE *f = file;
    for (size_t i = 0; i < SP_ARRAY_LEN(knobs); i++) {
        const knob_t *k = &knobs[i];
        fprintf(f, "  %-28s %s (default: %s)\n", k->name, k->help, k->def ? k->def : "unset");
    }
}

void sp_config_dump_json(const sp_config_t *c, void *out)
{
    sp_buf_t *b = out;
    sp_buf_addc(b, '{');
    for (size_t i = 0; i < SP_ARRAY_LEN(knobs); i++) {
        const knob_t *k = &knobs[i];
        const char *p = (const char *)c + k->off;
        if (i)
            sp_buf_addc(b, ',');
        sp_buf_json_str(b, k->name, strlen(k->name));
        sp_buf_addc(b, ':');
        switch (k->type) {
        case K_STR:
        case K_CIDRS: {
            const char *s = *(char *const *)p;
            if (s)
                sp_buf_json_str(b, s, strlen(s));
            else
                sp_buf_adds(b, "null");
            break;
        }
        case K_BOOL: sp_buf_adds(b, *(const bool *)p ? "true" : "false"); break;
        case K_INT: sp_buf_addf(b, "%d", *(const int *)p); break;
        case K_DOUBLE: sp_buf_addf(b, "%g", *(const double *)p); break;
        }
    }
    sp_buf_addc(b, '}');
}
