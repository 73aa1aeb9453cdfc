--[[
hpresilience job_submit.lua: Slurm's JobSubmitPlugins=lua hook for `srun --auto-resume`.

Install it beside slurm.conf as job_submit.lua and set `JobSubmitPlugins=lua` (see
docs/job-submit.md). For a batch job whose script runs `srun --auto-resume` (bare, =1 or
any N > 0; not =0):

  - requeue is turned on (job_desc.requeue = 1): auto-resume's requeue path needs it;
  - the job must be exclusive (`--exclusive`, or a partition with OverSubscribe=EXCLUSIVE),
    otherwise it is rejected with a message saying how to fix it;
  - `hpr-auto-resume` is added to the job's Comment (the user's comment is kept), so tools
    can tell these jobs apart.

Every other job (no auto-resume, `--auto-resume=0`, only in a comment, salloc and srun
jobs, which have no script) passes unchanged. An unexpected error inside this script lets
the job through unchanged and is logged to slurmctld's log: a bug here must never stop
a cluster from taking jobs (the runtime checks of `hpresilience _srun` still apply).

Lua 5.1 (what Debian's job_submit_lua links). Tested with Slurm 22.05.
]]

local MARK = "hpr-auto-resume"
local PREFIX = "hpresilience: "

-- Slurm's values; slurm.* where the plugin exports them.
local JOB_SHARED_NONE = slurm.JOB_SHARED_NONE or 0   -- sbatch --exclusive
local SHARED_FORCE = slurm.SHARED_FORCE or 0x8000    -- partition OverSubscribe=FORCE bit of max_share
-- job_desc.shared (22.05): 0 --exclusive, 1 --oversubscribe, 2 --exclusive=user, 3 --exclusive=mcs,
-- NO_VAL16 (65534) none of them; a partition's max_share: 0 OverSubscribe=EXCLUSIVE, 1 NO,
-- N YES:N, 0x8000 + N FORCE:N. Measured: docs/job-submit.md.

-- srun's command line, as hpresilience/autoresume/srun_args.py reads it (keep the two in
-- step): only what stands before the program belongs to srun (`srun -N2 train.sh
-- --auto-resume` passes the flag to train.sh), so options taking a value must be known.
local SHORT_WITH_VALUE = {}
for c in ("AbcdDeiJLMmnNopqrSTtWCwxGBFz"):gmatch(".") do SHORT_WITH_VALUE[c] = true end
local LONG_WITH_VALUE = {}
for name in ([[
    account acctg-freq bb bbf bcast bcast-exclude begin cpus-per-task comment
    cpu-freq dependency deadline delay-boot chdir export error epilog gres
    gres-flags input jobid job-name licenses clusters distribution mail-type
    mail-user mcs-label mpi ntasks ntasks-per-node nodes output het-group partition
    power priority prolog profile qos relative core-spec slurmd-debug switches
    task-epilog task-prolog thread-spec threads time time-min wait wckey
    cluster-constraint constraint mem mincpus reservation tmp nodelist exclude
    mem-per-cpu sockets-per-node cores-per-socket threads-per-core ntasks-per-core
    ntasks-per-socket ntasks-per-gpu cpus-per-gpu gpus gpu-bind gpu-freq gpus-per-node
    gpus-per-socket gpus-per-task mem-per-gpu cpu-bind mem-bind hint extra-node-info
    nodefile uid gid network accel-bind kill-on-bad-exit signal container
    tres-per-task tres-bind extra resv-ports
]]):gmatch("%S+") do LONG_WITH_VALUE[name] = true end

-- Characters that end a word and start a new command (a separator token).
local SEPARATOR = { [";"] = true, ["&"] = true, ["|"] = true, ["("] = true, [")"] = true,
                    ["`"] = true, ["\n"] = true }
local SEP = {}  -- the separator token

-- The script as shell words, with quotes removed, `\`-newline joined, comments
-- (`#` at the start of a word) dropped, and SEP between commands. Enough of sh to
-- find srun's arguments; not a shell (no expansions, no here-documents).
local function shell_words(script)
    local words, cur, in_word = {}, {}, false
    local i, n = 1, #script
    local function flush()
        if in_word then words[#words + 1] = table.concat(cur) end
        cur, in_word = {}, false
    end
    while i <= n do
        local j = script:find("[%s\\'\"#;&|()`]", i)
        if j == nil then
            cur[#cur + 1] = script:sub(i)
            in_word = true
            break
        end
        if j > i then
            cur[#cur + 1] = script:sub(i, j - 1)
            in_word = true
        end
        local c = script:sub(j, j)
        if c == "\\" then
            local d = script:sub(j + 1, j + 1)
            if d ~= "\n" then
                cur[#cur + 1] = d
                in_word = true
            end
            i = j + 2
        elseif c == "'" then
            local k = script:find("'", j + 1, true) or n + 1
            cur[#cur + 1] = script:sub(j + 1, k - 1)
            in_word = true
            i = k + 1
        elseif c == '"' then
            local k = j + 1
            while k <= n do
                local d = script:sub(k, k)
                if d == "\\" then k = k + 2 elseif d == '"' then break else k = k + 1 end
            end
            cur[#cur + 1] = script:sub(j + 1, k - 1)
            in_word = true
            i = k + 1
        elseif c == "#" and in_word then  -- a#b is one word
            cur[#cur + 1] = c
            i = j + 1
        elseif c == "#" then  -- a comment, to the end of the line (the newline stays)
            i = script:find("\n", j, true) or n + 1
        elseif SEPARATOR[c] then
            flush()
            words[#words + 1] = SEP
            i = j + 1
        else  -- blank
            flush()
            i = j + 1
        end
    end
    flush()
    return words
end

-- The --auto-resume of the srun command whose arguments start at words[k]:
-- nil (not given), the value text ("" when bare: on), stops at the program.
local function auto_resume_of(words, k)
    local found = nil
    while k <= #words do
        local arg = words[k]
        if arg == SEP or arg == "--" or arg:sub(1, 1) ~= "-" or arg == "-" then
            break
        end
        if arg:sub(1, 2) == "--" then
            local name, value = arg:match("^([^=]*)=(.*)$")
            name = name or arg
            if name == "--auto-resume" then
                found = value or ""
            elseif value == nil and LONG_WITH_VALUE[name:sub(3)] then
                k = k + 1
            end
        elseif SHORT_WITH_VALUE[arg:sub(2, 2)] and #arg == 2 then
            k = k + 1
        end
        k = k + 1
    end
    return found
end

-- What the script asks for: "on", "off" (only --auto-resume=0, or none at all), or
-- "bad", with the offending value.
local function auto_resume_in(script)
    if type(script) ~= "string" or not script:find("--auto-resume", 1, true) then
        return "off"
    end
    local words = shell_words(script)
    local result = "off"
    for k = 1, #words do
        local w = words[k]
        if w ~= SEP and (w == "srun" or w:sub(-5) == "/srun") then
            local value = auto_resume_of(words, k + 1)
            if value ~= nil then
                if value == "" or (value:match("^%d+$") and tonumber(value) > 0) then
                    result = "on"
                elseif not value:match("^%d+$") then
                    return "bad", value
                end
            end
        end
    end
    return result
end

-- The partitions the job may run in: those it names, else the default one.
local function job_partitions(job_desc, part_list)
    local wanted = {}
    if type(job_desc.partition) == "string" and job_desc.partition ~= "" then
        for name in job_desc.partition:gmatch("[^,%s]+") do wanted[name] = true end
    end
    local parts = {}
    for key, part in pairs(part_list or {}) do
        local name = part.name or key
        local flags = tonumber(part.flags) or 0
        if (next(wanted) and wanted[name]) or (not next(wanted) and flags % 2 == 1) then  -- PART_FLAG_DEFAULT = bit 0
            parts[#parts + 1] = { name = name, max_share = tonumber(part.max_share) }
        end
    end
    return parts
end

-- nil when the job gets whole nodes, else why not and how to fix it.
local function not_exclusive(job_desc, part_list)
    local parts = job_partitions(job_desc, part_list)
    local all_exclusive = #parts > 0
    for _, p in ipairs(parts) do
        if p.max_share and p.max_share >= SHARED_FORCE then
            return "partition " .. p.name .. " has OverSubscribe=FORCE, where jobs share nodes even with "
                .. "--exclusive: submit to a partition without it (`#SBATCH --partition=...`)"
        end
        if p.max_share ~= 0 then all_exclusive = false end  -- 0: OverSubscribe=EXCLUSIVE
    end
    if all_exclusive or job_desc.shared == JOB_SHARED_NONE then
        return nil
    end
    local asked = ""
    if job_desc.shared == 1 then
        asked = " (it asks for --oversubscribe)"
    elseif job_desc.shared == 2 then
        asked = " (--exclusive=user still shares nodes with your other jobs)"
    elseif job_desc.shared == 3 then
        asked = " (--exclusive=mcs still shares nodes with jobs of the same MCS label)"
    end
    return "srun --auto-resume needs the job's nodes to itself" .. asked .. ": add `#SBATCH --exclusive` "
        .. "to the script (or submit with `sbatch --exclusive`)"
end

local function submit(job_desc, part_list, submit_uid)
    if job_desc.script == nil then  -- salloc, srun: no batch script
        return slurm.SUCCESS
    end
    local wanted, value = auto_resume_in(job_desc.script)
    if wanted == "bad" then
        slurm.log_user("%ssrun --auto-resume=%s: expected --auto-resume, --auto-resume=1 or --auto-resume=0",
                       PREFIX, value)
        return slurm.ERROR
    end
    if wanted ~= "on" then
        return slurm.SUCCESS
    end
    local why = not_exclusive(job_desc, part_list)
    if why then
        slurm.log_info("job_submit.lua: rejected a job of uid %s (%s): srun --auto-resume, not exclusive",
                       tostring(submit_uid), tostring(job_desc.name))
        slurm.log_user("%s%s", PREFIX, why)
        return slurm.ERROR
    end
    if job_desc.requeue == 0 then
        slurm.log_user("%ssrun --auto-resume: requeue turned on (the job asked for --no-requeue)", PREFIX)
    end
    job_desc.requeue = 1
    local comment = job_desc.comment
    if type(comment) ~= "string" or comment == "" then
        job_desc.comment = MARK
    elseif not comment:find(MARK, 1, true) then
        job_desc.comment = comment .. " " .. MARK
    end
    return slurm.SUCCESS
end

function slurm_job_submit(job_desc, part_list, submit_uid)
    local ok, result = pcall(submit, job_desc, part_list, submit_uid)
    if ok then
        return result
    end
    slurm.log_error("job_submit.lua (hpresilience): %s; job passed unchanged", tostring(result))
    return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return slurm.SUCCESS
end

