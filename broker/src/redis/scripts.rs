//! Lua scripts that make the multi-step Redis operations atomic. kombu pops with BRPOP and records the
//! message in `unacked` in a second round trip (a crash in between loses it); our fetch pops a whole batch and
//! records it in one step, and restores only what it actually removed from `unacked`.

use redis::Script;
use std::sync::LazyLock;

/// Pops up to `max` messages from the queues' priority lists, in the order given (pass 1 honours per-queue
/// caps, pass 2 fills what is left), and records each as unacked. Envelopes that are not JSON are moved to
/// the queue's dead-letter list instead. A message already popped by BRPOP can be passed in to be recorded.
///
/// Deliveries to acknowledge first can be passed along: they are removed from `unacked` before anything is
/// popped, so the worker never holds more than its prefetch even for an instant.
///
/// KEYS: `unacked`, `unacked_index`, then 4 priority lists per queue.
/// ARGV: lease score (now, see `lease_score`), max, dead-letter prefix, timestamp (also salts generated
/// tags), pre-popped raw (or ""), its queue index (or 0), two-pass flag, number of acks N, N delivery tags,
/// then per queue: name, cap.
/// Returns `{dead_lettered, {queue, tag, raw, ...}}`.
pub static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
local dead = 0
local n = 0
local max = tonumber(ARGV[2])
local nacks = tonumber(ARGV[8])
local base = 8 + nacks
local nq = (#ARGV - base) / 2
-- Many members per command, in chunks that stay under Lua's stack limit for unpack.
local CHUNK = 512
for i = 9, base, CHUNK do
  local j = math.min(i + CHUNK - 1, base)
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
end
local hset, zadd = {}, {}

-- Plain searches (no pattern matching) for the fields as kombu writes them; nil when the shape differs,
-- and the patterns below decide as before.
local TAG_KEY, INFO_KEY, RK_KEY = '"delivery_tag": "', '"delivery_info": {"exchange": "', '", "routing_key": "'
-- Searches start at `from` (the last 400 bytes) instead of cutting a copy of the tail: every string Lua makes
-- is hashed byte by byte, and that was a sizeable part of each fetch.
local function tail_tag(raw, from)
  -- What '"delivery_tag": "([^"]+)"}}$' matches: the last key in the tail, its value running to '"}}' at the end.
  if string.sub(raw, -3) ~= '"}}' then return nil end
  local at = nil
  while true do
    local i = string.find(raw, TAG_KEY, from, true)
    if not i then break end
    at, from = i, i + 1
  end
  if not at then return nil end
  local value = string.sub(raw, at + #TAG_KEY, -4)
  if value == '' or string.find(value, '"', 1, true) then return nil end
  return value
end
local function info(s, from)
  -- The first '"delivery_info": {"exchange": "..."' when the routing key follows it as kombu writes it.
  local i = string.find(s, INFO_KEY, from, true)
  if not i then return nil end
  local a = i + #INFO_KEY
  local b = string.find(s, '"', a, true)
  if not b or string.find(s, RK_KEY, b, true) ~= b then return nil end
  local c = b + #RK_KEY
  local d = string.find(s, '"', c, true)
  if not d then return nil end
  return string.sub(s, a, b - 1), string.sub(s, c, d - 1)
end

-- Exchange and routing key as JSON strings, encoded once per batch (a batch has one or two).
local encoded = {}
local function json_of(v)
  local e = encoded[v]
  if not e then
    e = cjson.encode(v)
    encoded[v] = e
  end
  return e
end

local function record(qi, raw)
  local qname = ARGV[base + 2 * qi - 1]
  -- kombu writes properties last and delivery_tag last among them: look in the tail first.
  local from = math.max(1, #raw - 399)
  local tag = tail_tag(raw, from)
  local ex, rk = info(raw, from)
  if not tag or not ex then
    local tail = string.sub(raw, -400)
    tag = tag or string.match(tail, '"delivery_tag": "([^"]+)"}}$')
      or string.match(raw, '.*"delivery_tag": "([^"]+)"')
    if not ex then
      ex, rk = string.match(tail, '"delivery_info": {"exchange": "([^"]*)", "routing_key": "([^"]*)"')
    end
    if not ex then
      ex, rk = string.match(raw, '"delivery_info": {"exchange": "([^"]*)", "routing_key": "([^"]*)"')
    end
  end
  if not tag then
    local ok, env = pcall(cjson.decode, raw)
    if not ok or type(env) ~= 'table' then
      redis.call('LPUSH', ARGV[3] .. qname, cjson.encode({
        reason = 'envelope is not valid JSON (not a Celery/kombu message)', raw = raw, queue = qname, at = ARGV[4]}))
      dead = dead + 1
      return
    end
    local props = type(env.properties) == 'table' and env.properties or {}
    tag = props.delivery_tag
    if type(tag) ~= 'string' then tag = 'celeriac-' .. redis.sha1hex(raw .. ARGV[4] .. n) end
    local di = type(props.delivery_info) == 'table' and props.delivery_info or {}
    ex = type(di.exchange) == 'string' and di.exchange or ''
    rk = type(di.routing_key) == 'string' and di.routing_key or qname
  end
  ex = ex or ''
  rk = rk or qname
  hset[#hset + 1] = tag
  hset[#hset + 1] = '[' .. raw .. ', ' .. json_of(ex) .. ', ' .. json_of(rk) .. ']'
  zadd[#zadd + 1] = ARGV[1]
  zadd[#zadd + 1] = tag
  n = n + 1
  out[#out + 1] = qname
  out[#out + 1] = tag
  out[#out + 1] = raw
end

if ARGV[5] ~= '' then record(tonumber(ARGV[6]), ARGV[5]) end
local passes = tonumber(ARGV[7])
for pass = 1, passes do
  for qi = 1, nq do
    local cap = max
    if pass == 1 then cap = tonumber(ARGV[base + 2 * qi]) end
    local taken = 0
    for k = 1, 4 do
      local key = KEYS[2 + (qi - 1) * 4 + k]
      while n + dead < max and taken < cap do
        local want = math.min(max - n - dead, cap - taken)
        local items = redis.call('RPOP', key, want)
        if not items then break end
        for _, raw in ipairs(items) do
          record(qi, raw)
          taken = taken + 1
        end
        if #items < want then break end
      end
    end
  end
end
-- Recorded as unacked in a few commands for the whole batch (pairs, so chunks are even).
for i = 1, #hset, CHUNK do
  local j = math.min(i + CHUNK - 1, #hset)
  redis.call('HSET', KEYS[1], unpack(hset, i, j))
  redis.call('ZADD', KEYS[2], unpack(zadd, i, j))
end
return {dead, out}
"#,
    )
});

/// Gives one unacked message back to a list, only if it is still in `unacked` (so two restorers never
/// duplicate it). KEYS: `unacked`, `unacked_index`, target list. ARGV: tag, envelope, "1" = RPUSH (front).
pub static RESTORE_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] == '1' then redis.call('RPUSH', KEYS[3], ARGV[2]) else redis.call('LPUSH', KEYS[3], ARGV[2]) end
  return 1
end
return 0
"#,
    )
});

/// Releases the sweep mutex only if we still own it (kombu's `Mutex` release).
pub static RELEASE_MUTEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Moves a held message out of `unacked` into the queue's ETA set (scored by when it is due), atomically:
/// from then on no visibility timeout can redeliver it, and any worker republishes it when due.
/// KEYS: `unacked`, `unacked_index`, ETA set. ARGV: tag, due (unix seconds), envelope.
pub static PARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  return 1
end
return 0
"#,
    )
});

/// Republishes parked messages due by ARGV[1] to the front of their queue (priority sub-list from the
/// envelope). Each message is moved by exactly one caller (ZREM decides). KEYS: ETA set, then the 4 priority
/// lists of the queue. ARGV: due-by (unix seconds), limit. Returns how many moved.
pub static UNPARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, m in ipairs(due) do
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local p = tonumber(string.match(string.sub(m, -400), '"priority": (%d+)')) or 0
    local k = 2
    if p >= 9 then k = 5 elseif p >= 6 then k = 4 elseif p >= 3 then k = 3 end
    redis.call('RPUSH', KEYS[k], m)
    moved = moved + 1
  end
end
return moved
"#,
    )
});

/// A GCRA token bucket shared by every worker: returns -1 when a call may proceed now, otherwise how many
/// milliseconds to wait. KEYS: the limiter key. ARGV: emission interval (ms), burst.
pub static RATE_LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then return allow_at - now end
local new = tat + interval
redis.call('SET', KEYS[1], new, 'PX', math.ceil(new - now + 1000))
return -1
"#,
    )
});
