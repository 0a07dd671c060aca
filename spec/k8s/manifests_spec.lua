-- The base manifests in k8s/base/, read without kubectl (the overlays: kustomize_spec.lua):
-- structure (kinds, selectors that match labels, the namespace and label the agent-sandbox
-- NetworkPolicy admits, least-privilege RBAC, hardening), and the probes and
-- arguments checked against the real binary.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local kubeconn = require "sp.kubeconn"

-- Parses a multi-document YAML file into a list of documents.
local function load_docs(path)
    local text = assert(process.read_file(H.SOURCE_DIR .. "/" .. path))
    local docs = {}
    for chunk in (text .. "\n---\n"):gmatch("(.-)\n%-%-%-[^\n]*\n") do
        if chunk:match("%S") and chunk:gsub("#[^\n]*", ""):match("%S") then
            local doc, err = kubeconn.parse_yaml(chunk)
            assert(doc, path .. ": " .. tostring(err))
            docs[#docs + 1] = doc
        end
    end
    return docs
end

local function find(docs, kind, name)
    for _, d in ipairs(docs) do
        if d.kind == kind and (not name or d.metadata.name == name) then
            return d
        end
    end
    error("no " .. kind .. " " .. tostring(name))
end

local function has_value(list, v)
    for _, x in ipairs(list) do
        if x == v then
            return true
        end
    end
    return false
end

describe("k8s manifests", function()
    local rbac, dep, conf, secret

    setup(function()
        rbac = load_docs("k8s/base/rbac.yaml")
        dep = load_docs("k8s/base/deployment.yaml")
        conf = load_docs("k8s/base/config.yaml")
        secret = load_docs("k8s/auth-secret.example.yaml")
    end)

    teardown(function()
        H.stop_all()
    end)

    it("grant get, list and watch on sandboxes.agents.x-k8s.io and nothing else", function()
        local sa = find(rbac, "ServiceAccount")
        assert.are.equal("sandbox-router", sa.metadata.name)
        assert.are.equal("agent-sandbox-system", sa.metadata.namespace)
        local role = find(rbac, "ClusterRole")
        assert.are.equal(1, #role.rules)
        local rule = role.rules[1]
        assert.are.same({ "agents.x-k8s.io" }, rule.apiGroups)
        assert.are.same({ "sandboxes" }, rule.resources)
        table.sort(rule.verbs)
        assert.are.same({ "get", "list", "watch" }, rule.verbs)
        local binding = find(rbac, "ClusterRoleBinding")
        assert.are.equal(role.metadata.name, binding.roleRef.name)
        assert.are.equal("ClusterRole", binding.roleRef.kind)
        assert.are.equal(sa.metadata.name, binding.subjects[1].name)
        assert.are.equal(sa.metadata.namespace, binding.subjects[1].namespace)
    end)

    it("run two hardened replicas that the sandbox NetworkPolicy admits", function()
        local d = find(dep, "Deployment")
        assert.are.equal("agent-sandbox-system", d.metadata.namespace)
        assert.are.equal(2, d.spec.replicas)
        local labels = d.spec.template.metadata.labels
        assert.are.equal("sandbox-router", labels.app)
        for k, v in pairs(d.spec.selector.matchLabels) do
            assert.are.equal(v, labels[k], "selector label " .. k)
        end
        local pod = d.spec.template.spec
        assert.are.equal(find(rbac, "ServiceAccount").metadata.name, pod.serviceAccountName)
        assert.is_true(pod.securityContext.runAsNonRoot)
        assert.is_true(pod.securityContext.runAsUser > 0)
        local c = pod.containers[1]
        assert.is_true(c.securityContext.readOnlyRootFilesystem)
        assert.is_false(c.securityContext.allowPrivilegeEscalation)
        assert.is_true(has_value(c.securityContext.capabilities.drop, "ALL"))
        assert.is_truthy(c.resources.requests.memory)
        assert.is_truthy(c.resources.limits.memory)
    end)

    it("require authentication: auth_required, a config with keys, a Secret that must exist", function()
        local d = find(dep, "Deployment")
        local pod = d.spec.template.spec
        local c = pod.containers[1]
        local args = table.concat(c.args, " ")
        assert.matches("%-%-set auth_required=true", args)
        local config_path = args:match("%-%-config (%S+)")
        assert.is_truthy(config_path)
        local mounts = {}
        for _, m in ipairs(c.volumeMounts) do
            mounts[m.name] = m.mountPath
        end
        local vols = {}
        for _, v in ipairs(pod.volumes) do
            vols[v.name] = v
        end
        -- the config file comes from the ConfigMap in k8s/base/config.yaml
        local cm = find(conf, "ConfigMap")
        assert.are.equal(cm.metadata.name, vols.config.configMap.name)
        assert.is_not_true(vols.config.configMap.optional)
        assert.are.equal(mounts.config .. "/config.lua", config_path)
        local text = cm.data["config.lua"]
        local cfg = assert(loadstring(text))()
        -- its keys file lives in the Secret's mount, and the Secret is not optional
        local sec = find(secret, "Secret")
        assert.are.equal(sec.metadata.name, vols.auth.secret.secretName)
        assert.is_not_true(vols.auth.secret.optional)
        assert.are.equal(mounts.auth .. "/keys.json", cfg.auth.keys_file)
        assert.is_truthy(sec.stringData["keys.json"])
    end)

    it("give a grace period that covers the preStop pause and the drain", function()
        local d = find(dep, "Deployment")
        local pod = d.spec.template.spec
        local c = pod.containers[1]
        local drain
        for i, a in ipairs(c.args) do
            if a == "--set" and c.args[i + 1]:match("^drain_timeout=") then
                drain = tonumber(c.args[i + 1]:match("=(.+)$"))
            end
        end
        assert.is_truthy(drain)
        local pause = tonumber(c.lifecycle.preStop.exec.command[2])
        assert.is_true(pod.terminationGracePeriodSeconds >= drain + pause + 1)
    end)

    it("expose port 80 through a LoadBalancer to the container's http port", function()
        local d = find(dep, "Deployment")
        local svc = find(dep, "Service")
        assert.are.equal("LoadBalancer", svc.spec.type)
        assert.are.equal(80, svc.spec.ports[1].port)
        local c = d.spec.template.spec.containers[1]
        local port
        for _, p in ipairs(c.ports) do
            if p.name == svc.spec.ports[1].targetPort then
                port = p.containerPort
            end
        end
        assert.are.equal(8080, port)
        for k, v in pairs(svc.spec.selector) do
            assert.are.equal(v, d.spec.template.metadata.labels[k])
        end
    end)

    it("use probe paths and arguments the binary really serves and accepts", function()
        local d = find(dep, "Deployment")
        local c = d.spec.template.spec.containers[1]
        assert.are.equal("http", c.readinessProbe.httpGet.port)
        assert.are.equal("http", c.livenessProbe.httpGet.port)
        -- the container's arguments, with the listen address and the mounted paths made local
        local dir = H.tmpdir()
        local cm = find(conf, "ConfigMap")
        assert(process.write_file(dir .. "/keys.json",
            '{"keys":[{"user":"ops","sha256":"' .. string.rep("ab", 32) .. '","admin":true}]}'))
        assert(process.write_file(dir .. "/config.lua",
            (cm.data["config.lua"]:gsub("/etc/sandbox%-proxy/auth/keys%.json", dir .. "/keys.json"))))
        local args = {}
        local i = 1
        while i <= #c.args do
            local a = c.args[i]
            if a == "--listen" then
                i = i + 1 -- replaced by the harness
            elseif a == "--scripts" then
                args[#args + 1] = a
                args[#args + 1] = dir
                i = i + 1
            elseif a == "--config" then
                args[#args + 1] = a
                args[#args + 1] = dir .. "/config.lua"
                i = i + 1
            else
                args[#args + 1] = a
            end
            i = i + 1
        end
        local px = H.start{ args = args, sandboxes = {} }
        local ready = px:get(c.readinessProbe.httpGet.path)
        assert.are.equal(200, ready.status)
        local live = px:get(c.livenessProbe.httpGet.path)
        assert.are.equal(200, live.status)
        -- and readiness really depends on the source: 503 before a sync
        local px2 = H.start{ args = args, sandboxes_file = dir .. "/absent.json" }
        assert.are.equal(503, px2:get(c.readinessProbe.httpGet.path).status)
        assert.are.equal(200, px2:get(c.livenessProbe.httpGet.path).status)
    end)
end)
