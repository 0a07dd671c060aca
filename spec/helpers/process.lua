-- Child-process helpers for specs: spawn real programs (the proxy binary,
-- Python fixture servers, ...), signal them, wait for them with timeouts, and
-- make sure nothing outlives the test run.
--
--   local process = require "spec.helpers.process"
--   local p = assert(process.spawn{ cmd = { "python3", "-u", "server.py" },
--                                   env = { PORT = "8080", HOME = false },
--                                   stdout = dir .. "/out.log",
--                                   stderr = dir .. "/err.log" })
--   ...
--   p:stop()                      -- TERM, wait, KILL if needed
--
-- IMPORTANT: every spec file that spawns processes should call
-- `process.stop_all()` in its `teardown` (or `after_each`). A best-effort
-- safety net also SIGKILLs still-registered children when the Lua state is
-- closed and, where LuaJIT's FFI is available, children get
-- PR_SET_PDEATHSIG=SIGKILL so they die if the test runner dies.
--
-- Error convention: functions return nil, "message" on failure; programming
-- errors (bad arguments) raise.

local unistd = require "posix.unistd"
local pwait = require "posix.sys.wait"
local psignal = require "posix.signal"
local fcntl = require "posix.fcntl"
local stdlib = require "posix.stdlib"
local dirent = require "posix.dirent"
local pstat = require "posix.sys.stat"
local socket = require "socket"
local bit = require "bit"

local now = socket.gettime
local sformat = string.format
local tconcat = table.concat

local M = {}

-- Optional FFI bits (reset signal mask, die with parent). Everything about
-- them is best effort: when unavailable, spawning still works.
local ffi_ok, ffi = pcall(require, "ffi")
local C
if ffi_ok then
    local ok = pcall(ffi.cdef, [[
        int prctl(int option, unsigned long arg2, unsigned long arg3,
                  unsigned long arg4, unsigned long arg5);
        typedef struct { unsigned long val[1024 / (8 * sizeof(unsigned long))]; } sbx_sigset_t;
        int sigemptyset(sbx_sigset_t *set);
        int sigprocmask(int how, const sbx_sigset_t *set, sbx_sigset_t *oldset);
    ]])
    if ok then C = ffi.C end
end
local PR_SET_PDEATHSIG = 1
local SIG_SETMASK = 2

local SIGNALS = {
    HUP = psignal.SIGHUP, INT = psignal.SIGINT, QUIT = psignal.SIGQUIT,
    KILL = psignal.SIGKILL, TERM = psignal.SIGTERM, USR1 = psignal.SIGUSR1,
    USR2 = psignal.SIGUSR2, PIPE = psignal.SIGPIPE, ALRM = psignal.SIGALRM,
    CHLD = psignal.SIGCHLD, CONT = psignal.SIGCONT, STOP = psignal.SIGSTOP,
}
M.SIGNALS = SIGNALS

-- Signals whose disposition is reset to default in the child. Ignored
-- dispositions survive exec (LuaSocket sets SIGPIPE to SIG_IGN, for example).
local RESET_SIGNALS = { "PIPE", "INT", "TERM", "HUP", "QUIT", "CHLD", "USR1", "USR2", "ALRM" }

local function signum(sig)
    if type(sig) == "number" then return sig end
    if type(sig) ~= "string" then error("signal name or number expected, got " .. tostring(sig), 3) end
    local name = sig:upper():gsub("^SIG", "")
    local n = SIGNALS[name] or psignal["SIG" .. name]
    if not n then error("unknown signal: " .. sig, 3) end
    return n
end
M.signum = function(sig) return signum(sig) end

-- Registry of processes that have been spawned and not yet reaped.
local live = {}

local Process = {}
Process.__index = Process

local function open_out(path)
    local fd, err = fcntl.open(path, bit.bor(fcntl.O_WRONLY, fcntl.O_CREAT, fcntl.O_TRUNC, fcntl.O_APPEND),
                               tonumber("644", 8))
    if not fd then return nil, sformat("cannot open %s: %s", path, tostring(err)) end
    return fd
end

local function list_fds()
    local fds = {}
    local ok, names = pcall(dirent.dir, "/proc/self/fd")
    if ok and type(names) == "table" then
        for _, name in ipairs(names) do
            local n = tonumber(name)
            if n then fds[#fds + 1] = n end
        end
    else
        for n = 3, 1023 do fds[#fds + 1] = n end
    end
    return fds
end

-- Runs in the forked child. Never returns.
local function child_main(opts, argv, fds, errw)
    local ok, err = pcall(function()
        if C then
            if opts.die_with_parent ~= false then
                C.prctl(PR_SET_PDEATHSIG, psignal.SIGKILL, 0, 0, 0)
            end
            local set = ffi.new("sbx_sigset_t")
            C.sigemptyset(set)
            C.sigprocmask(SIG_SETMASK, set, nil)
        end
        for _, name in ipairs(RESET_SIGNALS) do
            psignal.signal(SIGNALS[name], psignal.SIG_DFL)
        end
        if opts.group ~= false then
            unistd.setpid("p", 0, 0)
        end
        if fds.stdin then assert(unistd.dup2(fds.stdin, 0)) end
        if fds.stdout then assert(unistd.dup2(fds.stdout, 1)) end
        if fds.stderr then assert(unistd.dup2(fds.stderr, 2)) end
        for _, fd in ipairs(list_fds()) do
            if fd > 2 and fd ~= errw then unistd.close(fd) end
        end
        if opts.env then
            for k, v in pairs(opts.env) do
                if v == false then
                    stdlib.setenv(k, nil)
                else
                    stdlib.setenv(k, tostring(v), true)
                end
            end
        end
        if opts.cwd then
            local okc, cerr = unistd.chdir(opts.cwd)
            if not okc then error("chdir " .. opts.cwd .. ": " .. tostring(cerr), 0) end
        end
        local _, eerr = unistd.execp(argv[0], argv)
        error("exec failed: " .. tostring(eerr), 0)
    end)
    if not ok then
        local msg = tostring(err)
        unistd.write(errw, msg)
    end
    unistd._exit(127)
end

--- Spawn a process.
-- opts.cmd: { "/path/or/name", "arg", ... } (searched in PATH) or a string
--           (run with /bin/sh -c).
-- opts.env: map added to the inherited environment; value `false` removes.
-- opts.stdout / opts.stderr: file path (truncated, opened O_APPEND) or nil to
--           inherit. The same path may be given for both.
-- opts.stdin: file path to read from (default /dev/null).
-- opts.cwd: working directory for the child.
-- opts.group (default true): run the child in its own process group, so
--           stop()/stop_all() can also kill its descendants.
-- opts.die_with_parent (default true): PR_SET_PDEATHSIG=SIGKILL (needs FFI).
-- Returns a process object, or nil, "message" (e.g. exec failure).
function M.spawn(opts)
    assert(type(opts) == "table", "process.spawn: options table expected")
    local cmd = opts.cmd
    if type(cmd) == "string" then cmd = { "/bin/sh", "-c", cmd } end
    assert(type(cmd) == "table" and type(cmd[1]) == "string", "process.spawn: cmd must be a non-empty list")
    local argv = { [0] = cmd[1] }
    for i = 2, #cmd do argv[i - 1] = tostring(cmd[i]) end

    local fds, to_close = {}, {}
    local function cleanup()
        for _, fd in ipairs(to_close) do unistd.close(fd) end
    end
    local err
    fds.stdin, err = fcntl.open(opts.stdin or "/dev/null", fcntl.O_RDONLY)
    if not fds.stdin then return nil, sformat("cannot open stdin %s: %s", opts.stdin or "/dev/null", tostring(err)) end
    to_close[#to_close + 1] = fds.stdin
    if opts.stdout then
        fds.stdout, err = open_out(opts.stdout)
        if not fds.stdout then cleanup(); return nil, err end
        to_close[#to_close + 1] = fds.stdout
    end
    if opts.stderr then
        if opts.stderr == opts.stdout then
            fds.stderr = fds.stdout
        else
            fds.stderr, err = open_out(opts.stderr)
            if not fds.stderr then cleanup(); return nil, err end
            to_close[#to_close + 1] = fds.stderr
        end
    end

    -- Exec-status pipe: the write end is close-on-exec, so EOF without data
    -- means exec succeeded.
    local errr, errw = unistd.pipe()
    if not errr then cleanup(); return nil, "pipe: " .. tostring(errw) end
    fcntl.fcntl(errw, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    fcntl.fcntl(errr, fcntl.F_SETFD, fcntl.FD_CLOEXEC)

    io.stdout:flush()
    io.stderr:flush()
    local pid, ferr = unistd.fork()
    if pid == nil then
        unistd.close(errr); unistd.close(errw); cleanup()
        return nil, "fork: " .. tostring(ferr)
    end
    if pid == 0 then
        child_main(opts, argv, fds, errw) -- does not return
        unistd._exit(127)
    end

    unistd.close(errw)
    cleanup()
    if opts.group ~= false then
        pcall(unistd.setpid, "p", pid, pid) -- avoid racing the child; may fail harmlessly
    end
    local parts = {}
    while true do
        local data = unistd.read(errr, 4096)
        if not data or data == "" then break end
        parts[#parts + 1] = data
    end
    unistd.close(errr)

    local p = setmetatable({
        _pid = pid,
        cmd = cmd,
        group = opts.group ~= false,
        stdout_path = opts.stdout,
        stderr_path = opts.stderr,
        started_at = now(),
    }, Process)
    if #parts > 0 then
        -- exec failed; reap the child.
        p:wait(5)
        return nil, tconcat(parts)
    end
    live[pid] = p
    return p
end

function Process:pid()
    return self._pid
end

-- Try to reap without blocking. Returns true when the process is gone.
function Process:_reap()
    if self.how then return true end
    local pid, how, code = pwait.wait(self._pid, pwait.WNOHANG)
    if pid == self._pid then
        self.how, self.value = how, code
        if how == "exited" then
            self.code = code
        elseif how == "killed" then
            self.code = 128 + code
        else
            self.code = -1
        end
        self.ended_at = now()
        live[self._pid] = nil
        return true
    elseif pid == nil then
        -- ECHILD: somebody else reaped it (or it was never ours).
        self.how, self.value, self.code = "unknown", nil, -1
        live[self._pid] = nil
        return true
    end
    return false
end

--- true while the process has not exited (non-blocking).
function Process:alive()
    return not self:_reap()
end

--- Exit status of a finished process: code, how, value (see wait), or nil.
function Process:status()
    if self:_reap() then return self.code, self.how, self.value end
    return nil
end

--- Send a signal ("TERM", "SIGKILL", 9, ...). With group=true, signal the
-- whole process group (only for processes spawned with group=true).
-- Returns true or nil, "message".
function Process:signal(sig, group)
    local n = signum(sig)
    if self.how then return nil, "process already exited" end
    self.signalled = self.signalled or {}
    self.signalled[#self.signalled + 1] = n
    local target = (group and self.group) and -self._pid or self._pid
    local ok, err = psignal.kill(target, n)
    if not ok then return nil, tostring(err) end
    return true
end

--- Wait for the process to exit.
-- timeout_s: default 10. Returns code, how, value where
--   how == "exited": code = value = exit status
--   how == "killed": value = signal number, code = 128 + signal
-- or nil, "timeout".
function Process:wait(timeout_s)
    local deadline = now() + (timeout_s or 10)
    local interval = 0.001
    while true do
        if self:_reap() then return self.code, self.how, self.value end
        local remaining = deadline - now()
        if remaining <= 0 then return nil, "timeout" end
        socket.sleep(math.min(interval, remaining))
        interval = math.min(interval * 2, 0.02)
    end
end

--- Graceful stop: SIGTERM, wait up to timeout_s (default 5), then SIGKILL
-- (to the whole group when spawned with group=true). After the process is
-- gone, leftover members of its process group are SIGKILLed.
-- Returns code, how, value like wait(); a 4th value true means SIGKILL was
-- needed.
function Process:stop(timeout_s)
    local forced = false
    if not self:_reap() then
        psignal.kill(self._pid, psignal.SIGTERM)
        if not self:wait(timeout_s or 5) then
            forced = true
            psignal.kill(self.group and -self._pid or self._pid, psignal.SIGKILL)
            psignal.kill(self._pid, psignal.SIGKILL)
            self:wait(5)
        end
    end
    if self.group then psignal.kill(-self._pid, psignal.SIGKILL) end
    return self.code, self.how, self.value, forced
end

--- Kill immediately with SIGKILL and reap.
function Process:kill()
    if not self:_reap() then
        psignal.kill(self.group and -self._pid or self._pid, psignal.SIGKILL)
        psignal.kill(self._pid, psignal.SIGKILL)
        self:wait(5)
    end
    return self.code, self.how, self.value
end

function Process:read_stdout()
    if not self.stdout_path then return nil, "stdout was not redirected to a file" end
    return M.read_file(self.stdout_path)
end

function Process:read_stderr()
    if not self.stderr_path then return nil, "stderr was not redirected to a file" end
    return M.read_file(self.stderr_path)
end

--- Wait until the captured output matches a Lua pattern.
-- which: "stdout" (default), "stderr" or "both". plain: find as plain text.
-- Returns the matched text (or true), or nil, "message" on timeout / exit.
function Process:wait_output(pattern, timeout_s, which, plain)
    which = which or "stdout"
    local deadline = now() + (timeout_s or 10)
    local last = ""
    while true do
        local text = ""
        if which == "stdout" or which == "both" then text = text .. (self:read_stdout() or "") end
        if which == "stderr" or which == "both" then text = text .. (self:read_stderr() or "") end
        last = text
        local s, e = text:find(pattern, 1, plain)
        if s then return text:sub(s, e) end
        if not self:alive() then
            -- one last look, output may have been flushed at exit
            return nil, sformat("process exited (%s %s) before output matched %q; output: %s",
                                tostring(self.how), tostring(self.value), pattern, last:sub(-2000))
        end
        if now() >= deadline then
            return nil, sformat("timeout waiting for output %q; output so far: %s", pattern, last:sub(-2000))
        end
        socket.sleep(0.01)
    end
end

--- Stop every spawned, still-running process (TERM to all, then a shared
-- wait of timeout_s, default 3, then KILL). Call it in teardown/after_each.
function M.stop_all(timeout_s)
    local procs = {}
    for _, p in pairs(live) do procs[#procs + 1] = p end
    for _, p in ipairs(procs) do
        if not p:_reap() then psignal.kill(p._pid, psignal.SIGTERM) end
    end
    local deadline = now() + (timeout_s or 3)
    for _, p in ipairs(procs) do
        p:wait(math.max(0, deadline - now()))
    end
    for _, p in ipairs(procs) do
        p:stop(0) -- KILLs anything left, and stray group members
    end
end

--- List of live (not yet reaped) process objects.
function M.running()
    local procs = {}
    for _, p in pairs(live) do
        if p:alive() then procs[#procs + 1] = p end
    end
    return procs
end

-- Safety net: when the Lua state is closed, SIGKILL whatever is left.
M._sentinel = newproxy(true)
getmetatable(M._sentinel).__gc = function()
    for pid, p in pairs(live) do
        pcall(psignal.kill, p.group and -pid or pid, psignal.SIGKILL)
        pcall(psignal.kill, pid, psignal.SIGKILL)
    end
end

---------------------------------------------------------------------------
-- Files and directories
---------------------------------------------------------------------------

--- Create a fresh temporary directory (mkdtemp). Returns its path or nil, err.
function M.tmpdir(prefix)
    local base = os.getenv("TMPDIR")
    if not base or base == "" then base = "/tmp" end
    local path, err = stdlib.mkdtemp(sformat("%s/%s-XXXXXX", base, prefix or "sbxproxy-spec"))
    if not path then return nil, "mkdtemp: " .. tostring(err) end
    return path
end

--- Recursively remove a file or directory (does not follow symlinks).
-- Refuses "/" and relative paths. Returns true or nil, err.
function M.rm_rf(path)
    if type(path) ~= "string" or path == "" or path == "/" or path:sub(1, 1) ~= "/" then
        return nil, "rm_rf: refusing to remove " .. tostring(path)
    end
    local st = pstat.lstat(path)
    if not st then return true end
    if pstat.S_ISDIR(st.st_mode) ~= 0 then
        local names = dirent.dir(path) or {}
        for _, name in ipairs(names) do
            if name ~= "." and name ~= ".." then
                local ok, err = M.rm_rf(path .. "/" .. name)
                if not ok then return nil, err end
            end
        end
        local ok, err = unistd.rmdir(path)
        if not ok then return nil, "rmdir " .. path .. ": " .. tostring(err) end
    else
        local ok, err = unistd.unlink(path)
        if not ok then return nil, "unlink " .. path .. ": " .. tostring(err) end
    end
    return true
end

--- Write a whole file (binary). Returns true or nil, err.
function M.write_file(path, s)
    local f, err = io.open(path, "wb")
    if not f then return nil, err end
    local ok, werr = f:write(s)
    f:close()
    if not ok then return nil, werr end
    return true
end

--- Read a whole file (binary). Returns its content or nil, err.
function M.read_file(path)
    local f, err = io.open(path, "rb")
    if not f then return nil, err end
    local s = f:read("*a")
    f:close()
    return s
end

--- Sleep for s seconds (fractions allowed).
function M.sleep(s)
    socket.sleep(s)
end

return M
