-- The kustomize base and overlays (k8s/base, k8s/overlays/*), rendered by `kubectl kustomize`
-- as `kubectl apply -k` would apply them, and checked for what each must contain: every overlay
-- a hardened pod (non-root, read-only root filesystem, no privilege escalation, capabilities
-- dropped), the probes, a memory limit, the scripts ConfigMap mounted as the override
-- directory, a config that loads, RBAC no wider than list/watch on sandboxes (patch only in the
-- wake overlay); plain: no authentication and no LoadBalancer; auth: the keys Secret and its
-- mount; wake: patch and wake enabled; ha: replicas, PodDisruptionBudget, HPA on CPU, topology
-- spread; prometheus: the metrics listener, Service, ServiceMonitor, PrometheusRule and
-- dashboard. Each overlay's arguments and config also pass the real binary's --check.
-- kubectl: Debian bookworm's kubernetes-client (kubectl 1.20, embedding kustomize 2.0.3, which
-- these kustomizations are written for) or any newer kubectl (checked with 1.32 / kustomize
-- 5.5); .ci/install-deps installs the Debian one unless a kubectl is on PATH, and the spec asks
-- for it with H.need_tool. The YAML is read with lyaml (Debian lua-yaml).
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local lyaml = require "lyaml"
local cjson = require "cjson"

local OVERLAYS = { "plain", "auth", "wake", "ha", "prometheus" }
local NS = "agent-sandbox-system"
local SA = "sandbox-router"

-- Renders a kustomization directory (relative to the source tree) into a list of documents.
local function render(dir)
    local err = H.tmpdir() .. "/kustomize.err"
    local cmd = ("kubectl kustomize '%s/%s' 2>'%s'"):format(H.SOURCE_DIR, dir, err)
    local p = assert(io.popen(cmd, "r"))
    local text = p:read("*a")
    local ok = p:close()
    assert(ok == true or ok == 0, "kubectl kustomize " .. dir .. " failed: "
        .. tostring(process.read_file(err)))
    local docs = {}
    for _, d in ipairs(lyaml.load(text, { all = true })) do
        if type(d) == "table" then
            docs[#docs + 1] = d
        end
    end
    assert(#docs > 0, "kubectl kustomize " .. dir .. " rendered nothing")
    return docs
end

local function all(docs, kind)
    local out = {}
    for _, d in ipairs(docs) do
        if d.kind == kind then
            out[#out + 1] = d
        end
    end
    return out
end

local function find(docs, kind, name)
    for _, d in ipairs(docs) do
        if d.kind == kind and (not name or d.metadata.name == name) then
            return d
        end
    end
    return nil
end

local function has(list, v)
    for _, x in ipairs(list or {}) do
        if x == v then
            return true
        end
    end
    return false
end

local function subset(small, big)
    for k, v in pairs(small or {}) do
        if (big or {})[k] ~= v then
            return false
        end
    end
    return next(small or {}) ~= nil
end

local function deployment(docs)
    local ds = all(docs, "Deployment")
    assert.are.equal(1, #ds)
    return ds[1], ds[1].spec.template.spec, ds[1].spec.template.spec.containers[1]
end

-- The value following flag in args ("--flag value"), or of the last "--set name=value".
local function arg(c, flag)
    local v
    for i, a in ipairs(c.args) do
        if flag:sub(1, 2) == "--" and a == flag then
            v = c.args[i + 1]
        elseif a == "--set" and c.args[i + 1]:match("^" .. flag:gsub("%-", "%%-") .. "=") then
            v = c.args[i + 1]:match("=(.*)$")
        end
    end
    return v
end

local function mounts_of(c)
    local m = {}
    for _, v in ipairs(c.volumeMounts or {}) do
        m[v.name] = v.mountPath
    end
    return m
end

local function volumes_of(pod)
    local v = {}
    for _, x in ipairs(pod.volumes or {}) do
        v[x.name] = x
    end
    return v
end

-- The config file's table, loaded from its ConfigMap (the one mounted at --config's directory).
local function config_of(docs)
    local _, pod, c = deployment(docs)
    local path = assert(arg(c, "--config"))
    local dir, file = path:match("^(.*)/([^/]+)$")
    for name, mp in pairs(mounts_of(c)) do
        if mp == dir then
            local cm = assert(find(docs, "ConfigMap", volumes_of(pod)[name].configMap.name),
                "the config ConfigMap is not in the output")
            local text = assert(cm.data[file], "no " .. file .. " in the config ConfigMap")
            return assert(loadstring(text))(), text
        end
    end
    error("nothing mounted at " .. dir)
end

-- The RBAC rules granted to the proxy's ServiceAccount, through bindings in the output.
local function granted(docs)
    local rules = {}
    for _, kind in ipairs({ "ClusterRoleBinding", "RoleBinding" }) do
        for _, b in ipairs(all(docs, kind)) do
            for _, s in ipairs(b.subjects) do
                if s.kind == "ServiceAccount" and s.name == SA and s.namespace == NS then
                    local role = find(docs, b.roleRef.kind, b.roleRef.name)
                    assert(role, kind .. " " .. b.metadata.name
                        .. ": its role is not in the output")
                    for _, r in ipairs(role.rules) do
                        rules[#rules + 1] = r
                    end
                end
            end
        end
    end
    return rules
end

-- The verbs on sandboxes.agents.x-k8s.io; fails on any grant beyond that resource, except, with
-- leases_ok (the wake overlay: idle-suspend coordination), exactly the activity Leases' verbs
-- through a namespaced Role (granted by a RoleBinding in the proxy's namespace, never cluster-wide).
local function sandbox_verbs(docs, leases_ok)
    local verbs = {}
    local lease_rules = 0
    for _, r in ipairs(granted(docs)) do
        if leases_ok and r.apiGroups[1] == "coordination.k8s.io" then
            assert.are.same({ "coordination.k8s.io" }, r.apiGroups)
            assert.are.same({ "leases" }, r.resources)
            assert.are.same({ "create", "get", "update", "list", "watch", "delete" }, r.verbs)
            lease_rules = lease_rules + 1
            goto continue
        end
        assert.are.same({ "agents.x-k8s.io" }, r.apiGroups)
        assert.are.same({ "sandboxes" }, r.resources)
        assert.is_nil(r.resourceNames)
        for _, v in ipairs(r.verbs) do
            assert.are_not.equal("*", v)
            verbs[v] = true
        end
        ::continue::
    end
    if leases_ok then
        assert.are.equal(1, lease_rules, "the activity Leases' Role")
        for _, rb in ipairs(all(docs, "ClusterRoleBinding")) do
            local role = find(docs, "ClusterRole", rb.roleRef.name)
            for _, r in ipairs(role and role.rules or {}) do
                assert.are_not.same({ "leases" }, r.resources, "leases granted cluster-wide")
            end
        end
    end
    local list = {}
    for v in pairs(verbs) do
        list[#list + 1] = v
    end
    table.sort(list)
    return list
end

-- Copies the config ConfigMap's file and a keys file into a directory and runs the binary's
-- --check with the container's arguments (paths made local). Returns ok, output.
local function binary_check(docs)
    local _, _, c = deployment(docs)
    local _, text = config_of(docs)
    local dir = H.tmpdir()
    assert(process.write_file(dir .. "/keys.json",
        '{"keys":[{"user":"ops","sha256":"' .. string.rep("ab", 32) .. '","admin":true}]}'))
    assert(process.write_file(dir .. "/config.lua",
        (text:gsub("/etc/sandbox%-proxy/auth/keys%.json", dir .. "/keys.json"))))
    local args = { H.BIN }
    local i = 1
    while i <= #c.args do
        local a, b = c.args[i], c.args[i + 1]
        if a == "--listen" then
            i = i + 1
        elseif a == "--scripts" then
            args[#args + 1] = a .. " '" .. dir .. "'"
            i = i + 1
        elseif a == "--config" then
            args[#args + 1] = a .. " '" .. dir .. "/config.lua'"
            i = i + 1
        elseif a == "--set" then
            args[#args + 1] = a .. " '" .. b .. "'"
            i = i + 1
        else
            args[#args + 1] = "'" .. a .. "'"
        end
        i = i + 1
    end
    local p = assert(io.popen(table.concat(args, " ") .. " --check 2>&1 < /dev/null", "r"))
    local out = p:read("*a")
    local ok = p:close()
    return ok == true or ok == 0, out
end

local ok_tool, why = H.need_tool("kubectl", "renders the kustomizations (kubectl kustomize)")

describe("kustomize overlays", function()
    if not ok_tool then
        it("need kubectl", function() pending(why) end)
        return
    end

    local base
    local out = {}

    setup(function()
        base = render("k8s/base")
        for _, name in ipairs(OVERLAYS) do
            out[name] = render("k8s/overlays/" .. name)
        end
    end)

    teardown(function()
        H.stop_all()
    end)

    for _, name in ipairs(OVERLAYS) do
        describe(name, function()
            it("runs a hardened pod with probes and a memory limit, in the admitted namespace "
                .. "and label", function()
                local docs = out[name]
                for _, d in ipairs(docs) do
                    if d.kind ~= "ClusterRole" and d.kind ~= "ClusterRoleBinding" then
                        assert.are.equal(NS, d.metadata.namespace, d.kind .. " " .. d.metadata.name)
                    end
                end
                local dep, pod, c = deployment(docs)
                assert.are.equal(NS, dep.metadata.namespace)
                local labels = dep.spec.template.metadata.labels
                assert.are.equal("sandbox-router", labels.app)
                assert.is_true(subset(dep.spec.selector.matchLabels, labels))
                assert.are.equal(SA, pod.serviceAccountName)
                assert.is_true(pod.securityContext.runAsNonRoot)
                assert.is_true(pod.securityContext.runAsUser > 0)
                assert.is_nil(pod.hostNetwork)
                assert.are.equal(1, #pod.containers)
                local sc = c.securityContext
                assert.is_true(sc.readOnlyRootFilesystem)
                assert.is_false(sc.allowPrivilegeEscalation)
                assert.is_not_true(sc.privileged)
                assert.is_true(has(sc.capabilities.drop, "ALL"))
                assert.is_nil(sc.capabilities.add)
                assert.are.equal("/ready", c.readinessProbe.httpGet.path)
                assert.are.equal("/live", c.livenessProbe.httpGet.path)
                assert.are.equal("http", c.readinessProbe.httpGet.port)
                assert.is_truthy(c.resources.limits.memory)
                assert.is_truthy(c.resources.requests.memory)
                assert.is_truthy(c.resources.requests.cpu)
            end)

            it("mounts the scripts ConfigMap as the override directory and a config that loads",
                function()
                local docs = out[name]
                local _, pod, c = deployment(docs)
                local scripts_dir = assert(arg(c, "--scripts"))
                local vol
                for vname, mp in pairs(mounts_of(c)) do
                    if mp == scripts_dir then
                        vol = volumes_of(pod)[vname]
                    end
                end
                assert(vol and vol.configMap, "no ConfigMap mounted at " .. scripts_dir)
                assert.is_table(find(docs, "ConfigMap", vol.configMap.name),
                    "the scripts ConfigMap " .. vol.configMap.name .. " is not in the output")
                assert.is_table(config_of(docs))
            end)

            it("grants list and watch on sandboxes, and patch only in the wake overlay", function()
                local verbs = sandbox_verbs(out[name], name == "wake")
                if name == "wake" then
                    assert.are.same({ "get", "list", "patch", "watch" }, verbs)
                else
                    assert.are.same({ "get", "list", "watch" }, verbs)
                end
            end)

            it("passes the binary's --check with its arguments and config", function()
                local ok, text = binary_check(out[name])
                assert(ok, name .. ": --check failed:\n" .. text)
            end)
        end)
    end

    it("plain: no authentication, no keys Secret, and a Service inside the cluster only", function()
        local docs = out.plain
        local _, pod, c = deployment(docs)
        assert.are.equal("false", arg(c, "auth_required"))
        local cfg = config_of(docs)
        assert.is_nil(cfg.auth)
        for _, v in ipairs(pod.volumes) do
            assert.is_nil(v.secret, "secret volume " .. v.name)
        end
        assert.is_nil(mounts_of(c).auth)
        assert.is_nil(find(docs, "Secret"))
        for _, s in ipairs(all(docs, "Service")) do
            assert.are.equal("ClusterIP", s.spec.type)
        end
        -- otherwise the base's config
        local base_cfg = config_of(base)
        base_cfg.auth = nil
        assert.are.same(base_cfg, cfg)
    end)

    it("auth: auth_required, the keys Secret in the output, mounted where the config reads it",
        function()
        local docs = out.auth
        local _, pod, c = deployment(docs)
        assert.are.equal("true", arg(c, "auth_required"))
        local cfg = config_of(docs)
        local dir, file = cfg.auth.keys_file:match("^(.*)/([^/]+)$")
        local vol
        for vname, mp in pairs(mounts_of(c)) do
            if mp == dir then
                vol = volumes_of(pod)[vname]
            end
        end
        assert(vol and vol.secret, "no Secret mounted at " .. dir)
        assert.is_not_true(vol.secret.optional)
        local sec = assert(find(docs, "Secret", vol.secret.secretName),
            "the Secret " .. vol.secret.secretName .. " is not in the output")
        local keys = sec.data and sec.data[file] or sec.stringData and sec.stringData[file]
        assert.is_truthy(keys, "no " .. file .. " in the Secret")
        -- every other overlay but plain mounts the same Secret (made by hand)
        for _, name in ipairs({ "wake", "ha", "prometheus" }) do
            local _, p2 = deployment(out[name])
            assert.are.equal(vol.secret.secretName, volumes_of(p2)[vol.name].secret.secretName)
        end
    end)

    it("wake: wake enabled in the config, which is otherwise the base's", function()
        local cfg = config_of(out.wake)
        assert.is_true(cfg.wake.enabled)
        cfg.wake = nil
        assert.are.same(config_of(base), cfg)
        for _, name in ipairs(OVERLAYS) do
            if name ~= "wake" then
                assert.is_not_true((config_of(out[name]).wake or {}).enabled, name)
            end
        end
    end)

    it("ha: replicas, a PodDisruptionBudget, an HPA on CPU and topology spread", function()
        local docs = out.ha
        local dep, pod = deployment(docs)
        local labels = dep.spec.template.metadata.labels
        local pdb = assert(find(docs, "PodDisruptionBudget"), "no PodDisruptionBudget")
        assert.is_true(subset(pdb.spec.selector.matchLabels, labels))
        assert.is_true(pdb.spec.maxUnavailable == 1 or (pdb.spec.minAvailable or 0) >= 1)
        local hpa = assert(find(docs, "HorizontalPodAutoscaler"), "no HorizontalPodAutoscaler")
        assert.are.equal("autoscaling/v2", hpa.apiVersion)
        assert.are.equal("Deployment", hpa.spec.scaleTargetRef.kind)
        assert.are.equal(dep.metadata.name, hpa.spec.scaleTargetRef.name)
        assert.is_true(hpa.spec.minReplicas >= 2)
        assert.is_true(hpa.spec.maxReplicas > hpa.spec.minReplicas)
        assert.are.equal(hpa.spec.minReplicas, dep.spec.replicas)
        local cpu
        for _, m in ipairs(hpa.spec.metrics) do
            if m.type == "Resource" and m.resource.name == "cpu" then
                cpu = m.resource.target
            end
        end
        assert(cpu and cpu.type == "Utilization" and cpu.averageUtilization > 0, "no CPU target")
        -- a PDB that allows no eviction at the HPA's minimum would block node drains
        assert.is_true(pdb.spec.maxUnavailable ~= nil
            or pdb.spec.minAvailable < hpa.spec.minReplicas)
        local keys = {}
        for _, t in ipairs(pod.topologySpreadConstraints or {}) do
            assert.is_true(subset(t.labelSelector.matchLabels, labels))
            keys[t.topologyKey] = t.whenUnsatisfiable
        end
        assert.is_truthy(keys["kubernetes.io/hostname"])
        assert.is_truthy(keys["topology.kubernetes.io/zone"])
        assert.are.equal(0, dep.spec.strategy.rollingUpdate.maxUnavailable)
        for _, name in ipairs(OVERLAYS) do
            if name ~= "ha" then
                assert.is_nil(find(out[name], "HorizontalPodAutoscaler"), name)
                assert.is_nil(find(out[name], "PodDisruptionBudget"), name)
            end
        end
    end)

    it("prometheus: the metrics listener, a ClusterIP Service, a ServiceMonitor, rules and the "
        .. "dashboard", function()
        local docs = out.prometheus
        local dep, _, c = deployment(docs)
        local listen = assert(arg(c, "metrics_listen"), "no metrics_listen")
        local mport = tonumber(listen:match(":(%d+)$"))
        local port_name
        for _, p in ipairs(c.ports) do
            if p.containerPort == mport then
                port_name = p.name
            end
        end
        assert(port_name, "metrics_listen's port is not a container port")
        local sm = assert(find(docs, "ServiceMonitor"), "no ServiceMonitor")
        assert.are.equal("monitoring.coreos.com/v1", sm.apiVersion)
        local svc
        for _, s in ipairs(all(docs, "Service")) do
            if subset(sm.spec.selector.matchLabels, s.metadata.labels) then
                assert.is_nil(svc, "the ServiceMonitor selects two Services")
                svc = s
            end
        end
        assert(svc, "the ServiceMonitor selects no Service")
        assert.are.equal("ClusterIP", svc.spec.type)
        assert.is_true(subset(svc.spec.selector, dep.spec.template.metadata.labels))
        local ep = sm.spec.endpoints[1]
        assert.are.equal("/metrics", ep.path)
        local sport
        for _, p in ipairs(svc.spec.ports) do
            if p.name == ep.port then
                sport = p
            end
        end
        assert(sport, "the Service has no port " .. tostring(ep.port))
        assert.is_true(sport.targetPort == port_name or sport.targetPort == mport)
        local rule = assert(find(docs, "PrometheusRule"), "no PrometheusRule")
        assert.is_true(#rule.spec.groups[1].rules >= 4)
        local dash
        for _, cm in ipairs(all(docs, "ConfigMap")) do
            if cm.data and cm.data["dashboard.json"] then
                dash = cm
            end
        end
        assert(dash, "no dashboard ConfigMap")
        assert.are.equal("1", dash.metadata.labels.grafana_dashboard)
        assert.are.equal("sandbox-proxy", cjson.decode(dash.data["dashboard.json"]).uid)
        for _, name in ipairs(OVERLAYS) do
            if name ~= "prometheus" then
                assert.is_nil(find(out[name], "ServiceMonitor"), name)
            end
        end
    end)
end)
