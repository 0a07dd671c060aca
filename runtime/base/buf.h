/*
 * buf.h: growable byte buffers, JSON string escaping into them, and per-worker pools of
 * fixed-size blocks (read buffers). Pools are not thread-safe: each worker owns its own.
 */
#ifndef SP_BUF_H
#define SP_BUF_H

#include "base/sp.h"

typedef struct sp_buf {
    char *p;
    size_t len;
    size_t cap;
    bool borrowed; /* p is caller storage (e.g. a stack array): copied to the heap on growth */
} sp_buf_t;

/* A buffer over caller storage; sp_buf_free releases only what growth allocated. */
#define SP_BUF_ON(storage) ((sp_buf_t){(storage), 0, sizeof(storage), true})

/* Grows b to hold `extra` more bytes (the slow path of sp_buf_reserve); aborts on OOM. */
void sp_buf_grow(sp_buf_t *b, size_t extra);

/* Ensures room for `extra` more bytes; aborts on OOM. The appends below are inline: they run
 * many times per request while heads are built. */
static inline void sp_buf_reserve(sp_buf_t *b, size_t extra)
{
    if (b->len + extra > b->cap)
        sp_buf_grow(b, extra);
}

static inline void sp_buf_add(sp_buf_t *b, const void *data, size_t n)
{
    if (n == 0)
        return;
    sp_buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static inline void sp_buf_adds(sp_buf_t *b, const char *s) { sp_buf_add(b, s, strlen(s)); }

/* Appends a string literal (length known at compile time). */
#define sp_buf_lit(b, lit) sp_buf_add((b), "" lit, sizeof(lit) - 1)

static inline void sp_buf_addc(sp_buf_t *b, char c)
{
    sp_buf_reserve(b, 1);
    b->p[b->len++] = c;
}

/* Appends v in decimal. */
static inline void sp_buf_addu(sp_buf_t *b, uint64_t v)
{
    char tmp[20];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    sp_buf_add(b, tmp + i, sizeof tmp - i);
}

void sp_buf_addf(sp_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a quoted, escaped JSON string. */
void sp_buf_json_str(sp_buf_t *b, const char *s, size_t n);
void sp_buf_free(sp_buf_t *b);
static inline void sp_buf_reset(sp_buf_t *b) { b->len = 0; }

/* A freelist of blocks of one size. `keep` bounds how many free blocks are retained. */
typedef struct sp_pool {
    size_t block_size;
    size_t keep;
    size_t nfree;
    size_t in_use;
    void **free;
} sp_pool_t;

void sp_pool_init(sp_pool_t *p, size_t block_size, size_t keep);
/* Returns a block of block_size bytes (uninitialised). Never NULL. */
void *sp_pool_get(sp_pool_t *p);
void sp_pool_put(sp_pool_t *p, void *block);
void sp_pool_destroy(sp_pool_t *p);

#endif
