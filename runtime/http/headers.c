/*
 * headers.c: the header block of an HTTP/1 message as llhttp hands it over in pieces, for both
 * parsers (requests in server.c, responses in upstream.c): the obsolete line folding detector
 * (sp_fold_skip; sp_fold_field/value and the accumulation of names and values, sp_hdrs_*, are
 * inline in http.h: they run for every header piece), and the check that a Connection header names no framing
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
