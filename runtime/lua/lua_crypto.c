/*
 * lua_crypto.c: the sp.crypto module over OpenSSL's libcrypto, for authentication scripts:
 * SHA-256, HMAC-SHA256, RSA-SHA256 (RS256) signature verification, constant-time comparison,
 * base64 / base64url decoding and random bytes. Keys and tokens pass through here and are
 * never logged.
 */
#include "lua/lua_vm.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <stdlib.h>

/* crypto.sha256(data) -> 32 raw bytes */
static int c_sha256(lua_State *L)
{
    size_t n;
    const char *d = luaL_checklstring(L, 1, &n);
    unsigned char out[32];
    unsigned int len = 0;
    if (!EVP_Digest(d, n, out, &len, EVP_sha256(), NULL))
        return luaL_error(L, "sha256 failed");
    lua_pushlstring(L, (const char *)out, len);
    return 1;
}

/* crypto.hmac_sha256(key, data) -> 32 raw bytes */
static int c_hmac_sha256(lua_State *L)
{
    size_t kl, dl;
    const char *k = luaL_checklstring(L, 1, &kl);
    const char *d = luaL_checklstring(L, 2, &dl);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), k, (int)kl, (const unsigned char *)d, dl, out, &len))
        return luaL_error(L, "hmac failed");
    lua_pushlstring(L, (const char *)out, len);
    return 1;
}

/* crypto.equal(a, b) -> bool, in time that depends only on the lengths */
static int c_equal(lua_State *L)
{
    size_t al, bl;
    const char *a = luaL_checklstring(L, 1, &al);
    const char *b = luaL_checklstring(L, 2, &bl);
    if (al != bl) {
        /* still touch the bytes so the time does not depend on where they differ */
        volatile unsigned char sink = 0;
        for (size_t i = 0; i < al; i++)
            sink |= (unsigned char)a[i];
        (void)sink;
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushboolean(L, CRYPTO_memcmp(a, b, al) == 0);
    return 1;
}

/* crypto.hex(bytes) -> lowercase hex */
static int c_hex(lua_State *L)
{
    static const char hx[] = "0123456789abcdef";
    size_t n;
    const unsigned char *d = (const unsigned char *)luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n; i++) {
        luaL_addchar(&b, hx[d[i] >> 4]);
        luaL_addchar(&b, hx[d[i] & 15]);
    }
    luaL_pushresult(&b);
    return 1;
}

static int b64val(int c, bool url)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == (url ? '-' : '+'))
        return 62;
    if (c == (url ? '_' : '/'))
        return 63;
    return -1;
}

/* Decodes base64 (url: the URL alphabet, padding optional). Returns false on bad input. */
static bool b64_decode(const char *s, size_t n, bool url, luaL_Buffer *b)
{
    while (n && s[n - 1] == '=')
        n--;
    if (n % 4 == 1)
        return false;
    unsigned acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64val((unsigned char)s[i], url);
        if (v < 0)
            return false;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            luaL_addchar(b, (char)((acc >> bits) & 0xff));
        }
    }
    return true;
}

static int decode(lua_State *L, bool url)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    if (!b64_decode(s, n, url, &b)) {
        luaL_pushresult(&b);
        lua_pop(L, 1);
        lua_pushnil(L);
        lua_pushstring(L, "EINVAL: not valid base64");
        return 2;
    }
    luaL_pushresult(&b);
    return 1;
}

static int c_b64_decode(lua_State *L) { return decode(L, false); }
static int c_b64url_decode(lua_State *L) { return decode(L, true); }

/* crypto.rsa_sha256_verify(public_key_pem, data, signature) -> true | false, err */
static int c_rsa_verify(lua_State *L)
{
    size_t kl, dl, sl;
    const char *pem = luaL_checklstring(L, 1, &kl);
    const char *d = luaL_checklstring(L, 2, &dl);
    const char *sig = luaL_checklstring(L, 3, &sl);
    BIO *bio = BIO_new_mem_buf(pem, (int)kl);
    EVP_PKEY *key = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (!key) {
        ERR_clear_error();
        lua_pushboolean(L, 0);
        lua_pushstring(L, "EINVAL: not a PEM public key");
        return 2;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_PKEY_base_id(key) == EVP_PKEY_RSA &&
             EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, key) == 1 &&
             EVP_DigestVerify(ctx, (const unsigned char *)sig, sl, (const unsigned char *)d, dl) == 1;
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
    ERR_clear_error();
    lua_pushboolean(L, ok);
    if (!ok) {
        lua_pushstring(L, "EACCES: signature does not verify");
        return 2;
    }
    return 1;
}

/* crypto.random(n) -> n random bytes */
static int c_random(lua_State *L)
{
    int n = (int)luaL_checkinteger(L, 1);
    if (n < 0 || n > 4096)
        return luaL_argerror(L, 1, "0..4096 bytes");
    unsigned char buf[4096];
    if (RAND_bytes(buf, n) != 1)
        return luaL_error(L, "no randomness");
    lua_pushlstring(L, (const char *)buf, (size_t)n);
    return 1;
}

int luaopen_sp_crypto(lua_State *L)
{
    static const luaL_Reg fns[] = {{"sha256", c_sha256},
                                   {"hmac_sha256", c_hmac_sha256},
                                   {"equal", c_equal},
                                   {"hex", c_hex},
                                   {"b64_decode", c_b64_decode},
                                   {"b64url_decode", c_b64url_decode},
                                   {"rsa_sha256_verify", c_rsa_verify},
                                   {"random", c_random},
                                   {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
