-- Argo CD health of a selfplay.dev Checkpoint, from status.conditions and
-- status.observedGeneration: Healthy once Ready (complete on storage), Progressing until
-- then, Degraded when the operator marks it Degraded.
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
  hs.message = "Waiting for the checkpoint to become Ready"
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

local degraded = condition(status, "Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = describe(degraded, "The checkpoint is degraded")
  return hs
end

local ready = condition(status, "Ready")
if is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "The checkpoint is Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the checkpoint to become Ready")
return hs
