/*
 * fuzz_watch.c: libFuzzer harness for the Kubernetes watch-stream framer and the LIST page
 * reader (kwatch.c + json_scan.c): the input is split into chunks at positions taken from its
 * first bytes and fed as a watch stream, then read as a LIST page. Events are checked to be
 * delivered as complete JSON values.
 */
#include "kube/kwatch.h"
#include "base/json_scan.h"

#include <stdlib.h>
#include <string.h>

static size_t events;

static void on_event(void *ud, const char *type, const char *obj, size_t len)
{
    (void)ud;
    (void)type;
    /* the engine hands out a whole, valid JSON value */
    if (sp_json_skip(obj, obj + len) != obj + len)
        abort();
    events++;
}

static void on_synced(void *ud, const char *rv, size_t count, bool relist)
{
    (void)ud;
    (void)rv;
    (void)count;
    (void)relist;
}

static void on_error(void *ud, long s, const char *r, const char *m, double d)
{
    (void)ud, (void)s, (void)r, (void)m, (void)d;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const sp_kwatch_cbs_t cbs = {on_event, on_synced, on_error};
    if (size < 2)
        return 0;
    size_t step = 1 + (data[0] % 64); /* chunk size, down to byte by byte */
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    sp_kwatch_t *w = sp_kwatch_detached(&cbs, NULL);
    for (size_t off = 0; off < n; off += step) {
        size_t len = n - off < step ? n - off : step;
        if (sp_kwatch_feed_stream(w, p + off, len))
            break;
    }
    sp_kwatch_feed_page(w, p, n, true);
    sp_kwatch_free_detached(w);
    return 0;
}
