/*
 * lua_request.c: the C functions behind the request object of scripts. They are exported
 * (SP_EXPORT) and bound with the LuaJIT FFI by runtime/lua/sp/request.lua, so the hot path
 * (reading the path, a header, deciding) compiles under the JIT. They take plain arguments and
 * caller-owned buffers; validity (the generation check) is done on the Lua side.
 */
#include "http.h"
#include "worker.h"

#include <errno.h>

SP_EXPORT uint32_t sp_req_gen(const sp_request_t *r) { return r->gen; }

SP_EXPORT const char *sp_req_method(const sp_request_t *r)
{
    return llhttp_method_name((llhttp_method_t)r->method);
}

SP_EXPORT const char *sp_req_target(const sp_request_t *r, size_t *len)
{
    *len = r->url_len;
    return r->head.p;
}

SP_EXPORT size_t sp_req_path_len(const sp_request_t *r) { return r->path_len; }

SP_EXPORT const char *sp_req_header(const sp_request_t *r, const char *name, size_t nlen,
                                    size_t *vlen)
{
    return sp_request_header(r, name, nlen, vlen);
}

SP_EXPORT int sp_req_header_count(const sp_request_t *r) { return (int)r->nhdrs; }

SP_EXPORT const char *sp_req_header_at(const sp_request_t *r, int i, size_t *nlen,
                                       const char **val, size_t *vlen)
{
    if (i < 0 || (uint32_t)i >= r->nhdrs)
        return NULL;
    const sp_hdr_t *h = &r->hdrs[i];
    *nlen = h->name_len;
    *val = r->head.p + h->value_off;
    *vlen = h->value_len;
    return r->head.p + h->name_off;
}

SP_EXPORT const char *sp_req_client_ip(const sp_request_t *r) { return r->client_ip; }

SP_EXPORT int sp_req_client_port(const sp_request_t *r) { return r->client_port; }

SP_EXPORT const char *sp_req_id(const sp_request_t *r, size_t *len)
{
    *len = r->id_len;
    return r->id;
}

SP_EXPORT const char *sp_req_listener(const sp_request_t *r) { return r->listener; }

SP_EXPORT int sp_req_http_version(const sp_request_t *r) { return r->vmajor * 10 + r->vminor; }

SP_EXPORT int sp_req_body_info(const sp_request_t *r, double *length)
{
    *length = r->chunked ? -1 : (double)r->content_length;
    return r->has_body;
}

SP_EXPORT int sp_req_is_upgrade(const sp_request_t *r) { return r->upgrade; }

SP_EXPORT int sp_req_connected(const sp_request_t *r) { return r->conn != NULL && !r->conn->closing; }

SP_EXPORT int sp_req_respond(sp_request_t *r, int status, const char *ct, size_t ctlen,
                             const char *body, size_t blen)
{
    return sp_request_respond(r, status, ct, ctlen, body, blen);
}

SP_EXPORT int sp_req_add_header(sp_request_t *r, const char *n, size_t nl, const char *v, size_t vl)
{
    if (r->resp_head_sent)
        return -EINVAL;
    return sp_request_add_header(r, n, nl, v, vl);
}

SP_EXPORT int sp_req_edit_header(sp_request_t *r, int op, const char *n, size_t nl, const char *v,
                                 size_t vl)
{
    return sp_request_edit_header(r, (char)op, n, nl, v, vl);
}

SP_EXPORT int sp_req_forward(sp_request_t *r, const char *host, size_t hl, int port,
                             const char *path, size_t pl)
{
    return sp_request_forward(r, host, hl, port, path, pl);
}

SP_EXPORT void sp_req_set_timeouts(sp_request_t *r, double connect, double first_byte, double idle)
{
    if (connect > 0)
        r->to_connect = connect;
    if (first_byte > 0)
        r->to_first_byte = first_byte;
    if (idle > 0)
        r->to_idle = idle;
}

SP_EXPORT int sp_req_decision(const sp_request_t *r) { return (int)r->decision; }

/* ---- the record of the exchange (log phase) */

SP_EXPORT int sp_req_status(const sp_request_t *r) { return r->resp_status; }
SP_EXPORT double sp_req_bytes_in(const sp_request_t *r) { return (double)r->bytes_in; }
SP_EXPORT double sp_req_bytes_out(const sp_request_t *r) { return (double)r->bytes_out; }

static double span(uint64_t a, uint64_t b) { return (a && b && b >= a) ? (double)(b - a) / 1e9 : -1; }

SP_EXPORT double sp_req_duration(const sp_request_t *r)
{
    return span(r->t_start, r->t_end ? r->t_end : uv_hrtime());
}
SP_EXPORT double sp_req_connect_time(const sp_request_t *r) { return span(r->t_head, r->t_connected); }
SP_EXPORT double sp_req_first_byte_time(const sp_request_t *r)
{
    return span(r->t_head, r->t_first_byte);
}
SP_EXPORT const char *sp_req_upstream_addr(const sp_request_t *r) { return r->upstream_addr; }
SP_EXPORT const char *sp_req_error(const sp_request_t *r) { return sp_error_names[r->error]; }
SP_EXPORT int sp_req_worker(const sp_request_t *r) { return r->w->id; }
