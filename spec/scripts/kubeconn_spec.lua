-- sp.kubeconn: how the proxy finds the Kubernetes API server. The YAML reader (sp.yaml over
-- libyaml) must read what kubectl/kind/minikube/k3s/cloud tooling write, the kubeconfig mapping must follow
-- kubectl's rules, and the precedence (flags > in-cluster > kubeconfig) must hold.
local kc = require "sp.kubeconn"
local b64 = require "spec.helpers.b64"
local cjson = require "cjson.safe"

local NULL = kc.null

-- fake PEM blobs and their base64 forms (as kubeconfig *-data fields hold them)
local CERT = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
local CERT_B64 = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCmFiYwotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg=="
local KEY = "-----BEGIN RSA PRIVATE KEY-----\nxyz\n-----END RSA PRIVATE KEY-----\n"
local KEY_B64 = "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQp4eXoKLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K"
local CA = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
local CA_B64 = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCmNhCi0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K"

-- what `kind create cluster` writes
local KIND = ([[
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: %s
    server: https://127.0.0.1:35617
  name: kind-kind
contexts:
- context:
    cluster: kind-kind
    user: kind-kind
  name: kind-kind
current-context: kind-kind
kind: Config
preferences: {}
users:
- name: kind-kind
  user:
    client-certificate-data: %s
    client-key-data: %s
]]):format(CA_B64, CERT_B64, KEY_B64)

-- what `gcloud container clusters get-credentials` writes (go-yaml wraps the long installHint)
local GKE = ([[
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: %s
    server: https://34.123.45.67
  name: gke_my-project_us-central1_prod
contexts:
- context:
    cluster: gke_my-project_us-central1_prod
    user: gke_my-project_us-central1_prod
  name: gke_my-project_us-central1_prod
current-context: gke_my-project_us-central1_prod
kind: Config
preferences: {}
users:
- name: gke_my-project_us-central1_prod
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: gke-gcloud-auth-plugin
      installHint: Install gke-gcloud-auth-plugin for use with kubectl by following
        https://cloud.google.com/blog/products/containers-kubernetes/kubectl-auth-changes-in-gke
      provideClusterInfo: true
]]):format(CA_B64)

-- what `aws eks update-kubeconfig` writes
local EKS = [[
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: ]] .. CA_B64 .. [[

    server: https://ABCDEF0123456789.gr7.us-west-2.eks.amazonaws.com
  name: arn:aws:eks:us-west-2:123456789012:cluster/prod
contexts:
- context:
    cluster: arn:aws:eks:us-west-2:123456789012:cluster/prod
    user: arn:aws:eks:us-west-2:123456789012:cluster/prod
  name: arn:aws:eks:us-west-2:123456789012:cluster/prod
current-context: arn:aws:eks:us-west-2:123456789012:cluster/prod
kind: Config
preferences: {}
users:
- name: arn:aws:eks:us-west-2:123456789012:cluster/prod
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      args:
      - --region
      - us-west-2
      - eks
      - get-token
      - --cluster-name
      - prod
      - --output
      - json
      command: aws
      env:
      - name: AWS_PROFILE
        value: prod
      interactiveMode: IfAvailable
      provideClusterInfo: false
]]

-- an old-style gcp auth-provider user
local AUTH_PROVIDER = [[
apiVersion: v1
kind: Config
clusters:
- name: old
  cluster:
    server: https://35.1.2.3
    insecure-skip-tls-verify: true
contexts:
- name: old
  context: {cluster: old, user: old}
current-context: old
users:
- name: old
  user:
    auth-provider:
      config:
        cmd-args: config config-helper --format=json
        cmd-path: /usr/lib/google-cloud-sdk/bin/gcloud
        expiry-key: '{.credential.token_expiry}'
        token-key: '{.credential.access_token}'
      name: gcp
]]

-- what minikube writes (extensions, file references)
local MINIKUBE = [[
apiVersion: v1
clusters:
- cluster:
    certificate-authority: /home/me/.minikube/ca.crt
    extensions:
    - extension:
        last-update: Mon, 01 Jan 2024 10:00:00 UTC
        provider: minikube.sigs.k8s.io
        version: v1.32.0
      name: cluster_info
    server: https://192.168.49.2:8443
  name: minikube
contexts:
- context:
    cluster: minikube
    extensions:
    - extension:
        last-update: Mon, 01 Jan 2024 10:00:00 UTC
        provider: minikube.sigs.k8s.io
        version: v1.32.0
      name: context_info
    namespace: default
    user: minikube
  name: minikube
current-context: minikube
kind: Config
preferences: {}
users:
- name: minikube
  user:
    client-certificate: /home/me/.minikube/profiles/minikube/client.crt
    client-key: /home/me/.minikube/profiles/minikube/client.key
]]

-- hand-edited: comments, indented sequences, quoting, a token user, several contexts
local MULTI = [[
# my clusters
apiVersion: v1
kind: Config
current-context: "staging"   # switch with kubectl config use-context
clusters:
  - name: staging
    cluster:
      server: 'https://staging.example.com:6443/' # trailing slash is dropped
      certificate-authority: certs/staging-ca.pem
  - name: prod
    cluster:
      server: "https://prod.example.com"
      certificate-authority-data: ]] .. CA_B64 .. [[

contexts:
  - name: staging
    context:
      cluster: staging
      user: "robot: staging #1"
      namespace: sandboxes
  - name: prod
    context:
      cluster: prod
      user: admin
users:
  - name: "robot: staging #1"
    user:
      token: "abc#def:ghi"    # a token with '#' and ':' must be quoted
  - name: admin
    user:
      tokenFile: /var/run/secrets/admin-token
      token: stale-token
]]

-- `kubectl config view --raw -o json`
local JSON = ([[
{
    "kind": "Config",
    "apiVersion": "v1",
    "preferences": {},
    "clusters": [
        {
            "name": "json-cluster",
            "cluster": {
                "server": "https://10.0.0.1:6443",
                "certificate-authority-data": "%s"
            }
        }
    ],
    "users": [
        {
            "name": "json-user",
            "user": {
                "token": "json-token"
            }
        }
    ],
    "contexts": [
        {
            "name": "json-ctx",
            "context": {
                "cluster": "json-cluster",
                "user": "json-user",
                "namespace": "ns1"
            }
        }
    ],
    "current-context": "json-ctx"
}
]]):format(CA_B64)

-- temp files and directories, removed at the end
local created_files, created_dirs = {}, {}

local function write(path, data)
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
    created_files[#created_files + 1] = path
    return path
end

local function tmpfile(data)
    local p = os.tmpname()
    return write(p, data)
end

local function mkdir(path)
    assert(os.execute("mkdir '" .. path .. "'") == 0 or io.open(path, "rb"), "mkdir " .. path)
    table.insert(created_dirs, 1, path)
    return path
end

local function tmpdir()
    local p = os.tmpname()
    os.remove(p)
    return mkdir(p)
end

local function env_of(t)
    return function(name)
        return t[name]
    end
end

local function keys(t)
    local out = {}
    for k in pairs(t) do
        out[#out + 1] = k
    end
    table.sort(out)
    return out
end

teardown(function()
    for _, p in ipairs(created_files) do
        os.remove(p)
    end
    for _, p in ipairs(created_dirs) do
        os.remove(p)
    end
end)

describe("kubeconn", function()
    describe("base64_decode", function()
        it("decodes the RFC 4648 test vectors", function()
            local vectors = {
                [""] = "", ["Zg=="] = "f", ["Zm8="] = "fo", ["Zm9v"] = "foo",
                ["Zm9vYg=="] = "foob", ["Zm9vYmE="] = "fooba", ["Zm9vYmFy"] = "foobar",
            }
            for enc, dec in pairs(vectors) do
                assert.are.equal(dec, kc.base64_decode(enc), enc)
            end
        end)

        it("ignores whitespace and line breaks", function()
            assert.are.equal("foobar", kc.base64_decode(" Zm9v\nYmFy\r\n"))
            assert.are.equal("foob", kc.base64_decode("Zm9v\tYg=\n="))
            assert.are.equal(CERT, kc.base64_decode(CERT_B64))
        end)

        it("round-trips every byte value", function()
            local all = {}
            for i = 0, 255 do
                all[#all + 1] = string.char(i)
            end
            local s = table.concat(all)
            for cut = 0, 3 do
                local part = s:sub(1, #s - cut)
                assert.are.equal(part, kc.base64_decode(b64.encode(part)))
            end
        end)

        it("rejects invalid input", function()
            local bad = {
                "Zm9v!", "Zm9", "Z", "Z===", "Zg==Zg==", "Zg=a", "-_8=", "Zm9vYmFy=", "Zm=9",
                "Zm9vY===",
            }
            for _, s in ipairs(bad) do
                local v, err = kc.base64_decode(s)
                assert.is_nil(v, s)
                assert.matches("^base64: ", err, 1, false)
            end
            local v, err = kc.base64_decode("Zm9v*YmFy")
            assert.is_nil(v)
            assert.matches('"%*"', err)
            assert.is_nil((kc.base64_decode(nil)))
        end)
    end)

    describe("parse_yaml", function()
        local function yaml(text)
            local v, err = kc.parse_yaml(text)
            assert(v ~= nil, "parse failed: " .. tostring(err))
            return v
        end

        it("parses block mappings with plain scalars", function()
            assert.are.same({ a = "x", b = "hello world", c = "http://h:1/p?q=1" },
                yaml("a: x\nb: hello world\nc: http://h:1/p?q=1\n"))
        end)

        it("parses nested mappings and the various sequence layouts", function()
            assert.are.same({ top = { mid = { leaf = "v" }, other = "w" } },
                yaml("top:\n  mid:\n    leaf: v\n  other: w\n"))
            assert.are.same({ l = { "a", "b" }, after = "x" }, yaml("l:\n  - a\n  - b\nafter: x\n"))
            -- kubectl style: the sequence is not indented under its key
            assert.are.same({ l = { "a", "b" }, after = "x" }, yaml("l:\n- a\n- b\nafter: x\n"))
            assert.are.same({ "a", { "b", "c" }, "d" }, yaml("- a\n- - b\n  - c\n- d\n"))
            assert.are.same({ { "x" } }, yaml("-\n  - x\n"))
        end)

        it("parses sequences of mappings with continuation lines under the dash", function()
            local v = yaml([[
clusters:
- cluster:
    server: https://1.2.3.4
  name: x
-   name: y
    cluster: {}
- name: z
  list:
  - 1
  - 2
  next: ok
]])
            assert.are.same({ clusters = {
                { cluster = { server = "https://1.2.3.4" }, name = "x" },
                { name = "y", cluster = {} },
                { name = "z", list = { 1, 2 }, next = "ok" },
            } }, v)
        end)

        it("resolves null, booleans and numbers, and keeps keys as strings", function()
            local v = yaml([[
n1: null
n2: ~
n3:
n4: Null
t: true
f: false
T: True
F: FALSE
i: 42
neg: -7
pos: +3
hex: 0x1F
oct: 0o17
float: 1.5
exp: 1e3
ver: v1
yes: yes
num_str: "42"
bool_str: 'true'
1: one
true: key
inf: .inf
]])
            assert.are.equal(NULL, v.n1)
            assert.are.equal(NULL, v.n2)
            assert.are.equal(NULL, v.n3)
            assert.are.equal(NULL, v.n4)
            assert.is_true(v.t)
            assert.is_false(v.f)
            assert.is_true(v.T)
            assert.is_false(v.F)
            assert.are.equal(42, v.i)
            assert.are.equal(-7, v.neg)
            assert.are.equal(3, v.pos)
            assert.are.equal(31, v.hex)
            assert.are.equal(15, v.oct)
            assert.are.equal(1.5, v.float)
            assert.are.equal(1000, v.exp)
            assert.are.equal("v1", v.ver)
            assert.are.equal("yes", v.yes) -- YAML 1.2: not a boolean
            assert.are.equal("42", v.num_str)
            assert.are.equal("true", v.bool_str)
            assert.are.equal("one", v["1"])
            assert.are.equal("key", v["true"])
            assert.are.equal(math.huge, v.inf)
            assert.is_nil(v[1])
            assert.is_nil(v[true])
        end)

        it("keeps nulls in sequences in place", function()
            assert.are.same({ "a", NULL, "c" }, yaml("- a\n- ~\n- c\n"))
            assert.are.same({ "a", NULL, "c" }, yaml("- a\n-\n- c\n"))
        end)

        it("handles comments", function()
            local v = yaml([[
# leading comment
a: 1 # trailing
   # indented comment line
b: x#not-a-comment
c: "# in quotes"  # real comment
d: # comment, empty value
list:
# comment between items
- one # c
  # more
- two
]])
            assert.are.same({ a = 1, b = "x#not-a-comment", c = "# in quotes", d = NULL,
                list = { "one", "two" } }, v)
        end)

        it("parses single- and double-quoted scalars with ':' and '#'", function()
            local v = yaml([[
s1: 'a: b # c'
s2: 'it''s'
d1: "a: b # c"
d2: "tab\there\nnewline \"quoted\" back\\slash \x41\u00e9\U0001F600 \/"
"quoted key: with colon": 1
'single # key': 2
empty1: ''
empty2: ""
]])
            assert.are.equal("a: b # c", v.s1)
            assert.are.equal("it's", v.s2)
            assert.are.equal("a: b # c", v.d1)
            assert.are.equal("tab\there\nnewline \"quoted\" back\\slash A\195\169\240\159\152\128 /",
                v.d2)
            assert.are.equal(1, v["quoted key: with colon"])
            assert.are.equal(2, v["single # key"])
            assert.are.equal("", v.empty1)
            assert.are.equal("", v.empty2)
        end)

        it("folds multi-line quoted and plain scalars as YAML emitters wrap them", function()
            local v = yaml([[
plain: first part
  second part

  after blank
dq: "one
  two \
  three\
  \ four"
sq: 'alpha
  beta'
next: x
]])
            assert.are.equal("first part second part\nafter blank", v.plain)
            assert.are.equal("one two three four", v.dq)
            assert.are.equal("alpha beta", v.sq)
            assert.are.equal("x", v.next)
        end)

        it("parses flow collections", function()
            local v = yaml([==[
e1: {}
e2: []
seq: [a, 'b c', "d,e", 1, true, ~]
map: {a: b, c: 'd', "e": 1, f: }
url: {server: https://h:6443/x}
nested: {a: [1, 2], b: {c: d}}
trailing: [x, y, ]
multi: [one,
  two]
]==])
            assert.are.same({}, v.e1)
            assert.are.same({}, v.e2)
            assert.are.same({ "a", "b c", "d,e", 1, true, NULL }, v.seq)
            assert.are.same({ a = "b", c = "d", e = 1, f = NULL }, v.map)
            assert.are.same({ server = "https://h:6443/x" }, v.url)
            assert.are.same({ a = { 1, 2 }, b = { c = "d" } }, v.nested)
            assert.are.same({ "x", "y" }, v.trailing)
            assert.are.same({ "one", "two" }, v.multi)
            assert.are.same({ "a", "b" }, yaml("[a, b]"))
            assert.are.same({ a = 1 }, yaml("{a: 1}  # flow root with a comment"))
        end)

        it("parses literal and folded block scalars with chomping", function()
            local v = yaml([[
lit: |
  line1
    indented
  line3
fold: >
  folded
  text

  new para
strip: |-
  no newline
keep: |+
  kept

clip: >-
  a
  b
after: end
]])
            assert.are.equal("line1\n  indented\nline3\n", v.lit)
            assert.are.equal("folded text\nnew para\n", v.fold)
            assert.are.equal("no newline", v.strip)
            assert.are.equal("kept\n\n", v.keep)
            assert.are.equal("a b", v.clip)
            assert.are.equal("end", v.after)
        end)

        it("reads certificate data written as a block scalar inside a sequence", function()
            local v = yaml([[
users:
- name: u
  user:
    client-certificate-data: |
      LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCmFiYwotLS0tLUVORCBDRVJUSUZJ
      Q0FURS0tLS0tCg==
    token: t
- |-
  literal item
]])
            local data = v.users[1].user["client-certificate-data"]
            assert.are.equal(CERT, kc.base64_decode(data))
            assert.are.equal("t", v.users[1].user.token)
            assert.are.equal("literal item", v.users[2])
        end)

        it("accepts a document start, directives, a document end, CRLF and a BOM", function()
            assert.are.same({ a = 1 }, yaml("---\na: 1\n"))
            assert.are.same({ a = 1 }, yaml("%YAML 1.2\n--- # start\na: 1\n...\n"))
            assert.are.same({ a = "x", b = { "y" } }, yaml("\239\187\191a: x\r\nb:\r\n- y\r\n"))
            assert.are.same({ a = 1 }, yaml("  a: 1\n  # indented root\n"))
            assert.are.same({ a = 1 }, yaml("a: 1\n---\n"))       -- a trailing empty document
            assert.are.same({ a = 1 }, yaml("a: 1\n...\n---\n# end\n"))
        end)

        it("returns null for an empty document and a scalar for a scalar document", function()
            assert.are.equal(NULL, yaml(""))
            assert.are.equal(NULL, yaml("# nothing\n\n---\n"))
            assert.are.equal("just text", yaml("just text\n"))
            assert.are.equal(5, yaml("5"))
        end)

        it("accepts JSON (through cjson) and gives the same result as the YAML form", function()
            local from_json = yaml(JSON)
            assert.are.equal("json-ctx", from_json["current-context"])
            assert.are.equal("https://10.0.0.1:6443", from_json.clusters[1].cluster.server)
            -- the same JSON with a comment is not JSON any more: the YAML flow parser takes it
            local commented = JSON:gsub('"kind": "Config",', '"kind": "Config", # comment', 1)
            assert.is_nil(cjson.decode(commented))
            assert.are.same(from_json, yaml(commented))
            assert.are.same({ 1, NULL }, yaml("[1, null]"))
        end)

        it("parses real-world kubeconfigs", function()
            local kind = yaml(KIND)
            assert.are.same({ "apiVersion", "clusters", "contexts", "current-context", "kind",
                "preferences", "users" }, keys(kind))
            assert.are.equal(CA_B64, kind.clusters[1].cluster["certificate-authority-data"])
            assert.are.equal("kind-kind", kind.users[1].name)
            assert.are.same({}, kind.preferences)

            local gke = yaml(GKE)
            local exec = gke.users[1].user.exec
            assert.are.equal("gke-gcloud-auth-plugin", exec.command)
            assert.are.equal("Install gke-gcloud-auth-plugin for use with kubectl by following "
                .. "https://cloud.google.com/blog/products/containers-kubernetes/kubectl-auth-"
                .. "changes-in-gke", exec.installHint)
            assert.is_true(exec.provideClusterInfo)

            local eks = yaml(EKS)
            local eexec = eks.users[1].user.exec
            assert.are.same({ "--region", "us-west-2", "eks", "get-token", "--cluster-name",
                "prod", "--output", "json" }, eexec.args)
            assert.are.same({ { name = "AWS_PROFILE", value = "prod" } }, eexec.env)
            assert.are.equal("arn:aws:eks:us-west-2:123456789012:cluster/prod",
                eks["current-context"])

            local ap = yaml(AUTH_PROVIDER)
            assert.are.equal("{.credential.access_token}",
                ap.users[1].user["auth-provider"].config["token-key"])
            assert.are.same({ cluster = "old", user = "old" }, ap.contexts[1].context)

            local mk = yaml(MINIKUBE)
            assert.are.equal("Mon, 01 Jan 2024 10:00:00 UTC",
                mk.clusters[1].cluster.extensions[1].extension["last-update"])
            assert.are.equal("cluster_info", mk.clusters[1].cluster.extensions[1].name)
            assert.are.equal("default", mk.contexts[1].context.namespace)

            local multi = yaml(MULTI)
            assert.are.equal("staging", multi["current-context"])
            assert.are.equal("robot: staging #1", multi.users[1].name)
            assert.are.equal("abc#def:ghi", multi.users[1].user.token)
            assert.are.equal("https://staging.example.com:6443/", multi.clusters[1].cluster.server)
        end)

        it("reports malformed YAML with the line number", function()
            local cases = {
                { "a: 1\n  b: 2\n", 2 },                  -- mapping inside a plain scalar
                { "a:\n  b: 1\n c: 2\n", 3 },             -- indentation matches no level
                { "a: 1\nb: \"unterminated\n", 2 },
                { "a: 'unterminated\n\n", 1 },
                { "x: 1\na: 1\na: 2\n", 3 },              -- duplicate key
                { "a: [1, 2\n", 1 },                      -- unterminated flow sequence
                { "a: {b: 1\nc: 2\n", 2 },               -- flow mapping runs into the next line
                { "ok: 1\n\tkey: v\n", 2 },               -- tab indentation
                { "a: b: c\n", 1 },
                { "a: 1\n- b\n", 2 },                     -- sequence item inside a mapping
                { "- a\nb: 1\n", 2 },                     -- mapping key after a root sequence
                { "a: \"x\" y\n", 1 },
                { "a: *ref\n", 1 },                      -- alias to no anchor
                { "a: &s [1, *s]\n", 1 },                -- alias to its own (unfinished) node
                { "<<: 5\n", 1 },                         -- merge of a scalar
                { "[a]: 1\n", 1 },                        -- a sequence as a key
                { "-\tx\n", 1 },                          -- tab after '-': libyaml (YAML 1.1) refuses it
                { "a: 1\n---\nb: 2\n", 2 },               -- a second document (its '---')
                { "a: \"bad \\q escape\"\n", 1 },
                { "key without colon\nnext: 1\n", 2 },
                { "a:\n  - x\n  y: 1\n", 3 },
                { "a: [1, 2] trailing\n", 1 },
                { "a: |x\n  text\n", 1 },                 -- bad block scalar header
                { "a: |\n    four\n  two\n", 3 },         -- block scalar dedent
                { "l:\n  - a\n - b\n", 3 },              -- dedent to no known level
                { "{a: 1} extra\n", 1 },
                { "a: - b\n", 1 },
                { "a: 1\n...\nb: 2\n", 3 },
            }
            for _, case in ipairs(cases) do
                local v, err = kc.parse_yaml(case[1])
                assert.is_nil(v, case[1])
                assert.is_string(err, case[1])
                assert.are.equal(case[2], tonumber(err:match("^line (%d+): .")),
                    ("%q -> %s"):format(case[1], err))
            end
            assert.is_nil((kc.parse_yaml(nil)))
        end)

        -- libyaml reads all of YAML; these are the forms real kubeconfigs (hand-edited ones,
        -- and those written by Helm charts and cloud tooling) use that a subset parser did not.
        it("resolves anchors and aliases, and merge keys", function()
            local v = yaml([[
defaults: &defaults
  server: https://10.0.0.1:6443
  insecure-skip-tls-verify: true
ca: &ca LS0tLS1CRUdJTg==
clusters:
- name: a
  cluster:
    <<: *defaults
    certificate-authority-data: *ca
- name: b
  cluster:
    <<: [*defaults, {server: https://other:6443, proxy-url: http://p}]
    server: https://b:6443
names: &names [a, b]
again: *names
]])
            assert.are.same({ server = "https://10.0.0.1:6443", ["insecure-skip-tls-verify"] = true,
                ["certificate-authority-data"] = "LS0tLS1CRUdJTg==" }, v.clusters[1].cluster)
            -- explicit keys win over merged ones; among merged mappings the first wins
            assert.are.same({ server = "https://b:6443", ["insecure-skip-tls-verify"] = true,
                ["proxy-url"] = "http://p" }, v.clusters[2].cluster)
            assert.are.same({ "a", "b" }, v.again)
            assert.are.equal(v.names, v.again) -- an alias shares the anchored table
            assert.is_nil(v.clusters[1].cluster["<<"])
        end)

        it("reads flow mappings, tags, explicit and quoted keys, and block scalars in kubeconfigs", function()
            local v = yaml([[
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://c:6443", certificate-authority-data: !!str 12345}}]
contexts:
- {name: ctx, context: {cluster: c, user: u, namespace: "default"}}
users:
- name: u
  user:
    "token": >-
      abc
      def
    'exec':
      command: |
        /usr/bin/helper
      args: !!seq [ "--a", '--b' ]
? current-context
: ctx
preferences: !!map {}
]])
            assert.are.equal("12345", v.clusters[1].cluster["certificate-authority-data"])
            assert.are.equal("https://c:6443", v.clusters[1].cluster.server)
            assert.are.same({ cluster = "c", user = "u", namespace = "default" },
                v.contexts[1].context)
            assert.are.equal("abc def", v.users[1].user.token)
            assert.are.equal("/usr/bin/helper\n", v.users[1].user.exec.command)
            assert.are.same({ "--a", "--b" }, v.users[1].user.exec.args)
            assert.are.equal("ctx", v["current-context"])
            assert.are.same({}, v.preferences)
            local conn = assert(kc.from_kubeconfig { text = v and ([[
apiVersion: v1
clusters: [{name: c, cluster: &cl {server: "https://c:6443"}}]
contexts: [{name: ctx, context: {cluster: c, user: u}}]
current-context: ctx
users: [{name: u, user: {token: tok}}]
]]) })
            assert.are.equal("https://c:6443", conn.server)
            assert.are.equal("tok", conn.token)
        end)

        it("refuses a second document and a duplicate key reached through an alias", function()
            local v, err = kc.parse_yaml("a: 1\n---\nb: 2\n")
            assert.is_nil(v)
            assert.matches("multiple documents", err, 1, true)
            v, err = kc.parse_yaml("a: &k x\nx: 1\n*k : 2\n")
            assert.is_nil(v)
            assert.matches("^line 3: duplicate key 'x'", err)
            -- sp.yaml itself follows the sp.* convention: nil, "EINVAL: ..."
            v, err = require("sp.yaml").decode("a: 1\n---\nb: 2\n")
            assert.is_nil(v)
            assert.matches("^EINVAL: line 2: multiple documents", err)
            assert.are.equal(cjson.null, require("sp.yaml").decode("~"))
        end)

        it("refuses nesting deeper than its limit with an error, not a crash", function()
            local v, err = kc.parse_yaml(string.rep("[", 5000) .. string.rep("]", 5000))
            assert.is_nil(v)
            assert.matches("^line 1: ", err)
        end)

        it("is fast enough on a large kubeconfig", function()
            local parts = { "apiVersion: v1\nclusters:\n" }
            for i = 1, 500 do
                parts[#parts + 1] = ("- cluster:\n    certificate-authority-data: %s\n"
                    .. "    server: https://10.0.%d.%d:6443\n  name: c%d\n"):format(
                    CA_B64, math.floor(i / 256), i % 256, i)
            end
            local text = table.concat(parts)
            local t0 = os.clock()
            local v = yaml(text)
            assert.are.equal(500, #v.clusters)
            assert.are.equal("c500", v.clusters[500].name)
            assert.is_true(os.clock() - t0 < 1)
        end)
    end)

    describe("from_kubeconfig", function()
        it("maps a kind kubeconfig (all *-data fields decoded)", function()
            local conn, err = kc.from_kubeconfig { text = KIND }
            assert.is_nil(err)
            assert.are.same({
                server = "https://127.0.0.1:35617", ca_data = CA, cert_data = CERT,
                key_data = KEY, insecure = false, source = "kubeconfig", context = "kind-kind",
            }, conn)
        end)

        it("maps a token user, a namespace and quoted names", function()
            local conn = assert(kc.from_kubeconfig { text = MULTI, dir = "/etc/kube" })
            assert.are.same({
                server = "https://staging.example.com:6443", ca_file = "/etc/kube/certs/staging-ca.pem",
                token = "abc#def:ghi", namespace = "sandboxes", insecure = false,
                source = "kubeconfig", context = "staging",
            }, conn)
        end)

        it("switches context on request; tokenFile wins over token", function()
            local conn = assert(kc.from_kubeconfig { text = MULTI, context = "prod" })
            assert.are.same({
                server = "https://prod.example.com", ca_data = CA,
                token_file = "/var/run/secrets/admin-token", insecure = false,
                source = "kubeconfig", context = "prod",
            }, conn)
            assert.is_nil(conn.token)
            local none, err = kc.from_kubeconfig { text = MULTI, context = "nope" }
            assert.is_nil(none)
            assert.matches('context "nope" not found', err, 1, true)
        end)

        it("follows current-context when it changes", function()
            local text = MULTI:gsub('current%-context: "staging"', "current-context: prod")
            assert.are.equal("prod", assert(kc.from_kubeconfig { text = text }).context)
        end)

        it("maps minikube's file references and the JSON form", function()
            local mk = assert(kc.from_kubeconfig { text = MINIKUBE })
            assert.are.equal("/home/me/.minikube/ca.crt", mk.ca_file)
            assert.are.equal("/home/me/.minikube/profiles/minikube/client.crt", mk.cert_file)
            assert.are.equal("/home/me/.minikube/profiles/minikube/client.key", mk.key_file)
            assert.are.equal("default", mk.namespace)
            assert.are.same({
                server = "https://10.0.0.1:6443", ca_data = CA, token = "json-token",
                namespace = "ns1", insecure = false, source = "kubeconfig", context = "json-ctx",
            }, assert(kc.from_kubeconfig { text = JSON }))
        end)

        it("refuses exec and auth-provider users, pointing at kubectl proxy", function()
            for _, text in ipairs({ GKE, EKS, AUTH_PROVIDER }) do
                local conn, err = kc.from_kubeconfig { text = text }
                assert.is_nil(conn)
                assert.matches("exec-plugin credentials are not supported", err, 1, true)
                assert.matches("kubectl proxy", err, 1, true)
                assert.matches("--kube-api http://127.0.0.1:8001", err, 1, true)
            end
            local _, err = kc.from_kubeconfig { text = GKE }
            assert.matches("gke-gcloud-auth-plugin", err, 1, true)
            -- an exec user that also has a token is usable
            local with_token = GKE:gsub("    exec:\n", "    token: static\n    exec:\n", 1)
            local conn = assert(kc.from_kubeconfig { text = with_token })
            assert.are.equal("static", conn.token)
        end)

        it("reads insecure-skip-tls-verify and a context without a user", function()
            local conn = assert(kc.from_kubeconfig { text = [[
clusters:
- name: local
  cluster: {server: "http://127.0.0.1:8001/", insecure-skip-tls-verify: true}
contexts:
- name: proxy
  context: {cluster: local}
current-context: proxy
]] })
            assert.are.same({ server = "http://127.0.0.1:8001", insecure = true,
                source = "kubeconfig", context = "proxy" }, conn)
        end)

        it("reports broken references and fields", function()
            local function err_of(text)
                local conn, err = kc.from_kubeconfig { text = text }
                assert.is_nil(conn)
                return err
            end
            local base = "clusters:\n- name: c\n  cluster:\n    server: %s\n%s"
                .. "contexts:\n- name: x\n  context:\n    cluster: %s\n    user: %s\n"
                .. "users:\n- name: u\n  user:\n%s"
            local function cfg(t)
                return base:format(t.server or "https://h", t.cluster_extra or "",
                    t.cluster or "c", t.user or "u", t.user_body or "    token: t\n")
                    .. (t.current == false and "" or "current-context: x\n")
            end
            assert.matches("no current%-context", err_of(cfg { current = false }))
            assert.matches('cluster "zz" %(context "x"%) not found', err_of(cfg { cluster = "zz" }))
            assert.matches('user "zz" %(context "x"%) not found', err_of(cfg { user = "zz" }))
            assert.matches("must start with http:// or https://",
                err_of(cfg { server = "ftp://h" }))
            assert.matches("must start with http:// or https://",
                err_of(cfg { server = "10.0.0.1:6443" }))
            assert.matches("no server URL", err_of(cfg { server = '""' }))
            assert.matches("certificate%-authority%-data: base64",
                err_of(cfg { cluster_extra = "    certificate-authority-data: not!base64\n" }))
            assert.matches("client%-key%-data: base64", err_of(cfg {
                user_body = "    client-certificate-data: Zm9v\n    client-key-data: Zm9\n" }))
            assert.matches("no client key", err_of(cfg { user_body = "    client-certificate: c\n" }))
            assert.matches("no client certificate", err_of(cfg { user_body = "    client-key: k\n" }))
            assert.matches("insecure flag is not allowed", err_of(cfg {
                cluster_extra = "    insecure-skip-tls-verify: true\n    certificate-authority: ca\n" }))
            assert.matches("redacted", err_of(cfg { cluster_extra =
                "    certificate-authority-data: DATA+OMITTED\n" }))
            assert.matches("without %-%-raw", err_of(cfg { user_body = "    token: REDACTED\n" }))
            assert.matches("^kubeconfig <text>: line 2: ", err_of("a: 1\n  b: 2\n"))
            assert.matches("expected a mapping", err_of("- a\n- b\n"))
            assert.matches('"clusters" must be a list', err_of("clusters: {a: b}\n"))
            -- certificate-authority-data wins over certificate-authority
            local conn = assert(kc.from_kubeconfig { text = cfg { cluster_extra =
                "    certificate-authority: ca.crt\n    certificate-authority-data: " .. CA_B64
                .. "\n" } })
            assert.are.equal(CA, conn.ca_data)
            assert.is_nil(conn.ca_file)
        end)

        describe("with files", function()
            local dir

            setup(function()
                dir = tmpdir()
                mkdir(dir .. "/kube")
            end)

            it("resolves relative paths against the kubeconfig's directory", function()
                local path = write(dir .. "/kube/config", [[
apiVersion: v1
clusters:
- cluster:
    certificate-authority: certs/ca.crt
    server: https://api.example:6443
  name: c
contexts:
- context: {cluster: c, user: u, namespace: team-a}
  name: ctx
current-context: ctx
users:
- name: u
  user:
    client-certificate: ./client.crt
    client-key: /abs/client.key
]])
                assert.are.same({
                    server = "https://api.example:6443", ca_file = dir .. "/kube/certs/ca.crt",
                    cert_file = dir .. "/kube/./client.crt", key_file = "/abs/client.key",
                    namespace = "team-a", insecure = false, source = "kubeconfig",
                    context = "ctx",
                }, assert(kc.from_kubeconfig { path = path }))
                write(dir .. "/kube/token-config", [[
clusters: [{name: c, cluster: {server: "https://x"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
users: [{name: u, user: {tokenFile: token}}]
current-context: c
]])
                local conn = assert(kc.from_kubeconfig { path = dir .. "/kube/token-config" })
                assert.are.equal(dir .. "/kube/token", conn.token_file)
                assert.is_nil(conn.token)
            end)

            it("reports a missing or unreadable file by name", function()
                local conn, err = kc.from_kubeconfig { path = dir .. "/missing" }
                assert.is_nil(conn)
                assert.matches(dir .. "/missing", err, 1, true)
                conn, err = kc.from_kubeconfig { path = dir }
                assert.is_nil(conn)
                assert.matches(dir, err, 1, true)
            end)

            it("merges a KUBECONFIG list like kubectl", function()
                local first = write(dir .. "/first", [[
clusters:
- name: shared
  cluster: {server: "https://first", certificate-authority: ca-first.crt}
- name: only-first
  cluster: {server: "https://only-first"}
contexts:
- name: a
  context: {cluster: shared, user: shared}
users:
- name: shared
  user: {token: first-token}
]])
                local second = write(dir .. "/kube/second", [[
clusters:
- name: shared
  cluster: {server: "https://second"}
- name: only-second
  cluster: {server: "https://only-second", certificate-authority: ca-second.crt}
contexts:
- name: a
  context: {cluster: only-second, user: shared}
- name: b
  context: {cluster: only-second, user: second-user}
current-context: b
users:
- name: shared
  user: {token: second-token}
- name: second-user
  user: {token: second-user-token}
]])
                local third = write(dir .. "/third", "current-context: a\n")
                local paths = kc.split_paths(first .. ":" .. dir .. "/absent:" .. second .. ":"
                    .. third .. ":" .. first)
                assert.are.same({ first, dir .. "/absent", second, third }, paths)

                -- current-context from the first file that sets it (the second one)
                local conn = assert(kc.from_kubeconfig { paths = paths })
                assert.are.equal("b", conn.context)
                assert.are.equal("https://only-second", conn.server)
                assert.are.equal(dir .. "/kube/ca-second.crt", conn.ca_file)
                assert.are.equal("second-user-token", conn.token)

                -- names defined in both files: the first file's definition wins
                conn = assert(kc.from_kubeconfig { paths = paths, context = "a" })
                assert.are.equal("https://first", conn.server)
                assert.are.equal(dir .. "/ca-first.crt", conn.ca_file)
                assert.are.equal("first-token", conn.token)

                -- the first file to set current-context wins even if it is listed later
                conn = assert(kc.from_kubeconfig { paths = { third, second, first } })
                assert.are.equal("a", conn.context)
                -- now the second file's context "a", cluster and user come first
                assert.are.equal("https://only-second", conn.server)
                assert.are.equal("second-token", conn.token)

                -- all missing: an error naming them
                local none, err = kc.from_kubeconfig { paths = { dir .. "/x1", dir .. "/x2" } }
                assert.is_nil(none)
                assert.matches(dir .. "/x1, " .. dir .. "/x2", err, 1, true)

                -- a directory is an error, not skipped like a missing file
                none, err = kc.from_kubeconfig { paths = { first, dir .. "/kube" } }
                assert.is_nil(none)
                assert.matches(dir .. "/kube", err, 1, true)

                -- a file that does not parse is an error, not skipped
                local broken = write(dir .. "/broken", "a: [\n")
                none, err = kc.from_kubeconfig { paths = { first, broken } }
                assert.is_nil(none)
                assert.matches(broken .. ": line 1:", err, 1, true)
            end)
        end)
    end)

    describe("in_cluster", function()
        local sa, sa_nons, sa_empty

        setup(function()
            sa = tmpdir()
            write(sa .. "/token", "tok")
            write(sa .. "/ca.crt", CA)
            write(sa .. "/namespace", "  sandboxes \n")
            sa_nons = tmpdir()
            write(sa_nons .. "/token", "tok")
            sa_empty = tmpdir()
            write(sa_empty .. "/token", "tok")
            write(sa_empty .. "/namespace", "\n")
        end)

        local function env(host, port)
            return env_of { KUBERNETES_SERVICE_HOST = host, KUBERNETES_SERVICE_PORT = port }
        end

        it("builds the service-account connection for an IPv4 host", function()
            assert.are.same({
                server = "https://10.96.0.1:443", ca_file = sa .. "/ca.crt",
                token_file = sa .. "/token", namespace = "sandboxes", source = "in-cluster",
            }, kc.in_cluster(env("10.96.0.1", "443"), sa))
            -- a trailing slash on the directory does not double up
            assert.are.equal(sa .. "/token", kc.in_cluster(env("10.96.0.1", "443"), sa .. "/").token_file)
        end)

        it("brackets IPv6 hosts, once", function()
            assert.are.equal("https://[fd00::1]:443", kc.in_cluster(env("fd00::1", "443"), sa).server)
            assert.are.equal("https://[fd00::1]:6443",
                kc.in_cluster(env("[fd00::1]", "6443"), sa).server)
            assert.are.equal("https://[2001:db8::a:1]:443",
                kc.in_cluster(env("2001:db8::a:1", "443"), sa).server)
        end)

        it("is nil unless both variables are set", function()
            assert.is_nil(kc.in_cluster(env(nil, nil), sa))
            assert.is_nil(kc.in_cluster(env("10.0.0.1", nil), sa))
            assert.is_nil(kc.in_cluster(env(nil, "443"), sa))
            assert.is_nil(kc.in_cluster(env("", "443"), sa))
            assert.is_nil(kc.in_cluster(env("10.0.0.1", ""), sa))
            local v, err = kc.in_cluster(env(nil, nil), sa)
            assert.is_nil(v)
            assert.is_nil(err)
        end)

        it("reads the namespace file only when present and non-empty", function()
            assert.is_nil(kc.in_cluster(env("10.0.0.1", "443"), sa_nons).namespace)
            assert.is_nil(kc.in_cluster(env("10.0.0.1", "443"), sa_empty).namespace)
        end)

        it("needs a readable token file and a numeric port (as client-go does)", function()
            local v, err = kc.in_cluster(env("10.0.0.1", "443"), sa .. "/nowhere")
            assert.is_nil(v)
            assert.matches(sa .. "/nowhere/token", err, 1, true)
            v, err = kc.in_cluster(env("10.0.0.1", "https"), sa)
            assert.is_nil(v)
            assert.matches("KUBERNETES_SERVICE_PORT", err, 1, true)
            assert.is_nil((kc.in_cluster(env("10.0.0.1", "70000"), sa)))
        end)

        it("defaults the directory and accepts an env table", function()
            local f = io.open(kc.DEFAULT_SA_DIR .. "/token", "rb")
            if f then
                f:close()
                assert.are.equal(kc.DEFAULT_SA_DIR .. "/token",
                    kc.in_cluster(env("10.0.0.1", "443")).token_file)
            else
                local _, err = kc.in_cluster(env("10.0.0.1", "443"))
                assert.matches(kc.DEFAULT_SA_DIR .. "/token", err, 1, true)
            end
            assert.are.equal("https://10.0.0.1:443", kc.in_cluster({
                KUBERNETES_SERVICE_HOST = "10.0.0.1", KUBERNETES_SERVICE_PORT = "443" }, sa).server)
        end)
    end)

    describe("resolve", function()
        local sa, kcfg, kcfg2

        setup(function()
            sa = tmpdir()
            write(sa .. "/token", "tok")
            kcfg = tmpfile(KIND)
            kcfg2 = tmpfile(MULTI)
        end)

        local IN_CLUSTER = { KUBERNETES_SERVICE_HOST = "10.96.0.1", KUBERNETES_SERVICE_PORT = "443" }

        local function with(t, extra)
            local out = {}
            for k, v in pairs(t) do
                out[k] = v
            end
            for k, v in pairs(extra or {}) do
                out[k] = v
            end
            return out
        end

        it("uses the flags first", function()
            local conn = assert(kc.resolve({
                kube_api = "https://api.example:6443/", kube_token_file = "/t",
                kube_ca_file = "/ca", kube_insecure_skip_verify = true, kubeconfig = kcfg,
                kube_serviceaccount_dir = sa,
            }, env_of(with(IN_CLUSTER, { KUBECONFIG = kcfg2 }))))
            assert.are.same({ server = "https://api.example:6443", token_file = "/t",
                ca_file = "/ca", insecure = true, source = "flags" }, conn)
        end)

        it("takes kube_api alone (kubectl proxy) and strips exactly one trailing slash", function()
            assert.are.same({ server = "http://127.0.0.1:8001", insecure = false, source = "flags" },
                kc.resolve({ kube_api = "http://127.0.0.1:8001/" }, env_of {}))
            assert.are.equal("http://h/", kc.resolve({ kube_api = "http://h//" }, env_of {}).server)
            assert.are.equal("https://h/prefix",
                kc.resolve({ kube_api = "HTTPS://h/prefix" }, env_of {}).server)
            local conn = kc.resolve({ kube_api = "http://h", kube_token_file = "",
                kube_ca_file = "" }, env_of {})
            assert.is_nil(conn.token_file)
            assert.is_nil(conn.ca_file)
            assert.is_nil(conn.token)
        end)

        it("rejects a kube_api without an http(s) scheme or host", function()
            for _, bad in ipairs({ "ftp://h", "127.0.0.1:8001", "h", "https://", "http:// h" }) do
                local conn, err = kc.resolve({ kube_api = bad }, env_of(IN_CLUSTER))
                assert.is_nil(conn, bad)
                assert.matches("^%-%-kube%-api: ", err)
            end
            local _, err = kc.resolve({ kube_api = "ftp://h" }, env_of {})
            assert.matches("must start with http:// or https://", err, 1, true)
        end)

        it("treats an empty kube_api as unset", function()
            assert.are.equal("in-cluster", kc.resolve({ kube_api = "", kube_serviceaccount_dir = sa },
                env_of(IN_CLUSTER)).source)
        end)

        it("uses in-cluster before any kubeconfig", function()
            local conn = assert(kc.resolve({ kubeconfig = kcfg, kube_serviceaccount_dir = sa },
                env_of(with(IN_CLUSTER, { KUBECONFIG = kcfg2 }))))
            assert.are.same({ server = "https://10.96.0.1:443", ca_file = sa .. "/ca.crt",
                token_file = sa .. "/token", source = "in-cluster" }, conn)
        end)

        it("uses --kubeconfig before $KUBECONFIG", function()
            local conn = assert(kc.resolve({ kubeconfig = kcfg }, env_of { KUBECONFIG = kcfg2 }))
            assert.are.equal("kind-kind", conn.context)
            assert.are.equal("kubeconfig", conn.source)
        end)

        it("uses $KUBECONFIG (a ':' list) last", function()
            local conn = assert(kc.resolve({}, env_of { KUBECONFIG = kcfg2 .. ":" .. kcfg }))
            assert.are.equal("staging", conn.context)
            assert.are.equal("abc#def:ghi", conn.token)
            conn = assert(kc.resolve({ kube_context = "kind-kind" },
                env_of { KUBECONFIG = kcfg2 .. ":" .. kcfg }))
            assert.are.equal("https://127.0.0.1:35617", conn.server)
        end)

        it("falls through to the kubeconfig when the pod has no token", function()
            local conn = assert(kc.resolve({ kubeconfig = kcfg,
                kube_serviceaccount_dir = sa .. "/none" }, env_of(IN_CLUSTER)))
            assert.are.equal("kubeconfig", conn.source)
        end)

        it("names a missing kubeconfig", function()
            local conn, err = kc.resolve({ kubeconfig = "/nonexistent/kube.yaml" }, env_of {})
            assert.is_nil(conn)
            assert.matches("/nonexistent/kube.yaml", err, 1, true)
            conn, err = kc.resolve({}, env_of { KUBECONFIG = "/nonexistent/a:/nonexistent/b" })
            assert.is_nil(conn)
            assert.matches("/nonexistent/a, /nonexistent/b", err, 1, true)
        end)

        it("passes kubeconfig errors through", function()
            local gke = tmpfile(GKE)
            local conn, err = kc.resolve({ kubeconfig = gke }, env_of {})
            assert.is_nil(conn)
            assert.matches("kubectl proxy", err, 1, true)
        end)

        it("explains what it tried when nothing is configured", function()
            local conn, err = kc.resolve({}, env_of {})
            assert.is_nil(conn)
            assert.are.equal(
                "no Kubernetes API configured (tried --kube-api, in-cluster service account, kubeconfig)",
                err)
            conn, err = kc.resolve(nil, env_of { KUBECONFIG = "" })
            assert.is_nil(conn)
            assert.are.equal(kc.NO_CONFIG_ERROR, err)
            conn, err = kc.resolve({ kube_serviceaccount_dir = sa .. "/none" }, env_of(IN_CLUSTER))
            assert.is_nil(conn)
            assert.matches("^no Kubernetes API configured %(tried .*%); in%-cluster: .*/none/token", err)
        end)

        it("returns only http(s) servers, never token and token_file together", function()
            local cases = {
                { { kube_api = "http://h", kube_token_file = "/t" }, {} },
                { { kube_serviceaccount_dir = sa }, IN_CLUSTER },
                { { kubeconfig = kcfg }, {} },
                { { kube_context = "prod" }, { KUBECONFIG = kcfg2 } },
                { { kube_context = "staging" }, { KUBECONFIG = kcfg2 } },
            }
            for _, case in ipairs(cases) do
                local conn = assert(kc.resolve(case[1], env_of(case[2])))
                assert.matches("^https?://", conn.server)
                assert.is_false(conn.token ~= nil and conn.token_file ~= nil)
            end
        end)
    end)
end)
