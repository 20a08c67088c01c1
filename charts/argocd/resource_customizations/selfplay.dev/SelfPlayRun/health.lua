-- Argo CD health of a selfplay.dev SelfPlayRun, from status.phase, status.conditions and
-- status.observedGeneration. A run trains like a Job runs: Progressing while it trains,
-- Healthy once Succeeded, Degraded when Failed or Degraded, Suspended with spec.suspend.
-- Works with Argo CD's Lua (5.1) and Lua 5.4; the tests run it with lua5.4.
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

-- The condition's message, else its reason, else the fallback.
local function describe(c, fallback)
  if c ~= nil then
    if c.message ~= nil and c.message ~= "" then
      return c.message
    end
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason
    end
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil then
  local observed = status.observedGeneration
  if observed == nil or observed < generation then
    hs.status = "Progressing"
    hs.message = string.format("Waiting for the operator to observe generation %d", generation)
    return hs
  end
end

local phase = status.phase

local failed = condition(status, "Failed")
if is_true(failed) or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(failed, "The run failed")
  return hs
end

local succeeded = condition(status, "Succeeded")
if is_true(succeeded) or phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(succeeded, "The run succeeded")
  return hs
end

local suspended = condition(status, "Suspended")
if is_true(suspended) or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(suspended, "The run is suspended")
  return hs
end

local degraded = condition(status, "Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = describe(degraded, "The run is degraded")
  return hs
end

local progressing = condition(status, "Progressing")
hs.status = "Progressing"
if phase == "Running" and status.progress ~= nil and status.progress.step ~= nil then
  hs.message = string.format("Running at step %d: %s", status.progress.step, describe(progressing, "training"))
elseif phase ~= nil then
  hs.message = string.format("%s: %s", phase, describe(progressing, "waiting for the trainer"))
else
  hs.message = describe(progressing, "Waiting for the trainer")
end
return hs
