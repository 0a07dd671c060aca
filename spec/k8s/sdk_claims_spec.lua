-- End to end with the official agent-sandbox Python SDK (../shared/third_party/, v0.5.6, used
-- as is): the SDK creates a sandbox through a SandboxClaim on a warm pool of the API stand-in
-- (which binds it like the real claim controller), reaches it through sandbox-proxy in its
-- direct mode (X-Sandbox-* headers: the built-in header contract, scripts/sandbox_headers.lua),
-- executes a command in it, reaches it again by the claim's name on
-- the path route, deletes it, and its routes go.
-- Interpreters: the SDK needs pydantic 2, so its driver (spec/fixtures/sdk_claim_client.py)
-- runs on the python3 on PATH (pyenv's 3.11) with Debian's python3-kubernetes appended to its
-- path; the sandbox is the project's python runtime (examples/python-runtime-sandbox, FastAPI)
-- on Debian's /usr/bin/python3 (python3-fastapi, python3-uvicorn, python3-multipart).
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local THIRD = H.SOURCE_DIR .. "/../shared/third_party/agent-sandbox"
local SDK_DIR = THIRD .. "/clients/python/agentic-sandbox-client"
local RUNTIME_DIR = THIRD .. "/examples/python-runtime-sandbox"

-- What this spec needs beyond the suite's tools: fails in CI when missing, pending elsewhere.
local function prerequisites()
    local checks = {
        { "test -d " .. SDK_DIR .. " && test -d " .. RUNTIME_DIR,
            "the third-party SDK and runtime sources (../shared/third_party)" },
        { H.PYTHON .. " -c 'import pydantic, sys; sys.exit(0 if pydantic.VERSION >= \"2\" else 1)'",
            "pydantic 2 for the SDK (pyenv's python3)" },
        { "/usr/bin/python3 -c 'import kubernetes, fastapi, uvicorn, multipart'",
            "python3-kubernetes, python3-fastapi, python3-uvicorn, python3-multipart (.ci/packages)" },
    }
    for _, c in ipairs(checks) do
        if os.execute(c[1] .. " >/dev/null 2>&1") ~= 0 then
            local msg = "missing: " .. c[2]
            if os.getenv("CI") and os.getenv("CI") ~= "" and os.getenv("CI") ~= "false" then
                error(msg, 2)
            end
            io.stderr:write("\n*** SKIPPED: " .. msg .. ": this check did NOT run ***\n")
            return false, "SKIPPED: " .. msg
        end
    end
    return true
end

describe("the official Python SDK creating a sandbox through a SandboxClaim", function()
    teardown(function()
        H.stop_all()
    end)

    it("creates, reaches, executes in and deletes a sandbox through the proxy", function()
        local ok, why = prerequisites()
        if not ok then
            pending(why)
            return
        end
        local dir = H.tmpdir()
        -- the sandbox: the python runtime on a free loopback port
        local port = assert(H.net.free_port())
        assert(process.write_file(dir .. "/.keep", ""))
        local rt = assert(process.spawn{ cmd = { "/usr/bin/python3", "-m", "uvicorn", "main:app",
            "--host", "127.0.0.1", "--port", tostring(port), "--app-dir", RUNTIME_DIR },
            env = { SANDBOX_BASE_DIR = dir }, stdout = dir .. "/runtime.out",
            stderr = dir .. "/runtime.err" })
        assert(H.net.wait_port("127.0.0.1", port, 30, rt))

        -- the cluster: a warm pool of one ready member whose pod IP is loopback
        local api = K.start{}
        api:claim_config{ bind_delay_ms = 20, replenish = false }
        api:pool{ name = "python-pool", replicas = 1 }

        -- the proxy with its default scripts (the header contract is built in,
        -- scripts/sandbox_headers.lua), sandboxes on the runtime's port
        local px = api:proxy{ config = "return { discovery = { port = " .. port .. " } }" }

        -- the SDK's kubeconfig names the stand-in
        local kubeconfig = dir .. "/kubeconfig"
        assert(process.write_file(kubeconfig, table.concat({
            "apiVersion: v1", "kind: Config", "current-context: standin",
            "clusters:", "- name: standin", "  cluster:", "    server: " .. api.url,
            "users:", "- name: u", "  user:", "    token: sdk-user-token",
            "contexts:", "- name: standin", "  context:", "    cluster: standin",
            "    user: u", "    namespace: default", "" }, "\n")))
        local drv = assert(process.spawn{ cmd = { H.PYTHON, "-u",
            H.SOURCE_DIR .. "/spec/fixtures/sdk_claim_client.py", SDK_DIR,
            "http://127.0.0.1:" .. px.port, "python-pool", tostring(port) },
            env = { KUBECONFIG = kubeconfig, KUBERNETES_SERVICE_HOST = false },
            stdout = dir .. "/sdk.out", stderr = dir .. "/sdk.err" })
        local code = drv:wait(60)
        local out = process.read_file(dir .. "/sdk.out") or ""
        assert.are.equal(0, code, "SDK driver failed:\n" .. out .. "\n"
            .. tostring(process.read_file(dir .. "/sdk.err")))
        local steps = {}
        for line in out:gmatch("[^\n]+") do
            local s = cjson.decode(line)
            steps[s.step] = s
        end
        -- a warm-pool claim: the sandbox keeps its pool name, the claim has its own
        assert.matches("^sandbox%-claim%-%x+$", steps.created.claim)
        assert.matches("^python%-pool%-%w+$", steps.created.sandbox)
        assert.are.equal(0, steps.executed.exit_code)
        assert.are.equal("hello-from-the-sdk\n", steps.executed.stdout)
        assert.are.equal(200, steps["claim-route"].status)
        assert.are.equal("ok", steps["claim-route"].body.status)
        assert.are.equal(404, steps.deleted.status)
        -- the claim is gone from the cluster, and so is its sandbox
        local claims = api:call("GET", "/claims").items
        assert.are.equal(0, #claims)
        H.net.wait_until(function()
            for _, o in ipairs(api:call("GET", "/objects").items) do
                if o.metadata.name == steps.created.sandbox then
                    return false
                end
            end
            return true
        end, 10)
    end)
end)
