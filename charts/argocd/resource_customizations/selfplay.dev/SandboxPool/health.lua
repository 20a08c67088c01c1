-- Argo CD health of a selfplay.dev SandboxPool, from status.conditions and
-- status.observedGeneration: Healthy while it has Ready sandboxes to hand out, Progressing
-- while it warms up or rolls to a new template, Degraded when sandboxes fail or the spec is
-- invalid. Sandboxes are use-and-destroy, so routine scaling (Progressing=True, reason
-- Scaling) keeps a usable pool Healthy.
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

local degraded = condition(status, "Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = describe(degraded, "The pool is degraded")
  return hs
end

local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
if is_true(ready) then
  if is_true(progressing) and progressing.reason == "Rolling" then
    hs.status = "Progressing"
    hs.message = describe(progressing, "Rolling to a new template")
    return hs
  end
  hs.status = "Healthy"
  hs.message = describe(ready, "Sandboxes are Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Waiting for Ready sandboxes")
return hs
