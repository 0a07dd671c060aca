-- sp.lint: warnings `--check` prints about scripts (never errors):
--   * loops that end only by break/return (`while true do`, `repeat ... until false`,
--     `for i = 1, math.huge`): script_time_budget is enforced when a hook yields and at
--     runtime API calls, and by a count hook in the interpreter, but LuaJIT does not run hooks
--     inside compiled (JIT) code, so a hot loop like these can run past the budget. Make sure
--     such a loop yields (timer.sleep, req:read_body, k8s.request) or has a bound; then say so
--     on its line with a comment holding `sp.lint: ok` and why (the warning is left out).
--   * accidental globals are caught at run time by strict globals, not here.
local M = {}

local PATTERNS = {
    { "while%s+true%s+do", "`while true do`" },
    { "until%s+false", "`repeat ... until false`" },
    { "until%s+nil", "`repeat ... until nil`" },
    { "math%.huge%s+do", "a loop up to math.huge" },
}

-- Returns warnings ("file:line: text") for one file's source.
function M.scan_source(name, text)
    local out = {}
    local n = 0
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        n = n + 1
        local code = line:gsub("%-%-.*$", "") -- drop comments (roughly)
        if line:find("%-%-.*sp%.lint: ok") then
            code = "" -- the author says why this loop ends
        end
        for _, p in ipairs(PATTERNS) do
            if code:find(p[1]) then
                out[#out + 1] = ("%s:%d: %s ends only by break or return: script_time_budget "
                    .. "cannot stop it once the JIT compiles it; make it yield or bound it")
                    :format(name, n, p[2])
            end
        end
    end
    return out
end

-- Scans every .lua file of the given directories (not recursive).
function M.scan_dirs(dirs)
    local out = {}
    for _, dir in ipairs(dirs) do
        local p = io.popen('ls -1 "' .. dir:gsub('"', '\\"') .. '" 2>/dev/null')
        if p then
            for file in p:lines() do
                if file:match("%.lua$") then
                    local f = io.open(dir .. "/" .. file)
                    if f then
                        local text = f:read("*a")
                        f:close()
                        for _, w in ipairs(M.scan_source(dir .. "/" .. file, text)) do
                            out[#out + 1] = w
                        end
                    end
                end
            end
            p:close()
        end
    end
    return out
end

return M
