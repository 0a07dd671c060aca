-- How the proxy reaches the API server, against the stand-in over TLS: --kube-api with a CA
-- file, the in-cluster service account (KUBERNETES_SERVICE_HOST/PORT, token and CA from the
-- service account directory), a kubeconfig (token + CA data), a certificate the CA does not
-- vouch for (refused), and the loudly logged insecure mode.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local b64 -- base64 encoder for kubeconfig data fields
do
    local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    b64 = function(s)
        return ((s:gsub(".", function(x)
            local r, b = "", x:byte()
            for i = 8, 1, -1 do
                r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0")
            end
            return r
        end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
            if #x < 6 then
                return ""
            end
            local c = 0
            for i = 1, 6 do
                c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0)
            end
            return chars:sub(c + 1, c + 1)
        end) .. ({ "", "==", "=" })[#s % 3 + 1])
    end
end

-- A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI.
local function make_pki(dir)
    local cmds = {
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout "
            .. dir .. "/ca.key -out " .. dir .. "/ca.crt",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout " .. dir
            .. "/server.key -out " .. dir .. "/server.csr",
        "printf 'subjectAltName=IP:127.0.0.1\\n' > " .. dir .. "/ext.cnf",
        "openssl x509 -req -in " .. dir .. "/server.csr -CA " .. dir .. "/ca.crt -CAkey " .. dir
            .. "/ca.key -CAcreateserial -days 2 -extfile " .. dir .. "/ext.cnf -out " .. dir
            .. "/server.crt",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca -keyout "
            .. dir .. "/other.key -out " .. dir .. "/other.crt",
    }
    for _, c in ipairs(cmds) do
        assert(os.execute(c .. " >/dev/null 2>&1") == 0, "failed: " .. c)
    end
end

local function status_of(px, path)
    local r = px:get(path)
    return r and r.status
end

describe("connecting to the API server", function()
    local up, dir, api

    setup(function()
        up = H.upstream{ name = "tls" }
        dir = H.tmpdir()
        make_pki(dir)
        assert(process.write_file(dir .. "/token", "sa-token\n"))
        api = K.start{ tls_cert = dir .. "/server.crt", tls_key = dir .. "/server.key",
            token_file = dir .. "/token" }
        api:put(H.sandbox("tls", "sb", up.port))
    end)

    teardown(function()
        H.stop_all()
    end)

    it("uses --kube-api with a token file and a CA file over TLS", function()
        local px = api:proxy{ token_file = dir .. "/token", ca_file = dir .. "/ca.crt" }
        assert.are.equal(200, status_of(px, "/tls/sb/echo"))
        assert.are.equal("flags", px:json("/health").source.credentials)
    end)

    it("uses the in-cluster service account when KUBERNETES_SERVICE_HOST is set", function()
        local sa = dir .. "/sa"
        assert(os.execute("mkdir -p " .. sa) == 0)
        assert(process.write_file(sa .. "/token", "sa-token"))
        assert(process.write_file(sa .. "/ca.crt", process.read_file(dir .. "/ca.crt")))
        assert(process.write_file(sa .. "/namespace", "agent-sandbox-system"))
        local px = H.start{ ready_path = "/ready",
            env = { KUBERNETES_SERVICE_HOST = "127.0.0.1",
                KUBERNETES_SERVICE_PORT = tostring(api.port) },
            set = { kube_serviceaccount_dir = sa } }
        assert.are.equal(200, status_of(px, "/tls/sb/echo"))
        local src = px:json("/health").source
        assert.are.equal("in-cluster", src.credentials)
        assert.are.equal("https://127.0.0.1:" .. api.port, src.server)
    end)

    it("uses a kubeconfig's current context (token and CA data)", function()
        local kc = dir .. "/kubeconfig"
        assert(process.write_file(kc, table.concat({
            "apiVersion: v1",
            "kind: Config",
            "current-context: test",
            "clusters:",
            "- cluster:",
            "    certificate-authority-data: " .. b64(process.read_file(dir .. "/ca.crt")),
            "    server: https://127.0.0.1:" .. api.port,
            "  name: stand-in",
            "- cluster:",
            "    server: https://127.0.0.1:1",
            "  name: elsewhere",
            "contexts:",
            "- context:",
            "    cluster: stand-in",
            "    user: robot",
            "  name: test",
            "- context:",
            "    cluster: elsewhere",
            "    user: robot",
            "  name: other",
            "users:",
            "- name: robot",
            "  user:",
            "    token: sa-token",
            "",
        }, "\n")))
        local px = H.start{ ready_path = "/ready", env = { KUBECONFIG = kc } }
        assert.are.equal(200, status_of(px, "/tls/sb/echo"))
        assert.are.equal("kubeconfig", px:json("/health").source.credentials)
    end)

    it("refuses a server whose certificate the CA does not vouch for", function()
        local px = api:proxy{ token_file = dir .. "/token", ca_file = dir .. "/other.crt",
            wait = false }
        px:wait_log(function(l)
            return l.msg == "Kubernetes API error" or l.msg == "cannot discover the Sandbox API version"
        end, 20)
        H.net.wait_until(function() return status_of(px, "/health") == 200 end, 10)
        assert.are.equal(503, status_of(px, "/ready"))
        assert.are.equal(404, status_of(px, "/tls/sb/echo"))
    end)

    it("connects without verification only when told to, and says so loudly", function()
        local px = api:proxy{ token_file = dir .. "/token", insecure = true }
        assert.are.equal(200, status_of(px, "/tls/sb/echo"))
        px:wait_log(function(l)
            return l.level == "warn" and l.msg:find("INSECURE", 1, true)
        end, 5)
    end)

    it("reports an exec-plugin kubeconfig clearly in --check", function()
        local kc = dir .. "/exec-kubeconfig"
        assert(process.write_file(kc, table.concat({
            "apiVersion: v1",
            "kind: Config",
            "current-context: gke",
            "clusters:",
            "- cluster:",
            "    server: https://203.0.113.1",
            "  name: gke",
            "contexts:",
            "- context:",
            "    cluster: gke",
            "    user: gke",
            "  name: gke",
            "users:",
            "- name: gke",
            "  user:",
            "    exec:",
            "      apiVersion: client.authentication.k8s.io/v1beta1",
            "      command: gke-gcloud-auth-plugin",
            "",
        }, "\n")))
        local p = assert(process.spawn{ cmd = { H.BIN, "--check", "--kubeconfig", kc },
            stderr = dir .. "/check.err", stdout = dir .. "/check.out",
            env = { KUBERNETES_SERVICE_HOST = false } })
        assert.are.equal(1, p:wait(20))
        local err = p:read_stderr()
        assert.matches("kubectl proxy", err)
    end)
end)
