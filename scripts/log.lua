-- log.lua: the old name of access_log.lua (before 0.2), kept so that an init.lua written for
-- 0.1 (`require "log"`) still starts. Require "access_log" instead; this shim will go.
local core = require "sp.core"
if core.worker_id() <= 0 then
    require("sp.log").warn("scripts: require \"log\" loads the access log by its old name; "
        .. "require \"access_log\" (log.lua will stop being loaded)")
end
return require "access_log"
