/*
 * log.h: JSON-lines event logging to stderr (one line per notable event) and the buffered
 * access-log writer to stdout. Thread-safe. Owns no request state.
 */
#ifndef SP_LOG_H
#define SP_LOG_H

#include "base/sp.h"
#include "base/buf.h"

typedef enum { SP_LOG_DEBUG = 0, SP_LOG_INFO, SP_LOG_WARN, SP_LOG_ERROR } sp_log_level_t;

extern int sp_log_min_level;

/* Returns the level for "debug"/"info"/"warn"/"error", or -1. */
int sp_log_level_parse(const char *s);
const char *sp_log_level_name(int level);

/*
 * Writes one event line {"time":..,"level":..,"msg":..,<fields>} to stderr.
 * The varargs are (const char *typed_key, value) pairs ended by NULL; typed_key is
 * "s:name" (const char *, NULL prints null), "S:name" (const char *, size_t len),
 * "i:name" (int64_t), "d:name" (double), "b:name" (int as bool), "j:name" (raw JSON text).
 */
void sp_log(int level, const char *msg, ...);

/* Writes a preformatted line (must end with '\n') to stderr or stdout atomically. */
void sp_log_raw(int fd, const char *line, size_t len);

#endif
