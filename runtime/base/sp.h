/*
 * sp.h: small shared definitions for the whole runtime: allocation that aborts on OOM,
 * the export attribute for functions the Lua FFI glue calls, clocks and string helpers.
 * It owns no state. Nothing here includes Lua headers.
 */
#ifndef SP_H
#define SP_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

#define SP_VERSION "0.1.0"

/* Functions the LuaJIT FFI glue (runtime/lua/sp/ modules) binds to by name. */
#define SP_EXPORT __attribute__((visibility("default")))

#define SP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define SP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SP_MAX(a, b) ((a) > (b) ? (a) : (b))
#define SP_UNUSED(x) ((void)(x))
#define SP_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* Allocation aborts the process on OOM (STYLE: no NULL checks everywhere). */
void *sp_malloc(size_t n);
void *sp_calloc(size_t count, size_t n);
void *sp_realloc(void *p, size_t n);
char *sp_strndup(const char *s, size_t n);
char *sp_strdup(const char *s);

/* Monotonic milliseconds since an arbitrary start, and wall-clock seconds (fractional). */
uint64_t sp_mono_ms(void);
double sp_wall_time(void);
/* Formats the UTC time t (seconds since epoch) as ISO 8601 with milliseconds into out[32]. */
void sp_iso8601(double t, char out[32]);

/* The one hash of the runtime's tables (routes, shared dicts, upstream pools, per-address
 * connection counts, watch keys): 64-bit FNV-1a. sp_hash_more continues a hash (or starts one
 * from SP_HASH_INIT mixed with a seed). */
#define SP_HASH_INIT 1469598103934665603ull
static inline uint64_t sp_hash_more(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ull;
    }
    return h;
}
static inline uint64_t sp_hash(const void *p, size_t n) { return sp_hash_more(SP_HASH_INIT, p, n); }

/* ASCII case-insensitive equality of a[0..alen) and a lowercase literal (inline: header names
 * are compared many times per request; the literal's length folds at compile time). */
static inline bool sp_ieq(const char *a, size_t alen, const char *lower_lit)
{
    size_t n = strlen(lower_lit);
    if (alen != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower_lit[i])
            return false;
    }
    return true;
}
/* The next token of a comma-separated header list from *pos (spaces and tabs around it trimmed):
 * sets *tok and returns its length; 0 when the list has no more tokens. */
size_t sp_next_token(const char *list, size_t len, size_t *pos, const char **tok);
/* Returns true if `hay` (len) contains the token `tok` (lowercase) in a comma list, case-insensitive. */
bool sp_has_token(const char *hay, size_t len, const char *tok);

#endif
