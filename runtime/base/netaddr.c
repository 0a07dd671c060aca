/*
 * netaddr.c: CIDR sets and address classes (see netaddr.h).
 */
#include "base/netaddr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <uv.h>

/* The 16-byte form of sa; false for other families. */
static bool addr16(const struct sockaddr *sa, uint8_t out[16])
{
    if (sa->sa_family == AF_INET) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(out, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return true;
    }
    return false;
}

static bool in_prefix(const uint8_t a[16], const uint8_t net[16], int bits)
{
    int full = bits / 8, rest = bits % 8;
    if (memcmp(a, net, (size_t)full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (a[full] & mask) == (net[full] & mask);
}

static int parse_one(const char *s, sp_cidr_t *c)
{
    char addr[64];
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    if (alen == 0 || alen >= sizeof addr)
        return -1;
    memcpy(addr, s, alen);
    addr[alen] = '\0';
    bool v4;
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, addr, &a4) == 1) {
        v4 = true;
        memset(c->bytes, 0, 10);
        c->bytes[10] = c->bytes[11] = 0xff;
        memcpy(c->bytes + 12, &a4, 4);
    } else if (inet_pton(AF_INET6, addr, &a6) == 1) {
        v4 = false;
        memcpy(c->bytes, &a6, 16);
    } else {
        return -1;
    }
    int max = v4 ? 32 : 128, bits = max;
    if (slash) {
        char *end;
        long b = strtol(slash + 1, &end, 10);
        if (end == slash + 1 || *end || b < 0 || b > max)
            return -1;
        bits = (int)b;
    }
    c->bits = v4 ? bits + 96 : bits;
    return 0;
}

int sp_cidrs_parse(const char *list, sp_cidr_t **out, char err[256])
{
    *out = NULL;
    int n = 0, cap = 0;
    sp_cidr_t *set = NULL;
    const char *p = list ? list : "";
    while (*p) {
        while (*p == ',' || *p == ' ' || *p == '\t')
            p++;
        const char *start = p;
        while (*p && *p != ',' && *p != ' ' && *p != '\t')
            p++;
        if (p == start)
            break;
        char item[80];
        size_t len = (size_t)(p - start);
        sp_cidr_t c;
        bool ok = len < sizeof item;
        if (ok) {
            memcpy(item, start, len);
            item[len] = '\0';
            ok = parse_one(item, &c) == 0;
        }
        if (!ok) {
            snprintf(err, 256, "not an IP address or CIDR: '%.*s'", (int)SP_MIN(len, 64), start);
            free(set);
            return -1;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 4;
            set = sp_realloc(set, (size_t)cap * sizeof *set);
        }
        set[n++] = c;
    }
    *out = set;
    return n;
}

bool sp_cidrs_contain(const sp_cidr_t *set, int n, const struct sockaddr *sa)
{
    uint8_t a[16];
    if (n <= 0 || !addr16(sa, a))
        return false;
    for (int i = 0; i < n; i++)
        if (in_prefix(a, set[i].bytes, set[i].bits))
            return true;
    return false;
}

const char *sp_addr_refusal(const struct sockaddr *sa, bool allow_loopback)
{
    uint8_t a[16];
    if (!addr16(sa, a))
        return "unsupported address family";
    static const uint8_t v4map[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t zero[16] = {0};
    if (memcmp(a, v4map, 12) == 0) {
        const uint8_t *v = a + 12;
        if (v[0] == 0) /* 0.0.0.0/8: "this network"; 0.0.0.0 dials the local host */
            return "unspecified address";
        if (v[0] == 127)
            return allow_loopback ? NULL : "loopback address";
        if (v[0] == 169 && v[1] == 254)
            return "link-local address";
        if (v[0] >= 224 && v[0] <= 239)
            return "multicast address";
        if (v[0] == 255 && v[1] == 255 && v[2] == 255 && v[3] == 255)
            return "broadcast address";
        return NULL;
    }
    if (memcmp(a, zero, 16) == 0)
        return "unspecified address";
    if (memcmp(a, zero, 15) == 0 && a[15] == 1)
        return allow_loopback ? NULL : "loopback address";
    if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80)
        return "link-local address";
    if (a[0] == 0xff)
        return "multicast address";
    return NULL;
}

bool sp_addr_literal(const char *host, int port, struct sockaddr_storage *out, char name[256])
{
    size_t hl = strlen(host);
    if (hl > 2 && host[0] == '[' && host[hl - 1] == ']')
        snprintf(name, 256, "%.*s", (int)(hl - 2), host + 1);
    else
        snprintf(name, 256, "%s", host);
    memset(out, 0, sizeof *out);
    return uv_ip4_addr(name, port, (struct sockaddr_in *)out) == 0 ||
           uv_ip6_addr(name, port, (struct sockaddr_in6 *)out) == 0;
}

void sp_addr_with_port(const struct sockaddr *sa, size_t len, int port,
                       struct sockaddr_storage *out)
{
    memset(out, 0, sizeof *out);
    memcpy(out, sa, len < sizeof *out ? len : sizeof *out);
    if (out->ss_family == AF_INET)
        ((struct sockaddr_in *)out)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)out)->sin6_port = htons((uint16_t)port);
}
