/*
 * json_scan.h: a validating JSON scanner that finds values without building a tree. The watch
 * engine uses it to read metadata (resourceVersion, name, namespace, continue, type) and to
 * split list pages into items; scripts get whole objects decoded by cjson. Inputs are spans
 * (not NUL-terminated). Nesting deeper than 512 levels is rejected.
 */
#ifndef SP_JSON_SCAN_H
#define SP_JSON_SCAN_H

#include "base/buf.h"

/* Returns the position just past the JSON value starting at p (after leading whitespace), or
 * NULL if it is not a valid value. */
const char *sp_json_skip(const char *p, const char *end);
/* p points at an object: returns the start of the value of `key` (first match), or NULL. */
const char *sp_json_get(const char *p, const char *end, const char *key);
/* Follows a path of keys ("metadata", "name", NULL) through nested objects. */
const char *sp_json_path(const char *p, const char *end, ...);
/* p points at a string: appends its unescaped bytes to out. Returns 0, or -1 if p is not a
 * valid string. */
int sp_json_string(const char *p, const char *end, sp_buf_t *out);
/* p points at an array: returns the first element's start (NULL when empty or invalid). */
const char *sp_json_array_first(const char *p, const char *end);
/* elem is an element's start: returns the next element's start, or NULL at the end. */
const char *sp_json_array_next(const char *elem, const char *end);
/* Reads an integer number at p into *out. Returns 0 or -1. */
int sp_json_int(const char *p, const char *end, long long *out);
const char *sp_json_ws(const char *p, const char *end);

#endif
