/*
 * server_int.h: declarations shared by the files of the HTTP/1 server side (server.c,
 * request.c, conn_limit.c); not an interface for other layers.
 */
#ifndef SP_SERVER_INT_H
#define SP_SERVER_INT_H
#include "http/http.h"

/* conn_limit.c: counts one more connection from ip; returns false (and counts nothing) past
 * limit. sp_ip_release uncounts one. */
bool sp_ip_acquire(const char *ip, int limit);
void sp_ip_release(const char *ip);

#endif
