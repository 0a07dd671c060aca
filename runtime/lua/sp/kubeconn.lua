-- sp.kubeconn: works out how to reach the Kubernetes API server.
--
--   M.resolve(settings, env)         precedence: --kube-api flags, in-cluster, kubeconfig
--   M.in_cluster(env, sa_dir)        service-account environment of a pod
--   M.from_kubeconfig{path|paths|text, context, dir}
--   M.parse_yaml(text)               YAML (libyaml through sp.yaml) or JSON
--   M.base64_decode(s)
--
-- Every function returns a value, or nil and an error string; none raises on bad input.
-- A connection table is
--   { server, ca_file, ca_data, insecure, token, token_file, cert_file, cert_data,
--     key_file, key_data, namespace, source = "flags"|"in-cluster"|"kubeconfig", context }
-- with absent fields nil. Lua over sp.yaml, sp.crypto and cjson; files are read with io.open.
local cjson = require "cjson.safe"
local crypto = require "sp.crypto"
local yaml = require "sp.yaml"

local type, ipairs, tonumber, next = type, ipairs, tonumber, next
local sub, find, match, gsub, format, lower =
    string.sub, string.find, string.match, string.gsub, string.format, string.lower
local concat = table.concat

local M = {}

-- YAML null is cjson.null (sp.yaml decodes it so), so YAML and JSON input decode identically
-- (a null in a sequence keeps its position; a null value keeps its key).
local NULL = cjson.null
M.null = NULL

M.DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
M.NO_CONFIG_ERROR =
    "no Kubernetes API configured (tried --kube-api, in-cluster service account, kubeconfig)"

---------------------------------------------------------------------------------------------
-- base64 (RFC 4648 standard alphabet, '=' padding required, whitespace ignored); the
-- decoding itself is sp.crypto's
---------------------------------------------------------------------------------------------

function M.base64_decode(s)
    if type(s) ~= "string" then
        return nil, "base64: expected a string, got " .. type(s)
    end
    local clean = gsub(s, "[ \t\r\n\f\v]", "")
    local bad = find(clean, "[^A-Za-z0-9+/=]")
    if bad then
        return nil, format("base64: invalid character %q at offset %d", sub(clean, bad, bad), bad)
    end
    local body, padding = match(clean, "^([A-Za-z0-9+/]*)(=*)$")
    if not body then
        return nil, "base64: '=' padding in the middle of the data"
    end
    if #clean % 4 ~= 0 or #padding > 2 then
        return nil, "base64: truncated or wrongly padded data (length must be a multiple of 4)"
    end
    local out = crypto.b64_decode(clean)
    if not out then
        return nil, "base64: truncated or wrongly padded data"
    end
    return out
end

---------------------------------------------------------------------------------------------
-- YAML (libyaml, through sp.yaml)
---------------------------------------------------------------------------------------------

-- Parse YAML (or JSON) text. Returns the value (YAML null is M.null) or nil, "line N: ...".
function M.parse_yaml(text)
    if type(text) ~= "string" then
        return nil, "line 1: expected a string, got " .. type(text)
    end
    local v, err = yaml.decode(text)
    if v == nil then
        return nil, (gsub(err, "^EINVAL: ", ""))
    end
    return v
end

---------------------------------------------------------------------------------------------
-- helpers shared by the connection sources
---------------------------------------------------------------------------------------------

local function str(v)
    if type(v) == "string" and v ~= "" then
        return v
    end
    return nil
end

local function trim(s)
    return (gsub(gsub(s, "^%s+", ""), "%s+$", ""))
end

local function env_getter(env)
    if env == nil then
        return os.getenv
    elseif type(env) == "table" then
        return function(name)
            return env[name]
        end
    end
    return env
end

local function read_file(path)
    local f, err, code = io.open(path, "rb")
    if not f then
        return nil, err or (path .. ": cannot open"), code
    end
    local data, rerr, rcode = f:read("*a")
    f:close()
    if not data then
        return nil, path .. ": " .. tostring(rerr or "read failed"), rcode
    end
    return data
end

local function truthy(v)
    return v == true or v == "true" or v == "1" or v == 1
end

-- Checks an API server URL: http or https scheme, a host; strips one trailing '/'.
function M.normalize_server(url)
    if type(url) ~= "string" or url == "" then
        return nil, "API server URL is empty"
    end
    local scheme, rest = match(url, "^([%a][%w+.-]*)://(.*)$")
    scheme = scheme and lower(scheme)
    if scheme ~= "http" and scheme ~= "https" then
        return nil, format("API server URL %q must start with http:// or https://", url)
    end
    if find(url, "%s") then
        return nil, format("API server URL %q contains whitespace", url)
    end
    if match(rest, "^([^/?#]*)") == "" then
        return nil, format("API server URL %q has no host", url)
    end
    local out = scheme .. "://" .. rest
    if sub(out, -1) == "/" then
        out = sub(out, 1, -2)
    end
    return out
end

---------------------------------------------------------------------------------------------
-- kubeconfig
---------------------------------------------------------------------------------------------

local function dir_of(path)
    local d = match(path, "^(.*)/[^/]*$")
    if d == nil then
        return nil -- no directory part: relative paths stay relative to the working dir
    end
    if d == "" then
        return "/"
    end
    return d
end

local function resolve_path(dir, p)
    if not p or not dir or sub(p, 1, 1) == "/" then
        return p
    end
    if sub(dir, -1) == "/" then
        return dir .. p
    end
    return dir .. "/" .. p
end

-- Collect the named entries of one file's clusters/contexts/users list into `into`
-- (first file wins across files; within one file the last duplicate wins, as kubectl's
-- list-to-map conversion does).
local function collect(doc, field, inner, label, dir, into)
    local list = doc[field]
    if list == nil or list == NULL then
        return true
    end
    if type(list) ~= "table" or (next(list) ~= nil and list[1] == nil) then
        return nil, format("kubeconfig %s: %q must be a list", label, field)
    end
    local mine = {}
    for idx, item in ipairs(list) do
        if type(item) ~= "table" then
            return nil, format("kubeconfig %s: %s[%d] is not a mapping", label, field, idx)
        end
        local name = item.name
        if type(name) ~= "string" or name == "" then
            return nil, format("kubeconfig %s: %s[%d] has no name", label, field, idx)
        end
        local body = item[inner]
        if body == nil or body == NULL then
            body = {}
        end
        if type(body) ~= "table" then
            return nil, format("kubeconfig %s: %s %q: %q is not a mapping", label, field, name,
                inner)
        end
        mine[name] = { body = body, dir = dir, label = label }
    end
    for name, entry in pairs(mine) do
        if into[name] == nil then
            into[name] = entry
        end
    end
    return true
end

local function split_paths(value)
    local out, seen = {}, {}
    for p in string.gmatch(value, "[^:]+") do
        if not seen[p] then
            seen[p] = true
            out[#out + 1] = p
        end
    end
    return out
end
M.split_paths = split_paths

-- `kubectl config view` without --raw writes these in place of secrets
local REDACTED = { ["DATA+OMITTED"] = true, REDACTED = true }

local function redacted_error(label, what, key)
    return format("kubeconfig %s: %s: %s is redacted (the file was written by `kubectl config "
        .. "view` without --raw)", label, what, key)
end

local function decode_field(body, key, what, label)
    local v = body[key]
    if v == nil or v == NULL or v == "" then
        return nil
    end
    if REDACTED[v] then
        return nil, redacted_error(label, what, key)
    end
    if type(v) ~= "string" then
        return nil, format("kubeconfig %s: %s: %s must be a base64 string", label, what, key)
    end
    local d, err = M.base64_decode(v)
    if not d then
        return nil, format("kubeconfig %s: %s: %s: %s", label, what, key, err)
    end
    return d
end

-- opts: { path = file } | { paths = { file, ... } } | { text = yaml, dir = base dir },
-- plus optional context = name.
function M.from_kubeconfig(opts)
    if type(opts) == "string" then
        opts = { path = opts }
    end
    if type(opts) ~= "table" then
        return nil, "from_kubeconfig: expected a table"
    end
    local sources = {} -- { text, label, dir }
    if opts.text ~= nil then
        if type(opts.text) ~= "string" then
            return nil, "from_kubeconfig: text must be a string"
        end
        sources[1] = { text = opts.text, label = "<text>", dir = opts.dir }
    elseif opts.path ~= nil then
        local path = opts.path
        if type(path) ~= "string" or path == "" then
            return nil, "kubeconfig path is empty"
        end
        local data, err = read_file(path)
        if not data then
            return nil, "cannot read kubeconfig " .. err
        end
        sources[1] = { text = data, label = path, dir = dir_of(path) }
    elseif opts.paths ~= nil then
        -- a KUBECONFIG list: missing files are skipped (as kubectl does), other errors are not
        local missing = {}
        for _, path in ipairs(opts.paths) do
            local data, err, code = read_file(path)
            if data then
                sources[#sources + 1] = { text = data, label = path, dir = dir_of(path) }
            elseif code == 2 then
                missing[#missing + 1] = path
            else
                return nil, "cannot read kubeconfig " .. err
            end
        end
        if #sources == 0 then
            if #missing == 0 then
                return nil, "KUBECONFIG names no files"
            end
            return nil, "kubeconfig not found: " .. concat(missing, ", ")
        end
    else
        return nil, "from_kubeconfig: give path, paths or text"
    end

    local clusters, contexts, users = {}, {}, {}
    local current, current_label
    local labels = {}
    for _, src in ipairs(sources) do
        labels[#labels + 1] = src.label
        local doc, err = M.parse_yaml(src.text)
        if doc == nil then
            return nil, format("kubeconfig %s: %s", src.label, err)
        end
        if doc == NULL then
            doc = {} -- an empty file adds nothing
        end
        if type(doc) ~= "table" or doc[1] ~= nil then
            return nil, format("kubeconfig %s: not a kubeconfig (expected a mapping)", src.label)
        end
        local ok, cerr = collect(doc, "clusters", "cluster", src.label, src.dir, clusters)
        if ok then
            ok, cerr = collect(doc, "contexts", "context", src.label, src.dir, contexts)
        end
        if ok then
            ok, cerr = collect(doc, "users", "user", src.label, src.dir, users)
        end
        if not ok then
            return nil, cerr
        end
        local cc = doc["current-context"]
        if current == nil and str(cc) then
            current, current_label = cc, src.label
        end
    end
    local label = concat(labels, ":")

    local ctxname = str(opts.context) or current
    if not ctxname then
        return nil, format("kubeconfig %s: no current-context is set", label)
    end
    local ctx = contexts[ctxname]
    if not ctx then
        return nil, format("kubeconfig %s: context %q not found", label, ctxname)
    end
    local clname = str(ctx.body.cluster)
    if not clname then
        return nil, format("kubeconfig %s: context %q names no cluster", label, ctxname)
    end
    local cl = clusters[clname]
    if not cl then
        return nil, format("kubeconfig %s: cluster %q (context %q) not found", label, clname,
            ctxname)
    end
    local uname = str(ctx.body.user)
    local user
    if uname then
        user = users[uname]
        if not user then
            return nil, format("kubeconfig %s: user %q (context %q) not found", label, uname,
                ctxname)
        end
    end

    local c = cl.body
    local what = format("cluster %q", clname)
    local server, serr = M.normalize_server(c.server)
    if not server then
        if c.server == nil or c.server == NULL or c.server == "" then
            serr = "no server URL"
        end
        return nil, format("kubeconfig %s: %s: %s", cl.label, what, serr)
    end
    local conn = {
        server = server,
        insecure = truthy(c["insecure-skip-tls-verify"]),
        namespace = str(ctx.body.namespace),
        source = "kubeconfig",
        context = ctxname,
    }
    local err
    -- *-data wins over the file form, as in client-go
    conn.ca_data, err = decode_field(c, "certificate-authority-data", what, cl.label)
    if err then
        return nil, err
    end
    if not conn.ca_data then
        conn.ca_file = resolve_path(cl.dir, str(c["certificate-authority"]))
    end
    if conn.insecure and (conn.ca_data or conn.ca_file) then
        return nil, format("kubeconfig %s: %s: specifying a root certificates file with the "
            .. "insecure flag is not allowed (as kubectl reports)", cl.label, what)
    end

    if user then
        local u = user.body
        local uwhat = format("user %q", uname)
        local token_file = resolve_path(user.dir, str(u.tokenFile))
        if token_file then
            conn.token_file = token_file -- tokenFile wins over token, as in client-go
        else
            conn.token = str(u.token)
            if REDACTED[conn.token] then
                return nil, redacted_error(user.label, uwhat, "token")
            end
        end
        conn.cert_data, err = decode_field(u, "client-certificate-data", uwhat, user.label)
        if err then
            return nil, err
        end
        if not conn.cert_data then
            conn.cert_file = resolve_path(user.dir, str(u["client-certificate"]))
        end
        conn.key_data, err = decode_field(u, "client-key-data", uwhat, user.label)
        if err then
            return nil, err
        end
        if not conn.key_data then
            conn.key_file = resolve_path(user.dir, str(u["client-key"]))
        end
        local has_cert = conn.cert_data or conn.cert_file
        local has_key = conn.key_data or conn.key_file
        if has_cert and not has_key then
            return nil, format("kubeconfig %s: %s has a client certificate but no client key",
                user.label, uwhat)
        elseif has_key and not has_cert then
            return nil, format("kubeconfig %s: %s has a client key but no client certificate",
                user.label, uwhat)
        end
        local exec, ap = u.exec, u["auth-provider"]
        local has_plugin = (type(exec) == "table") or (type(ap) == "table")
        if has_plugin and not (conn.token or conn.token_file or has_cert) then
            local detail
            if type(exec) == "table" then
                detail = format("an exec plugin (%s)", str(exec.command) or "?")
            else
                detail = format("an auth-provider (%s)", str(ap.name) or "?")
            end
            return nil, format("kubeconfig %s: %s (context %q) gets its credentials from %s; "
                .. "exec-plugin credentials are not supported. Run `kubectl proxy` and start "
                .. "sandbox-proxy with --kube-api http://127.0.0.1:8001", user.label, uwhat,
                ctxname, detail)
        end
    end
    return conn
end

---------------------------------------------------------------------------------------------
-- in-cluster
---------------------------------------------------------------------------------------------

-- The pod's service-account connection, or nil when not in a pod. Like client-go, it also
-- requires the token file to be readable (a pod without an automounted token falls through
-- to the other sources); nil, reason then.
function M.in_cluster(env, sa_dir)
    local getenv = env_getter(env)
    local host = str(getenv("KUBERNETES_SERVICE_HOST"))
    local port = str(getenv("KUBERNETES_SERVICE_PORT"))
    if not host or not port then
        return nil
    end
    host, port = trim(host), trim(port)
    local pnum = find(port, "^%d+$") and tonumber(port)
    if not pnum or pnum < 1 or pnum > 65535 then
        return nil, format("KUBERNETES_SERVICE_PORT %q is not a port number", port)
    end
    if find(host, ":", 1, true) and sub(host, 1, 1) ~= "[" then
        host = "[" .. host .. "]"
    end
    sa_dir = str(sa_dir) or M.DEFAULT_SA_DIR
    if #sa_dir > 1 and sub(sa_dir, -1) == "/" then
        sa_dir = sub(sa_dir, 1, -2)
    end
    local token_file = sa_dir .. "/token"
    local tf = io.open(token_file, "rb")
    if not tf then
        return nil, format("KUBERNETES_SERVICE_HOST is set but the service account token %s "
            .. "is not readable", token_file)
    end
    tf:close()
    local namespace
    local ns = read_file(sa_dir .. "/namespace")
    if ns then
        namespace = str(trim(ns))
    end
    return {
        server = "https://" .. host .. ":" .. port,
        ca_file = sa_dir .. "/ca.crt",
        token_file = token_file,
        namespace = namespace,
        source = "in-cluster",
    }
end

---------------------------------------------------------------------------------------------
-- precedence
---------------------------------------------------------------------------------------------

-- settings: { kube_api, kube_token_file, kube_ca_file, kube_insecure_skip_verify, kubeconfig,
-- kube_serviceaccount_dir, kube_context }; env: function(name) (default os.getenv) or table.
function M.resolve(settings, env)
    settings = settings or {}
    local getenv = env_getter(env)

    local api = str(settings.kube_api)
    if api then
        local server, err = M.normalize_server(api)
        if not server then
            return nil, "--kube-api: " .. err
        end
        return {
            server = server,
            token_file = str(settings.kube_token_file),
            ca_file = str(settings.kube_ca_file),
            insecure = truthy(settings.kube_insecure_skip_verify),
            source = "flags",
        }
    end

    local ic, ic_err = M.in_cluster(getenv, settings.kube_serviceaccount_dir)
    if ic then
        return ic
    end

    local kc = str(settings.kubeconfig)
    if kc then
        return M.from_kubeconfig { path = kc, context = settings.kube_context }
    end
    local kenv = str(getenv("KUBECONFIG"))
    if kenv then
        local paths = split_paths(kenv)
        if #paths == 0 then
            return nil, format("KUBECONFIG %q names no files", kenv)
        end
        return M.from_kubeconfig { paths = paths, context = settings.kube_context }
    end

    if ic_err then
        return nil, M.NO_CONFIG_ERROR .. "; in-cluster: " .. ic_err
    end
    return nil, M.NO_CONFIG_ERROR
end

return M
