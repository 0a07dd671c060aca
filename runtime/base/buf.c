/*
 * buf.c: growable buffers, JSON escaping and block pools (see buf.h).
 */
#include "base/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void sp_buf_grow(sp_buf_t *b, size_t extra)
{
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    if (b->borrowed) {
        char *p = sp_malloc(cap);
        memcpy(p, b->p, b->len);
        b->p = p;
        b->borrowed = false;
    } else {
        b->p = sp_realloc(b->p, cap);
    }
    b->cap = cap;
}

void sp_buf_addf(sp_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    sp_buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
/* Non-zero if a byte of w is below n (n <= 128) / is zero: exact answers for the whole word. */
#define HAS_LESS(w, n) (((w) - ONES * (n)) & ~(w) & HIGHS)
#define HAS_ZERO(w) HAS_LESS(w, 1)

static inline uint64_t json_word_special(uint64_t w)
{
    return HAS_LESS(w, 0x20) | HAS_ZERO(w ^ (ONES * '"')) | HAS_ZERO(w ^ (ONES * '\\')) |
           HAS_ZERO(w ^ (ONES * 0x7f));
}

void sp_buf_json_str(sp_buf_t *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    sp_buf_reserve(b, n + 2);
    b->p[b->len++] = '"';
    size_t i = 0;
    while (i < n) {
        /* copy the run of bytes that need no escape in one go; find its end 8 bytes at a time
         * (a word has a byte to escape if a byte is < 0x20 or equals '"', '\\' or 0x7f) */
        size_t j = i;
        while (j + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + j, 8);
            if (json_word_special(w))
                break;
            j += 8;
        }
        while (j < n) {
            unsigned char c = (unsigned char)s[j];
            if (c < 0x20 || c == '"' || c == '\\' || c == 0x7f)
                break;
            j++;
        }
        sp_buf_add(b, s + i, j - i);
        if (j == n)
            break;
        unsigned char c = (unsigned char)s[j];
        switch (c) {
        case '"': sp_buf_add(b, "\\\"", 2); break;
        case '\\': sp_buf_add(b, "\\\\", 2); break;
        case '\n': sp_buf_add(b, "\\n", 2); break;
        case '\r': sp_buf_add(b, "\\r", 2); break;
        case '\t': sp_buf_add(b, "\\t", 2); break;
        default: {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sp_buf_add(b, e, 6);
        }
        }
        i = j + 1;
    }
    sp_buf_addc(b, '"');
}

void sp_buf_free(sp_buf_t *b)
{
    if (!b->borrowed)
        free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->borrowed = false;
}

void sp_pool_init(sp_pool_t *p, size_t block_size, size_t keep)
{
    p->block_size = block_size;
    p->keep = keep;
    p->nfree = 0;
    p->in_use = 0;
    p->free = sp_calloc(keep ? keep : 1, sizeof(void *));
}

void *sp_pool_get(sp_pool_t *p)
{
    p->in_use++;
    if (p->nfree)
        return p->free[--p->nfree];
    return sp_malloc(p->block_size);
}

void sp_pool_put(sp_pool_t *p, void *block)
{
    if (!block)
        return;
    p->in_use--;
    if (p->nfree < p->keep)
        p->free[p->nfree++] = block;
    else
        free(block);
}

void sp_pool_destroy(sp_pool_t *p)
{
    for (size_t i = 0; i < p->nfree; i++)
        free(p->free[i]);
    free(p->free);
    p->free = NULL;
    p->nfree = 0;
}
