/*
 * config.h: every knob of the runtime, with its name, default, bounds and documentation, and
 * loading them from a Lua config file (`--config FILE`, a chunk that returns a table) and from
 * `--set NAME=VALUE`. Script sections (tables such as `router = {...}`) are left to the
 * scripts, which read the same file through `require "sp.config"`.
 */
#ifndef SP_CONFIG_H
#define SP_CONFIG_H

#include "base/sp.h"

typedef struct sp_config {
    /* where and what */
    char *listen;
    char *demo_listen;
    char *metrics_listen;
    char *scripts_dir;   /* override directory (ConfigMap mount), searched first; may be NULL */
    char *builtin_dir;   /* the built-in scripts, found relative to the binary */
    char *config_file;   /* may be NULL */
    char *sandboxes_file;
    char *log_level;
    int workers;
    bool demo;           /* local demo mode: demo sandbox list + demo sandbox listener */
    bool check_only;
    bool test_mode;      /* `sandbox-proxy test`: no sandbox source */

    /* client side limits */
    int max_connections;
    int max_connections_per_ip;
    char *trusted_proxies;       /* the knob's text; parsed into trusted_nets */
    struct sp_cidr *trusted_nets;
    int ntrusted;
    int max_tunnels;
    int max_chunk_extension_size;
    int max_url_size;
    int max_header_size;
    int max_headers;
    bool http2;
    int h2_max_concurrent_streams;
    int h2_stream_window;
    int h2_connection_window;
    int h2_stream_buffer;
    int h2_max_outbound_ack;
    int h2_max_settings;
    int h2_reset_burst;
    int h2_reset_rate;
    int h2_max_continuations;
    double h2_stream_idle_timeout;
    char *h2c_upstream_ports;
    double header_timeout;
    double keepalive_timeout;
    double body_timeout;
    double send_timeout;
    double lingering_timeout;
    int keepalive_requests;
    int client_buffer_size;
    double max_body_size;

    /* upstream side */
    int upstream_buffer_size;
    int upstream_body_buffer_size;
    bool io_uring_writes;
    int max_upstream_header_size;
    double connect_timeout;
    double first_byte_timeout;
    double upstream_idle_timeout;
    double tunnel_idle_timeout;
    int upstream_keepalive;
    double upstream_keepalive_timeout;
    int connect_retries;
    double connect_retry_delay;
    bool allow_loopback_sandboxes;

    /* process */
    double drain_timeout;
    double worker_stall_timeout;
    int max_timers;
    int lua_memory_limit_mb;
    double script_time_budget;
    double access_log_flush;
    int access_log_buffer;

    /* Kubernetes client */
    char *kube_api;
    char *kube_token_file;
    char *kube_ca_file;
    char *kubeconfig;
    char *kube_api_version;
    bool kube_insecure_skip_verify;
    char *kube_namespace;
    char *kube_label_selector;
    int kube_page_size;
    int kube_watch_timeout;
    double kube_relist_jitter;
    double kube_token_refresh;
    char *kube_serviceaccount_dir;
    bool kube_compression;
    bool auth_required;
    bool trace_propagation;
    char *otlp_endpoint;
    double otlp_batch_interval;
    int otlp_queue_size;
    double otlp_timeout;
    char *otlp_service_name;

    /* shared dicts declared in the config file's `shared_dicts` table (name -> bytes) */
    int ndicts;
    char *dict_names[64];
    size_t dict_sizes[64];
} sp_config_t;

extern sp_config_t sp_cfg;

/* Sets every knob to its default. */
void sp_config_defaults(sp_config_t *c);
/* Sets one knob from text. Returns 0, or -1 with a one-line message in err[256]. */
int sp_config_set(sp_config_t *c, const char *name, const char *value, char err[256]);
/* Is there a knob of that name? */
bool sp_config_has(const char *name);
/* Parses a size: a number of bytes, or "64k", "10m", "1g". Returns 0 or -1. */
int sp_config_parse_size(const char *s, size_t *out);
/* Calls fn(name, type, value, ud) for every knob of c in table order; value points at the
 * field (int, double, char * or bool by type). core.settings() is built from it. */
/* SP_KNOB_CIDRS: a char * (the text) like SP_KNOB_STR, parsed into a CIDR set as well. */
typedef enum { SP_KNOB_INT, SP_KNOB_DOUBLE, SP_KNOB_STR, SP_KNOB_BOOL, SP_KNOB_CIDRS } sp_knob_type_t;
void sp_config_each(const sp_config_t *c,
                    void (*fn)(const char *name, sp_knob_type_t type, const void *value, void *ud),
                    void *ud);
/* Prints the knob reference (name, default, meaning) for --help. */
void sp_config_print_help(void *file);
/* Writes the effective knob values as a JSON object (for the start-up log). */
void sp_config_dump_json(const sp_config_t *c, void *buf);

#endif
