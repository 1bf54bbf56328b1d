"""The Lua scripts. Each touches only one user's keys (one hash tag), so each is atomic on a
single server and on a Redis Cluster alike. Lua 5.1 as embedded in Redis 6.2+.

Invariants every script keeps, per user:
  * members of ``events`` <-> ids in ``eids`` (the same set of event ids), at most ``cap`` of them;
  * every field of ``vec`` is an id in ``eids`` (vectors of trimmed events are deleted with them).
"""
from __future__ import annotations

# KEYS: events, eids, vec, meta
# ARGV: cap, fingerprint, eid_1, member_1, blob_1, eid_2, member_2, blob_2, ...
# A non-empty blob is the event's memory vector, stored (with ``fingerprint`` in meta) only when
# the event is new and still in the window at the end: a vector that depends on the event alone
# (an item element), never one that depends on the window around it.
# Returns {added, duplicates, trimmed, invalidated, too_old, vectors stored}.
APPEND = r"""
local events, eids, vec, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap = tonumber(ARGV[1])

local function eid_of(member)
  return string.match(member, '\31([^\31]*)$')
end

-- delete ids from a set or hash in chunks (unpack has a C-stack limit)
local function remove(cmd, key, ids)
  local removed = 0
  for i = 1, #ids, 1000 do
    removed = removed + redis.call(cmd, key, unpack(ids, i, math.min(i + 999, #ids)))
  end
  return removed
end

-- 1. insert the events whose id is new; an id repeated in the batch counts as a duplicate
local added, dups = 0, 0
local new_members, new_blobs = {}, {}
for i = 3, #ARGV, 3 do
  if redis.call('SADD', eids, ARGV[i]) == 1 then
    redis.call('ZADD', events, 0, ARGV[i + 1])
    added = added + 1
    new_members[added] = ARGV[i + 1]
    if ARGV[i + 2] ~= '' then new_blobs[ARGV[i]] = ARGV[i + 2] end
  else
    dups = dups + 1
  end
end

-- 2. cap: drop the oldest members, their ids and their vectors. A dropped member that came in
--    with this batch is "too old" (older than the whole window: e.g. a retry of an event that was
--    trimmed long ago); the others are "trimmed".
local trimmed, too_old = 0, 0
local n = redis.call('ZCARD', events)
if n > cap then
  local is_new = {}
  for _, m in ipairs(new_members) do is_new[m] = true end
  local old = redis.call('ZRANGE', events, 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', events, 0, n - cap - 1)
  local ids = {}
  for i, m in ipairs(old) do
    ids[i] = eid_of(m)
    if is_new[m] then too_old = too_old + 1 else trimmed = trimmed + 1 end
  end
  remove('SREM', eids, ids)
  remove('HDEL', vec, ids)
  n = cap
end
added = added - too_old

-- 3. an event that survived the cap and landed before older members changes the windows that
--    end at those later members: delete their vectors (the caller re-encodes them)
local invalidated = 0
if added > 0 then  -- added now counts the new events still in the window
  local lowest, kept = nil, 0
  for _, m in ipairs(new_members) do
    local r = redis.call('ZRANK', events, m)
    if r then
      kept = kept + 1
      if lowest == nil or r < lowest then lowest = r end
    end
  end
  if lowest ~= nil and n - lowest > kept then
    local later = redis.call('ZRANGE', events, lowest + 1, -1)
    local ids = {}
    for i, m in ipairs(later) do ids[i] = eid_of(m) end
    invalidated = remove('HDEL', vec, ids)
  end
end
if added > 0 then redis.call('HINCRBY', meta, 'appended', added) end

-- 4. the new events' own vectors, for those still in the window
local stored = 0
for eid, blob in pairs(new_blobs) do
  if redis.call('SISMEMBER', eids, eid) == 1 then
    redis.call('HSET', vec, eid, blob)
    stored = stored + 1
  end
end
if stored > 0 then redis.call('HSET', meta, 'fingerprint', ARGV[2]) end
return {added, dups, trimmed, invalidated, too_old, stored}
"""

# KEYS: vec, eids, meta
# ARGV: fingerprint, key_1, blob_1, key_2, blob_2, ...
# Stores a vector only when its key is an event id in the window (a vector computed for an event
# that was trimmed meanwhile is dropped, never resurrected). Returns {stored, {rejected keys}}.
PUT_VECTORS = r"""
local vec, eids, meta = KEYS[1], KEYS[2], KEYS[3]
local stored, rejected = 0, {}
for i = 2, #ARGV, 2 do
  if redis.call('SISMEMBER', eids, ARGV[i]) == 1 then
    redis.call('HSET', vec, ARGV[i], ARGV[i + 1])
    stored = stored + 1
  else
    rejected[#rejected + 1] = ARGV[i]
  end
end
if stored > 0 then redis.call('HSET', meta, 'fingerprint', ARGV[1]) end
return {stored, rejected}
"""

# KEYS: events, vec
# ARGV: header (magic + fingerprint) of the vectors wanted
# Returns {members oldest first, {key, payload, key, payload, ...} of matching vectors with the
# header stripped, {stale keys}}: stale vectors never cross the wire.
READ_STATE = r"""
local header = ARGV[1]
local hl = string.len(header)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local flat = redis.call('HGETALL', KEYS[2])
local fresh, stale = {}, {}
for i = 1, #flat, 2 do
  local blob = flat[i + 1]
  if string.sub(blob, 1, hl) == header then
    fresh[#fresh + 1] = flat[i]
    fresh[#fresh + 1] = string.sub(blob, hl + 1)
  else
    stale[#stale + 1] = flat[i]
  end
end
return {members, fresh, stale}
"""

# KEYS: every key of one user. Returns the number of keys deleted.
DELETE_USER = r"""
return redis.call('DEL', unpack(KEYS))
"""
