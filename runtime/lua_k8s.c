/*
 * lua_k8s.c: the sp.k8s module. Placeholder until the Kubernetes client lands: reports that
 * no client is available so scripts can fall back to the file source.
 */
#include "lua_vm.h"

int luaopen_sp_k8s(lua_State *L)
{
    lua_newtable(L);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "available");
    return 1;
}
