-- sandboxes.lua: GET /sandboxes lists the routes:
--   {"count":N,"sandboxes":[{"path":"alice/my-sandbox","namespace":..,"name":..,"user":..,
--     "service":..,"address":..,"port":..,"ready":true,"reason":..,"conflict":..,
--     "claim":..,"alias_of":..}, ...]}
-- sorted by path; "user" is null for an unowned sandbox (no user label, see auth.lua);
-- "claim" names the SandboxClaim bound to the sandbox (null: none); a claim whose name differs
-- from its sandbox's also has its own entry, path "{user}/{claim}", with "alias_of" the path of
-- the sandbox's entry (discovery.lua).
-- Replace this script to restrict or reshape the listing.
local routes = require "sp.routes"
local cjson = require "cjson"

local M = {}

local function entry(r)
    return {
        path = r.key,
        namespace = r.namespace,
        name = r.name,
        user = r.user or cjson.null, -- null: unowned (no user label)
        service = r.service or cjson.null,
        address = r.address or cjson.null,
        port = r.port,
        ready = r.ready,
        reason = r.reason,
        mode = r.mode,
        conflict = r.conflict,
        claim = r.claim or cjson.null, -- the SandboxClaim bound to it (null: none)
        alias_of = r.alias_of, -- on a claim's alias: the path of the sandbox's own route
    }
end
M.entry = entry

-- Builds the listing from routes.list() (already sorted by key); keep(route) may filter.
function M.listing(keep)
    local list = routes.list()
    local out = {}
    for i = 1, #list do
        local r = list[i]
        if not keep or keep(r) then
            out[#out + 1] = entry(r)
        end
    end
    return { count = #out, sandboxes = out }
end

local JSON = { ["Content-Type"] = "application/json" }
local EMPTY = '{"count":0,"sandboxes":[]}' -- cjson 2.1.0 encodes an empty table as {}

-- Answers req with a listing (what M.listing returns).
function M.respond(req, listing)
    if listing.count == 0 then
        return req:respond(200, EMPTY, JSON)
    end
    req:respond(200, listing)
end

-- Answers GET /sandboxes; keep(route) (optional) filters what the caller may see.
function M.handle(req, keep)
    local m = req:method()
    if m ~= "GET" and m ~= "HEAD" then
        return req:respond(405, { error = "method not allowed" }, { Allow = "GET, HEAD" })
    end
    M.respond(req, M.listing(keep))
end

M.endpoints = { ["/sandboxes"] = function(req) return M.handle(req) end }

return M
