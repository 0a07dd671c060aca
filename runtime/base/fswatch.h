/*
 * fswatch.h: the one change watcher (fswatch.c) behind the script/config reload (process/main.c)
 * and fs.watch (lua/lua_core.c). inotify on directories says "something may have changed"; a
 * burst of events settles for debounce_ms (a burst that goes on is checked 10 x debounce_ms
 * after it began: a log file written in the same directory must not postpone it for ever);
 * then a signature of what is watched (the caller's function, typically sp_stat_sig over the
 * files) decides: only a different value calls the callback. A timer re-checks the signature every poll_ms as the backstop for changes inotify
 * does not report (some volume types, a directory created later); what it finds settles too.
 */
#ifndef SP_FSWATCH_H
#define SP_FSWATCH_H

#include <uv.h>

#include "base/sp.h"

typedef struct sp_fswatch sp_fswatch_t;
typedef uint64_t (*sp_fswatch_sig_fn)(void *ud);
typedef void (*sp_fswatch_fn)(void *ud);

#define SP_FSWATCH_MAX_DIRS 2

/* Starts watching dirs[0..ndirs) (ndirs <= SP_FSWATCH_MAX_DIRS; a directory that does not exist
 * is covered by the poll only). The signature is taken now; changed(ud) runs on the loop each
 * time it differs from the last one taken. */
sp_fswatch_t *sp_fswatch_start(uv_loop_t *loop, const char *const *dirs, int ndirs,
                               unsigned debounce_ms, unsigned poll_ms, sp_fswatch_sig_fn sig,
                               sp_fswatch_fn changed, void *ud);
/* Takes the signature again without calling back (a change the caller has already handled). */
void sp_fswatch_rebase(sp_fswatch_t *w);
/* Stops; the watcher is freed once its handles have closed. No callback after this. */
void sp_fswatch_stop(sp_fswatch_t *w);

/* Mixes what identifies path's current content into h: inode, device, size, mtime and ctime,
 * links followed (a missing file mixes in a marker). */
uint64_t sp_stat_sig(uint64_t h, const char *path);
/* The directory holding path, or path itself when it is a directory, into out[size]. */
void sp_dir_of(const char *path, char *out, size_t size);

#endif
