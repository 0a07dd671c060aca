/*
 * kube.c: the Kubernetes API transport (see kube.h). One curl multi handle per client; its
 * sockets are watched with uv_poll handles and its timeout with a uv_timer, the pattern of
 * libcurl's multi-uv example. Each request is an easy handle with the client's TLS settings
 * and an Authorization header built from the current token.
 */
#include "kube/kube.h"
#include "base/buf.h"
#include "base/log.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

struct sp_kube {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    char *server;
    char *token;       /* fixed token, or the last one read from token_file */
    char *token_file;
    double token_read_at;
    double token_refresh;
    bool token_stale;
    char *ca_file, *cert_file, *key_file;
    sp_buf_t ca_data, cert_data, key_data;
    bool insecure;
    bool compression;
    int handles;       /* open uv handles (the timer and polls) */
    bool freeing;
    struct sp_kreq *reqs;
};

struct sp_kreq {
    sp_kube_t *k;
    CURL *easy;
    struct curl_slist *headers;
    char *body;
    sp_kreq_data_cb on_data;
    sp_kreq_done_cb on_done;
    void *ud;
    long status;
    double retry_after;
    char content_type[128];
    char errbuf[CURL_ERROR_SIZE];
    bool cancelled;
    struct sp_kreq *next, *prev;
};

typedef struct poll_ctx {
    uv_poll_t poll;
    curl_socket_t fd;
    sp_kube_t *k;
} poll_ctx_t;

static void check_done(sp_kube_t *k);

static void on_poll_closed(uv_handle_t *h)
{
    poll_ctx_t *pc = h->data;
    sp_kube_t *k = pc->k;
    free(pc);
    if (--k->handles == 0 && k->freeing)
        free(k);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    poll_ctx_t *pc = h->data;
    sp_kube_t *k = pc->k;
    int flags = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    int running;
    curl_multi_socket_action(k->multi, pc->fd, flags, &running);
    check_done(k);
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    SP_UNUSED(easy);
    sp_kube_t *k = userp;
    poll_ctx_t *pc = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (pc) {
            uv_poll_stop(&pc->poll);
            uv_close((uv_handle_t *)&pc->poll, on_poll_closed);
            curl_multi_assign(k->multi, s, NULL);
        }
        return 0;
    }
    if (!pc) {
        pc = sp_calloc(1, sizeof *pc);
        pc->fd = s;
        pc->k = k;
        if (uv_poll_init_socket(k->loop, &pc->poll, s) != 0) {
            free(pc);
            return -1;
        }
        pc->poll.data = pc;
        k->handles++;
        curl_multi_assign(k->multi, s, pc);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&pc->poll, events, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t)
{
    sp_kube_t *k = t->data;
    int running;
    curl_multi_socket_action(k->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(k);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    SP_UNUSED(multi);
    sp_kube_t *k = userp;
    if (timeout_ms < 0)
        uv_timer_stop(&k->timer);
    else
        uv_timer_start(&k->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

static void req_free(sp_kreq_t *r)
{
    sp_kube_t *k = r->k;
    if (r->prev)
        r->prev->next = r->next;
    else
        k->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    curl_multi_remove_handle(k->multi, r->easy);
    curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->headers);
    free(r->body);
    free(r);
}

static void check_done(sp_kube_t *k)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(k->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        sp_kreq_t *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        CURLcode code = m->data.result;
        long status = 0;
        curl_easy_getinfo(m->easy_handle, CURLINFO_RESPONSE_CODE, &status);
        if (r && !r->cancelled && r->on_done) {
            r->status = status;
            const char *msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(code);
            r->on_done(r, (int)code, msg, status, r->ud);
        }
        if (r)
            req_free(r);
    }
}

static void on_timer_closed(uv_handle_t *h)
{
    sp_kube_t *k = h->data;
    if (--k->handles == 0 && k->freeing)
        free(k);
}

static int read_file(const char *path, sp_buf_t *out)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    char tmp[4096];
    size_t n;
    out->len = 0;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0)
        sp_buf_add(out, tmp, n);
    fclose(f);
    return 0;
}

/* Reads the token file when it is due (every token_refresh seconds, or after a 401). */
static void refresh_token(sp_kube_t *k)
{
    if (!k->token_file)
        return;
    double now = (double)sp_mono_ms() / 1000.0;
    if (k->token && !k->token_stale && now - k->token_read_at < k->token_refresh)
        return;
    sp_buf_t b = {0};
    if (read_file(k->token_file, &b) != 0) {
        sp_log(SP_LOG_WARN, "cannot read the Kubernetes token file", "s:path", k->token_file,
               "s:error", strerror(errno), NULL);
        sp_buf_free(&b);
        return;
    }
    while (b.len && (b.p[b.len - 1] == '\n' || b.p[b.len - 1] == '\r' || b.p[b.len - 1] == ' '))
        b.len--;
    char *tok = sp_strndup(b.p ? b.p : "", b.len);
    sp_buf_free(&b);
    if (k->token && strcmp(k->token, tok) != 0)
        sp_log(SP_LOG_INFO, "Kubernetes token changed on disk: using the new one", "s:path",
               k->token_file, NULL);
    free(k->token);
    k->token = tok;
    k->token_read_at = now;
    k->token_stale = false;
}

static char *dup_or_null(const char *s) { return s ? sp_strdup(s) : NULL; }

sp_kube_t *sp_kube_new(uv_loop_t *loop, const sp_kube_conf_t *c, char err[256])
{
    if (!c->server || (strncmp(c->server, "http://", 7) != 0 && strncmp(c->server, "https://", 8) != 0)) {
        snprintf(err, 256, "kube server must be an http:// or https:// URL");
        return NULL;
    }
    static bool global_init;
    if (!global_init) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        global_init = true;
    }
    sp_kube_t *k = sp_calloc(1, sizeof *k);
    k->loop = loop;
    k->server = sp_strdup(c->server);
    size_t sl = strlen(k->server);
    if (sl > 0 && k->server[sl - 1] == '/')
        k->server[sl - 1] = '\0';
    k->token = dup_or_null(c->token);
    k->token_file = dup_or_null(c->token_file);
    k->token_refresh = c->token_refresh > 0 ? c->token_refresh : 60;
    k->ca_file = dup_or_null(c->ca_file);
    k->cert_file = dup_or_null(c->cert_file);
    k->key_file = dup_or_null(c->key_file);
    if (c->ca_data)
        sp_buf_adds(&k->ca_data, c->ca_data);
    if (c->cert_data)
        sp_buf_adds(&k->cert_data, c->cert_data);
    if (c->key_data)
        sp_buf_adds(&k->key_data, c->key_data);
    k->insecure = c->insecure;
    k->compression = c->compression;
    k->multi = curl_multi_init();
    curl_multi_setopt(k->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(k->multi, CURLMOPT_SOCKETDATA, k);
    curl_multi_setopt(k->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(k->multi, CURLMOPT_TIMERDATA, k);
    uv_timer_init(loop, &k->timer);
    k->timer.data = k;
    k->handles = 1;
    if (k->insecure)
        sp_log(SP_LOG_WARN, "INSECURE: the Kubernetes API server certificate is NOT verified "
               "(kube_insecure_skip_verify); use only for development", "s:server", k->server,
               NULL);
    refresh_token(k);
    return k;
}

const char *sp_kube_server(const sp_kube_t *k) { return k->server; }
uv_loop_t *sp_kube_loop(const sp_kube_t *k) { return k->loop; }
void sp_kube_token_stale(sp_kube_t *k) { k->token_stale = true; }

void sp_kube_free(sp_kube_t *k)
{
    if (!k)
        return;
    while (k->reqs) {
        k->reqs->cancelled = true;
        req_free(k->reqs);
    }
    curl_multi_cleanup(k->multi); /* removes sockets: socket_cb closes their polls */
    free(k->server);
    free(k->token);
    free(k->token_file);
    free(k->ca_file);
    free(k->cert_file);
    free(k->key_file);
    sp_buf_free(&k->ca_data);
    sp_buf_free(&k->cert_data);
    sp_buf_free(&k->key_data);
    k->freeing = true;
    uv_timer_stop(&k->timer);
    uv_close((uv_handle_t *)&k->timer, on_timer_closed);
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *ud)
{
    sp_kreq_t *r = ud;
    size_t n = size * nmemb;
    if (r->cancelled)
        return 0;
    if (!r->status)
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->on_data && r->on_data(r, data, n, r->ud) != 0)
        return 0; /* abort */
    return n;
}

static size_t header_cb(char *data, size_t size, size_t nmemb, void *ud)
{
    sp_kreq_t *r = ud;
    size_t n = size * nmemb;
    if (n > 12 && strncasecmp(data, "Retry-After:", 12) == 0) {
        char tmp[32];
        size_t l = SP_MIN(n - 12, sizeof tmp - 1);
        memcpy(tmp, data + 12, l);
        tmp[l] = '\0';
        char *end;
        double v = strtod(tmp, &end);
        if (end != tmp && v >= 0)
            r->retry_after = v;
    } else if (n > 13 && strncasecmp(data, "Content-Type:", 13) == 0) {
        const char *v = data + 13;
        size_t l = n - 13;
        while (l && (*v == ' ' || *v == '\t'))
            v++, l--;
        while (l && (v[l - 1] == '\r' || v[l - 1] == '\n' || v[l - 1] == ' '))
            l--;
        l = SP_MIN(l, sizeof r->content_type - 1);
        memcpy(r->content_type, v, l);
        r->content_type[l] = '\0';
    } else if (n > 9 && strncmp(data, "HTTP/", 5) == 0) {
        /* a new response head (after a 100 Continue): reset what we captured */
        r->retry_after = -1;
        r->content_type[0] = '\0';
    }
    return n;
}

static void set_blob(CURL *e, CURLoption opt, sp_buf_t *b)
{
    struct curl_blob blob = {b->p, b->len, CURL_BLOB_COPY};
    curl_easy_setopt(e, opt, &blob);
}

sp_kreq_t *sp_kube_request(sp_kube_t *k, const char *method, const char *path,
                           const char *content_type, const char *body, size_t blen,
                           long timeout_ms, sp_kreq_data_cb on_data, sp_kreq_done_cb on_done,
                           void *ud)
{
    refresh_token(k);
    sp_kreq_t *r = sp_calloc(1, sizeof *r);
    r->k = k;
    r->on_data = on_data;
    r->on_done = on_done;
    r->ud = ud;
    r->retry_after = -1;
    CURL *e = r->easy = curl_easy_init();
    sp_buf_t url = {0};
    sp_buf_adds(&url, k->server);
    sp_buf_adds(&url, path);
    sp_buf_addc(&url, '\0');
    curl_easy_setopt(e, CURLOPT_URL, url.p);
    sp_buf_free(&url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    if (k->compression)
        curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
    if (timeout_ms > 0)
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "sandbox-proxy/" SP_VERSION);
    if (k->insecure) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (k->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, k->ca_file);
    else if (k->ca_data.len)
        set_blob(e, CURLOPT_CAINFO_BLOB, &k->ca_data);
    if (k->cert_file)
        curl_easy_setopt(e, CURLOPT_SSLCERT, k->cert_file);
    else if (k->cert_data.len)
        set_blob(e, CURLOPT_SSLCERT_BLOB, &k->cert_data);
    if (k->key_file)
        curl_easy_setopt(e, CURLOPT_SSLKEY, k->key_file);
    else if (k->key_data.len)
        set_blob(e, CURLOPT_SSLKEY_BLOB, &k->key_data);
    r->headers = curl_slist_append(r->headers, "Accept: application/json");
    if (k->token && *k->token) {
        sp_buf_t h = {0};
        sp_buf_adds(&h, "Authorization: Bearer ");
        sp_buf_adds(&h, k->token);
        sp_buf_addc(&h, '\0');
        r->headers = curl_slist_append(r->headers, h.p);
        sp_buf_free(&h);
    }
    if (content_type) {
        char h[160];
        snprintf(h, sizeof h, "Content-Type: %s", content_type);
        r->headers = curl_slist_append(r->headers, h);
    }
    r->headers = curl_slist_append(r->headers, "Expect:");
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    if (strcmp(method, "GET") != 0)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    if (body) {
        r->body = sp_malloc(blen ? blen : 1);
        memcpy(r->body, body, blen);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)blen);
    }
    r->next = k->reqs;
    if (k->reqs)
        k->reqs->prev = r;
    k->reqs = r;
    if (curl_multi_add_handle(k->multi, e) != CURLM_OK) {
        req_free(r);
        return NULL;
    }
    return r;
}

void sp_kreq_cancel(sp_kreq_t *r)
{
    if (!r)
        return;
    r->cancelled = true;
    req_free(r);
}

long sp_kreq_status(const sp_kreq_t *r) { return r->status; }
double sp_kreq_retry_after(const sp_kreq_t *r) { return r->retry_after; }
const char *sp_kreq_content_type(const sp_kreq_t *r) { return r->content_type; }
