/*
 * netaddr.h: IP address sets and classes for decisions the core makes without Lua: which
 * client peers are trusted proxies (exempt from max_connections_per_ip) and which addresses a
 * sandbox may never be dialled at (unspecified, loopback, link-local, multicast, broadcast).
 * Addresses are compared in 16-byte form, IPv4 as ::ffff:a.b.c.d, so an IPv4 peer seen on a
 * dual-stack listener matches an IPv4 CIDR. It owns no state.
 */
#ifndef SP_NETADDR_H
#define SP_NETADDR_H

#include "base/sp.h"

struct sockaddr;

typedef struct sp_cidr {
    uint8_t bytes[16];
    int bits; /* prefix length over the 16 bytes (an IPv4 /8 is 104) */
} sp_cidr_t;

/* Parses a comma- or space-separated list of CIDRs or single addresses ("10.0.0.0/8,
 * fd00::/8 192.0.2.1"). Returns the count (0 for an empty list) and a malloc'd array in *out
 * (caller frees; NULL when empty), or -1 with a message naming the bad entry in err[256]. */
int sp_cidrs_parse(const char *list, sp_cidr_t **out, char err[256]);
/* True if sa (AF_INET or AF_INET6) is inside one of the n CIDRs. */
bool sp_cidrs_contain(const sp_cidr_t *set, int n, const struct sockaddr *sa);
/* Why a sandbox must not be dialled at sa: "unspecified address", "loopback address",
 * "link-local address", "multicast address" or "broadcast address"; NULL when it may be.
 * Loopback is allowed when allow_loopback is true. */
const char *sp_addr_refusal(const struct sockaddr *sa, bool allow_loopback);

struct sockaddr_storage;
/* A sandbox's host as routed ("10.0.0.1", "[fd00::1]" or a name such as a serviceFQDN) and
 * port: true with *out filled for a literal IPv4/IPv6 address; false for a name, which is left
 * in name[256] without brackets, ready for a lookup. */
bool sp_addr_literal(const char *host, int port, struct sockaddr_storage *out, char name[256]);
/* *out = the looked-up address sa (len bytes) with its port set to port. */
void sp_addr_with_port(const struct sockaddr *sa, size_t len, int port,
                       struct sockaddr_storage *out);

#endif
