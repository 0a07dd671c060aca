/*
 * http.h: the byte-moving core's shared types: client connections (server.c), requests and
 * their decisions, upstream connections (upstream.c), and the hook interface through which the
 * scripting layer decides. Nothing here knows about Lua: a request carries an opaque pointer
 * for the scripting layer.
 */
#ifndef SP_HTTP_H
#define SP_HTTP_H

#include <uv.h>

#include <llhttp.h>
#include "base/sp.h"
#include "base/buf.h"
#include "base/deadline.h"

typedef struct sp_worker sp_worker_t;
typedef struct sp_conn sp_conn_t;
typedef struct sp_upconn sp_upconn_t;
typedef struct sp_request sp_request_t;
typedef struct sp_listener sp_listener_t;
typedef struct sp_client_ops sp_client_ops_t;
typedef struct sp_h2 sp_h2_t;

/* The most iovecs one forwarding step collects (body spans plus chunk framing). */
#define SP_MAX_IOV 96

typedef struct sp_hdr {
    uint32_t name_off, name_len;
    uint32_t value_off, value_len;
} sp_hdr_t;

/*
 * Obsolete line folding (RFC 9112 5.2) detector for llhttp's header callbacks. llhttp accepts a
 * folded value and hands it over without the line break, even when the first line is empty
 * ("X-A:\r\n folded"); what gives a fold away is the bytes llhttp skipped between header
 * pieces. The state spans parser runs (a fold may straddle two reads). Call sp_fold_run before
 * each llhttp_execute, sp_fold_field from the field callback, sp_fold_value from the value
 * callback, and sp_fold_skip(run end) after a run that ended inside a header block.
 */
typedef struct sp_fold {
    const char *mark;  /* end of the last header piece in this run, or the run's start */
    uint32_t gap;      /* bytes skipped since the last non-empty piece */
    bool lf;           /* a LF was among them */
    bool after_lf;     /* and some byte came after that LF */
} sp_fold_t;

static inline void sp_fold_run(sp_fold_t *f, const char *start) { f->mark = start; }
void sp_fold_skip(sp_fold_t *f, const char *to);
static inline void sp_fold_field(sp_fold_t *f, const char *end)
{
    f->mark = end;
    f->gap = 0;
    f->lf = f->after_lf = false;
}
/* Returns true if the value piece at..at+len follows a fold; `continuation`: the header's value
 * already has bytes (a later piece must follow the earlier one with no byte skipped). */
static inline bool sp_fold_value(sp_fold_t *f, const char *at, size_t len, bool continuation)
{
    sp_fold_skip(f, at);
    /* Before a value's first piece llhttp skips ":" and spaces, and for an empty value the line
     * end (a zero-length piece at the start of the next line); a byte skipped after a LF is a
     * continuation line. A later piece of the same value follows the earlier one directly. */
    bool fold = continuation ? f->gap > 0 : f->after_lf;
    f->mark = at + len;
    if (len) {
        f->gap = 0;
        f->lf = f->after_lf = false;
    }
    return fold;
}

/*
 * Header accumulation from llhttp's header callbacks, shared by the request parser
 * (server.c) and the response parser (upstream.c): names and values are appended to a head
 * buffer, each header an sp_hdr_t of offsets into it, the array grown as needed. The view points
 * at the fields of one list in sp_request (SP_REQ_HDRS / SP_RESP_HDRS). Size limits stay with the
 * callers; the fold check (sp_fold_*) runs inside. Inline (like sp_fold_field/value): called for
 * every header piece, and inlined the view's pointers fold into the caller's request fields.
 */
typedef struct sp_hdr_acc {
    sp_hdr_t **hdrs;
    uint32_t *n, *cap;
    bool *in_value; /* the last piece was (part of) a value: the next field starts a new header */
    sp_buf_t *head;
} sp_hdr_acc_t;
#define SP_REQ_HDRS(r) ((sp_hdr_acc_t){&(r)->hdrs, &(r)->nhdrs, &(r)->hdrs_cap, &(r)->in_value, &(r)->head})
#define SP_RESP_HDRS(r)                                                                          \
    ((sp_hdr_acc_t){&(r)->rhdrs, &(r)->nrhdrs, &(r)->rhdrs_cap, &(r)->rin_value, &(r)->resp_head})
/* A piece of a header name. Returns false (nothing added) when it would start header max+1. */
static inline bool sp_hdrs_field(sp_hdr_acc_t *a, sp_fold_t *f, const char *at, size_t len, uint32_t max)
{
    if (*a->n == 0 || *a->in_value) {
        if (*a->n >= max)
            return false;
        if (*a->n == *a->cap) {
            *a->cap = *a->cap ? *a->cap * 2 : 16;
            *a->hdrs = sp_realloc(*a->hdrs, *a->cap * sizeof **a->hdrs);
        }
        sp_hdr_t *h = &(*a->hdrs)[(*a->n)++];
        h->name_off = (uint32_t)a->head->len;
        h->name_len = h->value_off = h->value_len = 0;
        *a->in_value = false;
    }
    sp_buf_add(a->head, at, len);
    (*a->hdrs)[*a->n - 1].name_len += (uint32_t)len;
    sp_fold_field(f, at + len);
    return true;
}
/* The name is complete: the value starts here, even if it turns out empty. */
static inline void sp_hdrs_field_complete(sp_hdr_acc_t *a)
{
    *a->in_value = true;
    (*a->hdrs)[*a->n - 1].value_off = (uint32_t)a->head->len;
}
/* A piece of a header value. Returns false (nothing added) when it follows an obsolete fold. */
static inline bool sp_hdrs_value(sp_hdr_acc_t *a, sp_fold_t *f, const char *at, size_t len)
{
    sp_hdr_t *h = &(*a->hdrs)[*a->n - 1];
    if (sp_fold_value(f, at, len, h->value_len > 0))
        return false;
    if (h->value_len == 0)
        h->value_off = (uint32_t)a->head->len;
    sp_buf_add(a->head, at, len);
    h->value_len += (uint32_t)len;
    return true;
}

/* Headers that frame or route a message: never hop-by-hop, so a Connection header that lists one
 * is refused (400 for a request, 502 for a response) instead of the header being dropped while
 * the message is still framed by it (request smuggling, a response planted on a pooled
 * connection). */
bool sp_framing_header(const char *name, size_t len);
/* The first header of hdrs[0..n) (names and values in base) named in a Connection header that
 * sp_framing_header protects, or NULL; *len gets its length. Every Connection header counts. */
const char *sp_connection_lists_framing(const char *base, const sp_hdr_t *hdrs, uint32_t n,
                                        size_t *len);

typedef enum {
    SP_DECIDE_NONE = 0,
    SP_DECIDE_RESPOND,
    SP_DECIDE_FORWARD,
} sp_decision_t;

/* Why an exchange ended badly; names appear in logs and in the Lua log phase. */
typedef enum {
    SP_ERR_NONE = 0,
    SP_ERR_CONNECT,        /* refused / unreachable / DNS: 502 */
    SP_ERR_CONNECT_TIMEOUT,/* 504 */
    SP_ERR_FIRST_BYTE_TIMEOUT, /* 504 */
    SP_ERR_UPSTREAM_IDLE,  /* connection closed */
    SP_ERR_UPSTREAM_CLOSED,/* closed before/within the response */
    SP_ERR_UPSTREAM_PROTOCOL, /* bad response framing: 502 */
    SP_ERR_CLIENT_ABORT,
    SP_ERR_CLIENT_TIMEOUT,
    SP_ERR_SCRIPT,
    SP_ERR_BODY_TOO_LARGE,
    SP_ERR_DRAIN,
    SP_ERR_ADDRESS_REFUSED,/* an address no sandbox may have (loopback, link-local...): 503 */
} sp_error_t;

extern const char *const sp_error_names[];

/*
 * One request, from its first byte to the end of its log phase. Slots are pooled per worker
 * and reused; `gen` changes on every reuse so a stale handle (a script that kept `req` after
 * the request ended) is detected. Buffers keep their capacity between uses.
 */
struct sp_request {
    /* ---- the slot: kept from one exchange to the next (its identity, and storage it reuses:
     * buffers keep their capacity, arrays are governed by counts in the exchange part) */
    sp_worker_t *w;
    uint32_t gen;
    uint32_t slot;
    void *script;         /* the scripting layer's per-slot data (the running task) */
    void *script_vm;      /* the Lua state that decided it (its log hook runs there too) */
    sp_buf_t head;
    sp_hdr_t *hdrs;
    uint32_t hdrs_cap;
    sp_buf_t out;         /* respond: the response head; forward: the upstream request head */
    sp_buf_t body;        /* respond: the response body */
    sp_buf_t extra;       /* header edits "<op>name\0value\0": '>' response header; '=' set, '+' add,
                           * '-' remove on the upstream request */
    sp_buf_t up_path;
    sp_buf_t resp_head;   /* the upstream response head as parsed */
    sp_hdr_t *rhdrs;
    uint32_t rhdrs_cap;
    uv_buf_t iov[SP_MAX_IOV];
    char frames[SP_MAX_IOV][20];
    /* counters held for the life of the exchange (req:hold), given back when it ends */
    struct {
        struct sp_shdict *dict;
        char key[128];
        uint8_t klen;
    } holds[4];

    /* ---- the exchange: everything from `conn` to the end starts at zero for each request
     * (sp_request_acquire clears it at once), so a field added here cannot leak from one
     * request into the next; a field that must survive goes above. */
    sp_conn_t *conn;      /* the HTTP/1.1 connection; NULL once gone, and for HTTP/2 streams */
    void *client;         /* the client side: the sp_conn_t, or an HTTP/2 stream (h2.c); NULL
                           * once it is gone */
    const sp_client_ops_t *cops; /* how the request machinery talks to `client` */
    uint32_t nhdrs, nrhdrs;
    bool script_busy;     /* the scripting layer still runs code for this request */
    bool core_done;       /* the core has finished with it (response sent or connection lost) */
    bool logged;

    /* parsed request head: bytes of the URL and the headers live in `head` */
    uint32_t url_len;     /* the URL starts at head.p[0] */
    uint32_t path_len;    /* bytes before '?' */
    bool in_value;
    uint8_t method;
    uint8_t vmajor, vminor;
    bool keepalive;
    bool chunked;
    bool has_body;
    bool upgrade;
    bool expect_continue;
    bool body_done;       /* the whole request body has been parsed */
    bool body_buffered;   /* the script read the body (req:read_body): it is in `body` */
    uint64_t body_limit;  /* the most bytes req:read_body accepts */
    uint64_t content_length;
    uint64_t body_bytes;  /* request body bytes received */
    char id[24];
    uint32_t id_len;
    char client_ip[48];   /* copied from the connection: the record outlives it */
    int client_port;
    const char *listener; /* "main", "demo", "metrics" */

    /* the decision */
    sp_decision_t decision;
    int status;           /* respond: the status */
    bool header_edits;    /* extra holds a '=' or '-' edit (only then is each header checked) */
    bool resp_prefix;     /* extra holds a 'P' entry: the prefix Location and Set-Cookie Path of the
                           * proxied response are put back under (req:set_response_prefix) */
    char up_host[256];
    int up_port;
    double to_connect, to_first_byte, to_idle; /* per-request timeouts (s), 0: defaults */
    char err_subject[64]; /* req:set_error_detail: the upstream error bodies get a "detail" naming
                           * it (the agent-sandbox router's shape); "" for the plain shape */

    /* forwarding state */
    sp_upconn_t *up;
    int connect_tries;
    bool head_sent;       /* the upstream request head has been written */
    bool up_tried;        /* forwarding started (sp_upstream_start) */
    bool up_sent;         /* request bytes were handed to a connected upstream socket: the sandbox
                           * may have received the request (never reset by a retry) */
    bool sent_continue;
    uint64_t body_forwarded;
    bool body_in_head;    /* iov[0..niov) holds body bytes sent with the head, not yet confirmed */
    bool resp_head_sent;  /* the response head has gone to the client */
    bool resp_done;
    bool resp_decode;     /* forward decoded body (HTTP/1.0 client, chunked upstream) */
    bool close_client;    /* close the client connection after this response */
    bool tunnel;
    bool rin_value;
    uint32_t reason_len;  /* reason phrase at resp_head.p[0] */
    unsigned niov;
    unsigned nframes;
    uint64_t chunk_left;  /* the current request chunk's size, to frame it */
    uint32_t chunk_ext_bytes; /* chunk-extension bytes seen in the request body */

    uint8_t nholds;

    /* the record of the exchange */
    int resp_status;
    uint64_t bytes_in, bytes_out;
    uint64_t t_start, t_head, t_connected, t_first_byte, t_end; /* uv_hrtime ns */
    char upstream_addr[64]; /* host:port (host cut at 50 bytes) */
    sp_error_t error;

    /* trace context (trace.c): filled by sp_trace_ensure, only when tracing is on */
    bool trace_ready;
    bool trace_has_parent; /* the client sent a valid traceparent */
    uint8_t trace_flags;
    char trace_id[32];     /* hex, not terminated */
    char trace_parent[16]; /* the client's span (when trace_has_parent) */
    char span_id[16];      /* the proxy's request span */
    char up_span_id[16];   /* the proxy's upstream span: the sandbox's parent */
    uint64_t t_forward;    /* uv_hrtime when forwarding began (0: not forwarded) */
    /* the wake span (req:wake_begin / req:wake_end, wake.lua): the request was held while its
     * sandbox woke or started; 0: never held */
    uint64_t t_wake_start, t_wake_end;
    char wake_outcome[16]; /* "ready", "timeout", "failed", ... ("" while held) */
    bool wake_patched;     /* this request's wake sent the PATCH */
    int wake_status;       /* the refused PATCH's HTTP status (outcome "failed"; 0: none) */
};

/*
 * The client side of a request, as the request machinery (upstream.c) sees it: an HTTP/1.1
 * connection (server.c) or an HTTP/2 stream (h2.c). Every op takes a request whose `client`
 * is not NULL.
 */
struct sp_client_ops {
    /* Sends response bytes. With `head`, bufs[0] is the response head as HTTP/1.1 text (built in
     * r->out; an HTTP/2 stream turns it into a HEADERS frame); the other buffers are body bytes
     * (de-chunked for an HTTP/2 stream: r->resp_decode). Returns 0 when the caller may go on at
     * once (the bytes are written or copied), 1 when it must wait for
     * sp_upstream_client_written, or a negative code when the client is gone (it has been
     * closed; the request is over on the client side). */
    int (*send)(sp_request_t *r, uv_buf_t *bufs, unsigned n, bool head);
    /* A send is still pending (the caller waits for sp_upstream_client_written). */
    bool (*busy)(const sp_request_t *r);
    /* The response is complete: end it and finish the exchange. */
    void (*finish)(sp_request_t *r);
    /* The exchange failed: an error response (status, JSON message) when no response head has
     * gone out, else the client side is cut (connection closed, stream reset). */
    void (*fail)(sp_request_t *r, int status, const char *msg);
    /* Cuts the client side now (a write failed, a tunnel ended). */
    void (*close)(sp_request_t *r);
    /* The upstream side can take request body bytes (the head went, or a body write completed). */
    void (*resume_body)(sp_request_t *r);
    /* Body bytes already received, as r->iov slices, to go out with the upstream head (0: none);
     * they stay put until the head is written (hold_body stops anything moving them). */
    unsigned (*take_body)(sp_request_t *r);
    void (*hold_body)(sp_request_t *r);
    /* The client connection ends after this exchange (HTTP/1.1 only; false for a stream). */
    bool (*last_exchange)(const sp_request_t *r);
    /* The upstream answered 101: relay raw bytes both ways (HTTP/1.1 only). */
    void (*start_tunnel)(sp_request_t *r);
};

/* The scripting layer's entry points; the core calls them, never Lua directly. */
typedef struct sp_hooks {
    /* The head of `req` is parsed. Decide now (return 1) or later (return 0, then call
     * sp_request_decided). Decisions are recorded with sp_request_respond/_forward. */
    int (*request)(sp_request_t *req);
    /* The exchange is over (response sent or connection lost); req is still readable. */
    void (*log)(sp_request_t *req);
    /* The client went away while the request was still being decided. */
    void (*abort)(sp_request_t *req);
    /* The slot is about to be reused or freed; drop any per-request state. */
    void (*release)(sp_request_t *req);
    /* A body read started by sp_request_read_body finished: err 0 (body in req->body) or a
     * negative code (-E2BIG over the limit, -EINVAL malformed, -ECONNRESET client gone). */
    void (*body_ready)(sp_request_t *req, int err);
} sp_hooks_t;

/* A client connection. */
struct sp_conn {
    uv_tcp_t tcp;
    sp_worker_t *w;
    sp_listener_t *listener;
    llhttp_t parser;
    char *rbuf;
    uint32_t rlen, rpos, rcap;
    int state;
    sp_request_t *req;
    sp_deadline_t dl;      /* the one timeout (T_* kinds in server.c), armed lazily */
    uv_write_t wreq;
    uv_shutdown_t sreq;
    char peer_ip[48];
    int peer_port;
    uint32_t nrequests;
    int err_status;        /* set by parser callbacks: 414, 431, 413 */
    sp_fold_t fold;        /* obs-fold detection over the request head */
    int handles;           /* open uv handles (tcp, timer) still to close */
    bool reading;
    bool eof;
    bool writing;
    bool closing;
    bool in_process;
    bool process_again;
    bool counted_ip;
    sp_h2_t *h2;           /* the HTTP/2 session once the connection switched to it (h2.c) */
    struct sp_conn *next, *prev; /* worker's list of open connections */
};

/* An upstream (sandbox) connection. */
struct sp_upconn {
    uv_tcp_t tcp;
    sp_worker_t *w;
    struct sp_upkey *key;
    llhttp_t parser;
    char *buf;
    uint32_t len, pos, cap;
    bool big_buf;          /* buf is from upstream_body_bufs */
    bool want_big;         /* a response body filled the buffer: take a body buffer when empty */
    sp_deadline_t dl;      /* the one timeout (UT_* kinds in upstream.c), armed lazily */
    uv_connect_t creq;
    uv_write_t wreq;
    uv_getaddrinfo_t gai;
    sp_request_t *req;
    int state;
    int rflags;            /* response parse progress (upstream.c RESP_*) */
    sp_fold_t fold;        /* obs-fold detection over the response head */
    int handles;           /* references: the tcp and timer handles, a running name lookup */
    uint32_t nrequests;
    bool reused;
    bool unchecked; /* taken from the pool without the quiet check (wbatch on): see up_write */
    bool writing;
    bool reading;
    bool closing;
    bool got_bytes;        /* any response byte for the current request */
    bool in_process;
    bool process_again;
    struct sp_upconn *next, *prev; /* idle list of its key */
};

struct sp_listener {
    uv_tcp_t tcp;
    sp_worker_t *w;
    const char *name;      /* "main", "demo", "metrics" */
    int port;
};

/* server.c */
extern const llhttp_settings_t sp_request_settings;
/* The core is done with r (the client side has let go of it): gives back its held counters,
 * aborts its upstream exchange if any, runs the log phase once and releases the slot when the
 * scripting layer is done too. */
void sp_request_end(sp_request_t *r);
/* Records a local error response: the JSON error body (status, message, request id, and the
 * agent-sandbox router's "detail" when set), keeping only the script's response headers. */
void sp_request_error_body(sp_request_t *r, int status, const char *msg);
/* Builds the head of the local response (r->status, r->body) as HTTP/1.1 text into r->out. */
void sp_request_local_head(sp_request_t *r);
/* Starts or stops the connection's idle (keep-alive) timeout. */
void sp_conn_idle_timer(sp_conn_t *c, bool on);
void sp_server_on_connection(uv_stream_t *server, int status);
/* Serves an already connected stream socket (fuzzing and tests: a socketpair). Returns 0 or a
 * negative libuv error. */
int sp_server_adopt(sp_listener_t *l, int fd);
/* The scripting layer finished deciding `req` asynchronously. */
void sp_request_decided(sp_request_t *req);
/* Records a local response. The body is copied. Returns 0 or -EINVAL when already decided. */
int sp_request_respond(sp_request_t *req, int status, const char *ctype, size_t ctlen,
                       const char *body, size_t blen);
/* Appends the script's response headers (op '>') to a response head being built. */
void sp_request_emit_response_headers(const sp_request_t *req, sp_buf_t *o);
/* The prefix a script asked the proxied response's Location and Set-Cookie Path to be put back
 * under (req:set_response_prefix), or NULL: nothing to rewrite. */
const char *sp_request_response_prefix(const sp_request_t *req, size_t *plen);
/* Appends the value of response header n (l bytes) to o: a Location or Set-Cookie rewritten
 * under pre (from sp_request_response_prefix; NULL: as it is). Every response path that relays
 * a sandbox's headers (HTTP/1.1 in upstream.c) writes their values through it. */
void sp_response_header_value(const sp_request_t *req, const char *pre, size_t plen, const char *n,
                              size_t l, const char *v, size_t vl, sp_buf_t *o);
/* Adds a header to the response sent to the client, local or proxied. -EINVAL on bad bytes. */
int sp_request_add_header(sp_request_t *req, const char *name, size_t nlen, const char *val,
                          size_t vlen);
/* Edits the request forwarded upstream: op '=' sets (replacing the client's), '+' adds,
 * '-' removes. -EINVAL on bad bytes. */
int sp_request_edit_header(sp_request_t *req, char op, const char *name, size_t nlen,
                           const char *val, size_t vlen);
/* Records a forward decision. Returns 0 or a negative errno-style code. */
int sp_request_forward(sp_request_t *req, const char *host, size_t hlen, int port,
                       const char *path, size_t plen);
/* Takes a unit of counter `key` in dict (capped at limit) for as long as the exchange lasts;
 * it is given back however the exchange ends. Returns 1 taken, 0 at the limit, -E2BIG when
 * the request already holds 4 counters or the key is too long. */
int sp_request_hold(sp_request_t *req, struct sp_shdict *dict, const char *key, size_t klen,
                    double limit);
/* Reads the whole request body into req->body (at most limit bytes) for the script.
 * Returns 1 when it is there now, 0 when the hook body_ready will be called, or a negative
 * code (-E2BIG when the declared length exceeds limit, -ENOTCONN). */
int sp_request_read_body(sp_request_t *req, uint64_t limit);
/* Looks up a request header (case-insensitive); returns the first value or NULL. */
const char *sp_request_header(const sp_request_t *req, const char *name, size_t nlen,
                              size_t *vlen);
/* True when the connection ends after this exchange (keep-alive request cap, drain). */
bool sp_conn_last_exchange(const sp_conn_t *c);
/* Called by upstream.c: the response is fully written (or failed) and the exchange is over. */
void sp_conn_finish_request(sp_conn_t *c);
/* Called by upstream.c: writes to the client. Returns 0 if written at once, 1 if pending
 * (cb will be called), or a negative libuv error. */
int sp_conn_write(sp_conn_t *c, uv_buf_t *bufs, unsigned n, uv_write_cb cb);
/* As sp_conn_write, but a small write may be staged (http/wbatch.h) and sent with the loop
 * iteration's others: then 2 (cb runs later in this iteration or the next, before the loop
 * sleeps; the bytes must stay until then). */
int sp_conn_send(sp_conn_t *c, uv_buf_t *bufs, unsigned n, uv_write_cb cb);
/* Closes the client connection now (no lingering). */
void sp_conn_close(sp_conn_t *c);
/* Sends a JSON error response (status, message) on the client for a request that has not
 * sent its response head yet, then finishes it. */
void sp_conn_error_response(sp_conn_t *c, int status, const char *msg);
/* Upstream asks the client side to continue parsing the request body (after the head is sent
 * or a write to the upstream completed). */
void sp_conn_resume_body(sp_conn_t *c);
/* Parses request body bytes already read from the client into r->iov (slices of the read
 * buffer) so the upstream head can carry them in the same write; returns how many slices.
 * 0 when none are buffered or the body must wait (100-continue); a malformed body is left for
 * the normal body path to report once the head is out. */
unsigned sp_conn_take_body(sp_conn_t *c);
/* Tunnel: start relaying raw client bytes to the upstream. */
void sp_conn_start_tunnel(sp_conn_t *c);
/* Stop/resume reading the client (backpressure from the upstream side). */
void sp_conn_read_stop(sp_conn_t *c);
void sp_conn_read_start(sp_conn_t *c);
/* A write started with sp_conn_write completed (call from its callback). */
void sp_conn_write_done(sp_conn_t *c);

/* upstream.c */
void sp_upstream_start(sp_request_t *req);
/* The client side took the bytes of a send that returned 1: continue the response. */
void sp_upstream_client_written(sp_request_t *r);
/* The client side has body bytes collected in req->iov to write upstream. Returns 0 if
 * written, 1 if pending (the client side is resumed later), <0 on error. */
int sp_upstream_write_body(sp_request_t *req);
/* The client wrote raw tunnel bytes. */
int sp_upstream_tunnel_write(sp_request_t *req, uv_buf_t *bufs, unsigned n);
/* The request ended on the client side (abort); detach and close the upstream connection. */
void sp_upstream_abort(sp_request_t *req);
/* A client write of response bytes completed; continue reading the upstream. */
void sp_upstream_client_drained(sp_request_t *req);
void sp_upstream_pool_destroy(sp_worker_t *w);
/* Closes idle pooled connections (drain / shutdown). */
void sp_upstream_close_idle(sp_worker_t *w);

const char *sp_status_reason(int status);

/* h2.c: HTTP/2 (h2c with prior knowledge) on a client connection */
extern const sp_client_ops_t sp_h2_client_ops;
/* 1: buf starts with the whole HTTP/2 client preface; 0: buf is a strict prefix of it (wait
 * for more); -1: it is not HTTP/2. */
int sp_h2_preface(const char *buf, size_t len);
/* Switches the connection to HTTP/2 (its read buffer holds the preface). 0 or -ENOMEM. */
int sp_h2_start(sp_conn_t *c);
/* Feeds the bytes in the connection's read buffer to the session. */
void sp_h2_input(sp_conn_t *c);
/* The connection is closing: every stream ends (logged, upstream aborted). */
void sp_h2_closed(sp_conn_t *c);
/* Draining: GOAWAY (streams in flight finish), then the connection closes when they have. */
void sp_h2_drain(sp_conn_t *c);
/* Closes the worker's h2c connections to sandboxes that carry no call (drain, stop). */
void sp_h2_upstream_close_idle(sp_worker_t *w);
void sp_h2_decided(sp_request_t *r);
int sp_h2_read_body(sp_request_t *r, uint64_t limit);

#endif
