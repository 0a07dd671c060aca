-- demo_sandbox.lua: a stand-in sandbox for the local demo, served by the proxy itself on the
-- "demo" listener (demo_listen, default 127.0.0.1:8888). It speaks the shape of the sandbox
-- runtime API so `curl localhost:8080/demo/hello/` shows a full round trip through the proxy:
--   GET  /          -> {"status":"ok","message":"Sandbox Runtime is active."}
--   POST /execute   -> {"stdout":..,"stderr":"","exit_code":0}: the command is NOT run; the
--                      demo only says how many bytes it received (413 over 64 KiB)
--   GET  /list/...  -> {"files":[]} ; anything else -> 404 {"message":"Not found"}
-- It never executes anything received from the network.
local M = {}

local ACTIVE = { status = "ok", message = "Sandbox Runtime is active." }
local NOT_FOUND = { message = "Not found" }

function M.handle(req)
    local method = req:method()
    local path = req:path()
    if path == "/" and (method == "GET" or method == "HEAD") then
        return req:respond(200, ACTIVE)
    end
    if path == "/execute" and method == "POST" then
        local body, err = req:read_body(65536)
        if not body then
            return req:respond(413, { message = err })
        end
        return req:respond(200, {
            stdout = "demo sandbox: commands are not executed; received " .. #body .. " bytes\n",
            stderr = "",
            exit_code = 0,
        })
    end
    if path:sub(1, 6) == "/list/" and method == "GET" then
        return req:respond(200, '{"files":[]}', { ["Content-Type"] = "application/json" })
    end
    return req:respond(404, NOT_FOUND)
end

return M
