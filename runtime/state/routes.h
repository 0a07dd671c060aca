/*
 * routes.h: the process-wide route table, shared by every worker. A route maps a key
 * ("user/sandbox") to where the sandbox is and whether it is ready. Reads copy one entry out
 * under a per-shard lock held for a hash lookup and a memcpy, so a reader never waits behind
 * more than one short write; writers (discovery) take the same shard lock per entry.
 */
#ifndef SP_ROUTES_H
#define SP_ROUTES_H

#include "base/sp.h"
#include "base/buf.h"

typedef enum {
    SP_RF_NAMESPACE,
    SP_RF_NAME,
    SP_RF_USER,
    SP_RF_ADDRESS,
    SP_RF_REASON,
    SP_RF_SERVICE,
    SP_RF_CONFLICT,
    SP_RF_MODE,
    SP_RF_META,
    SP_RF_API_VERSION,
    SP_RF_RESOURCE_VERSION,
    SP_RF_IDLE_TIMEOUT,
    SP_RF_LAST_ACTIVITY,
    SP_RF_CLAIM,
    SP_RF_ALIAS_OF,
    SP_RF_PORTS,  /* more ports the sandbox serves ("3000,5173"; discovery: an annotation) */
    SP_RF_PREFIX, /* path routing's prefix mode ("strip", "keep"; empty: the config's) */
    SP_RF_COUNT
} sp_route_field_t;

extern const char *const sp_route_field_names[SP_RF_COUNT];

/* What a writer supplies; strings need not be NUL-terminated (NULL means empty). */
typedef struct sp_route_in {
    const char *s[SP_RF_COUNT];
    size_t n[SP_RF_COUNT];
    int port;
    bool ready;
} sp_route_in_t;

/* One stored route, also the layout of a copy handed to readers. Strings are NUL-terminated. */
typedef struct sp_route {
    struct sp_route *next;
    uint64_t hash;
    uint64_t version; /* table generation when this entry was last written */
    double updated;   /* wall time of that write */
    int port;
    bool ready;
    uint32_t size;    /* bytes of this whole block */
    uint32_t klen;
    uint32_t off[SP_RF_COUNT];
    uint32_t len[SP_RF_COUNT];
    char data[];      /* key\0 then each field\0 */
} sp_route_t;

static inline const char *sp_route_key(const sp_route_t *r) { return r->data; }
static inline const char *sp_route_field(const sp_route_t *r, int f) { return r->data + r->off[f]; }

void sp_routes_init(void);
void sp_routes_destroy(void);
/* Inserts or replaces the route for key. Returns 1 when created, 0 when replaced. */
int sp_routes_set(const char *key, size_t klen, const sp_route_in_t *in);
/* Copies the route for key into out (out->p then points at an sp_route_t). False if absent. */
bool sp_routes_get(const char *key, size_t klen, sp_buf_t *out);
/* Returns the generation of key's entry without copying it (0 when absent). */
uint64_t sp_routes_version_of(const char *key, size_t klen);
/* Removes key. Returns true if it existed. */
bool sp_routes_delete(const char *key, size_t klen);
size_t sp_routes_count(void);
/* Increases on every set or delete. */
uint64_t sp_routes_generation(void);
/* Copies every route into out, packed one after another (each sp_route_t, size bytes, 8-aligned);
 * returns how many. The copy is consistent per shard, not across shards. */
size_t sp_routes_snapshot(sp_buf_t *out);
size_t sp_routes_count_ready(void);
/* Sorted range read of the keys: up to max keys that start with prefix (plen 0: all) and sort
 * after `after` (NULL: from the start of the prefix's range), in byte order. Each key is
 * appended to keys as a uint32_t length then its bytes. *more is set when another key of the
 * range follows; *work is increased by the index entries examined (the cost: O(log n + max)).
 * Returns how many keys. */
size_t sp_routes_range(const char *prefix, size_t plen, const char *after, size_t alen,
                       size_t max, sp_buf_t *keys, bool *more, size_t *work);

/* The name index: "namespace/name" -> route key, kept by whoever sets routes (discovery), so
 * a sandbox (or a SandboxClaim's alias) can be found by namespace and name from any worker. */
void sp_routes_index_set(const char *name, size_t nlen, const char *key, size_t klen);
bool sp_routes_index_get(const char *name, size_t nlen, sp_buf_t *key);
bool sp_routes_index_delete(const char *name, size_t nlen);
size_t sp_routes_index_count(void);

#endif
