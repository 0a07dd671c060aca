-- sandboxes.lua: GET /sandboxes lists the routes, sorted by path, one page at a time:
--   {"count":N,"sandboxes":[{"path":"alice/my-sandbox","namespace":..,"name":..,"user":..,
--     "service":..,"address":..,"port":..,"ready":true,"reason":..,"conflict":..,
--     "claim":..,"alias_of":..}, ...],
--    "metadata":{"continue":"<token>"}}
-- "user" is null for an unowned sandbox (no user label, see auth.lua); "claim" names the
-- SandboxClaim bound to the sandbox (null: none); a claim whose name differs from its sandbox's
-- also has its own entry, path "{user}/{claim}", with "alias_of" the path of the sandbox's
-- entry (discovery.lua).
-- count is the number of sandboxes on this page; metadata.continue is there when more follow:
-- GET /sandboxes?continue=<token> (with the same limit, or another) gives the next page.
-- Query: limit (1..max_limit; larger is capped; default default_limit), continue (a token from
-- the previous page; a malformed one is a 400).
--
-- Cost: a page reads the ordered route index (sp.routes range) from where the previous page
-- ended, O(log n + page), never the whole table; a caller limited to one user reads only that
-- user's key range ("user/"). Between chunks of `chunk` entries a request yields to the loop,
-- so a page never holds the worker for long, whatever the table size.
--
-- Pages while routes change: pages follow the key order from the last key of the previous
-- page. A route present for the whole walk is listed exactly once; a route added or removed
-- during the walk is listed at most once (once if it exists when its page is read).
--
-- Config (section `sandboxes`): default_limit (500), max_limit (1000), chunk (50),
-- max_scan (10000: entries examined per page at most when a filter drops entries; the page may
-- then hold fewer than limit sandboxes, with a continue token).
-- Replace this script to restrict or reshape the listing.
local routes = require "sp.routes"
local core = require "sp.core"
local config = require "sp.config"
local timer = require "sp.timer"
local cjson = require "cjson"

local concat = table.concat
local encode = cjson.encode
local min = math.min
local tonumber = tonumber
local floor = math.floor

local cfg = config.sandboxes or {}
local M = {}
M.DEFAULT_LIMIT = tonumber(cfg.default_limit) or 500
M.MAX_LIMIT = tonumber(cfg.max_limit) or 1000
M.CHUNK = tonumber(cfg.chunk) or 50
M.MAX_SCAN = tonumber(cfg.max_scan) or 10000

-- Work counters (tests, metrics): index entries examined and pages served.
M.stats = { examined = 0, pages = 0 }

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

-- The whole table at once (O(n): for scripts and tests; the endpoint serves pages).
-- keep(route) may filter.
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

-- Answers req with a whole listing (what M.listing returns; no pages).
function M.respond(req, listing)
    if listing.count == 0 then
        return req:respond(200, EMPTY, JSON)
    end
    req:respond(200, listing)
end

-- ------------------------------------------------------------------ continue tokens
-- Opaque to clients: "c1:" .. the last key of the page, in hex.

function M.token(key)
    return (("c1:" .. key):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- The key a token continues after, or nil when it is not a token.
function M.untoken(tok)
    if type(tok) ~= "string" or tok == "" or #tok % 2 ~= 0 or #tok > 2100
        or tok:find("[^%x]") then
        return nil
    end
    local raw = tok:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
    local key = raw:match("^c1:(.+)$")
    return key
end

-- ------------------------------------------------------------------ pages

-- One page: opts.prefix (only keys starting with it), opts.after (the key to continue after),
-- opts.limit, opts.keep (filter), opts.yield (yield between chunks). Returns
-- { count, items (JSON texts of the entries), last (key), more }.
function M.page(opts)
    local prefix, after, keep = opts.prefix, opts.after, opts.keep
    local limit = opts.limit or M.DEFAULT_LIMIT
    local items, n = {}, 0
    local scanned, more = 0, false
    local examined = 0
    while n < limit do
        local want = min(M.CHUNK, limit - n)
        local list, m, work = routes.range(prefix, after, want)
        examined = examined + work
        scanned = scanned + want
        for i = 1, #list do
            local r = list[i]
            after = r.key
            if not keep or keep(r) then
                n = n + 1
                items[n] = encode(entry(r))
            end
        end
        more = m
        if not more or scanned >= M.MAX_SCAN then
            break
        end
        if opts.yield then
            timer.sleep(0) -- a turn for the other requests before the next chunk
        end
    end
    M.stats.examined = M.stats.examined + examined
    M.stats.pages = M.stats.pages + 1
    return { count = n, items = items, last = after, more = more, examined = examined }
end

local JSON = { ["Content-Type"] = "application/json" }

-- The query's arguments (the first of repeated names; values percent-decoded).
local function query_args(req)
    local out = {}
    for pair in (req:query() or ""):gmatch("[^&]+") do
        local k, v = pair:match("^([^=]*)=?(.*)$")
        if out[k] == nil then
            out[k] = v:gsub("%+", " "):gsub("%%(%x%x)", function(h)
                return string.char(tonumber(h, 16))
            end)
        end
    end
    return out
end

local function bad(req, msg)
    return req:respond(400, { error = msg })
end

-- Answers GET /sandboxes; keep(route) (optional) filters what the caller may see; prefix
-- (optional, e.g. "alice/") restricts the walk to the keys the caller may see at most.
function M.handle(req, keep, prefix)
    local m = req:method()
    if m ~= "GET" and m ~= "HEAD" then
        return req:respond(405, { error = "method not allowed" }, { Allow = "GET, HEAD" })
    end
    local q = query_args(req)
    local limit = M.DEFAULT_LIMIT
    if q.limit ~= nil then
        limit = tonumber(q.limit)
        if type(q.limit) ~= "string" or not q.limit:match("^%d+$") or not limit or limit < 1
            or limit ~= floor(limit) then
            return bad(req, "limit must be a positive integer")
        end
    end
    limit = min(limit, M.MAX_LIMIT)
    local after
    if q.continue ~= nil then
        after = M.untoken(q.continue)
        if not after then
            return bad(req, "invalid continue token")
        end
    end
    local p = M.page{ prefix = prefix, after = after, limit = limit, keep = keep,
        yield = core.in_task() }
    local meta = p.more and ('{"continue":"' .. M.token(p.last) .. '"}') or "{}"
    local body = '{"count":' .. p.count .. ',"sandboxes":[' .. concat(p.items, ",")
        .. '],"metadata":' .. meta .. "}"
    req:respond(200, body, JSON)
end

M.endpoints = { ["/sandboxes"] = function(req) return M.handle(req) end }

return M
