/*
 * headers.c: the header block of an HTTP/1 message as llhttp hands it over in pieces, for both
 * parsers (requests in server.c, responses in upstream.c): the obsolete line folding detector
 * (sp_fold_*) and the accumulation of names and values into a head buffer with an sp_hdr_t of
 * offsets per header (sp_hdrs_*), and the check that a Connection header names no framing
 * header (sp_connection_lists_framing). Limits on sizes and counts are the callers'.
 */
#include "http/http.h"

void sp_fold_skip(sp_fold_t *f, const char *to)
{
    if (!f->mark || to <= f->mark)
        return;
    for (const char *q = f->mark; q < to; q++) {
        if (f->lf)
            f->after_lf = true;
        if (*q == '\n')
            f->lf = true;
    }
    f->gap += (uint32_t)(to - f->mark);
    f->mark = to;
}

void sp_fold_field(sp_fold_t *f, const char *end)
{
    f->mark = end;
    f->gap = 0;
    f->lf = f->after_lf = false;
}

bool sp_fold_value(sp_fold_t *f, const char *at, size_t len, bool continuation)
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

bool sp_hdrs_field(sp_hdr_acc_t *a, sp_fold_t *f, const char *at, size_t len, uint32_t max)
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

void sp_hdrs_field_complete(sp_hdr_acc_t *a)
{
    *a->in_value = true;
    (*a->hdrs)[*a->n - 1].value_off = (uint32_t)a->head->len;
}

bool sp_hdrs_value(sp_hdr_acc_t *a, sp_fold_t *f, const char *at, size_t len)
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

/* ---------------------------------------------------------------- framing checks */

bool sp_framing_header(const char *n, size_t l)
{
    return sp_ieq(n, l, "content-length") || sp_ieq(n, l, "transfer-encoding") ||
           sp_ieq(n, l, "host");
}

const char *sp_connection_lists_framing(const char *base, const sp_hdr_t *hdrs, uint32_t n,
                                        size_t *len)
{
    for (uint32_t i = 0; i < n; i++) {
        if (!sp_ieq(base + hdrs[i].name_off, hdrs[i].name_len, "connection"))
            continue;
        const char *v = base + hdrs[i].value_off, *t;
        size_t pos = 0, tl;
        while ((tl = sp_next_token(v, hdrs[i].value_len, &pos, &t)) > 0)
            if (sp_framing_header(t, tl)) {
                *len = tl;
                return t;
            }
    }
    return NULL;
}
