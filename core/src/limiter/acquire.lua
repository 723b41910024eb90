-- Pacer's global limiter: one script per decision, atomic across every dimension of one
-- (project, model) and its project's spend. The algorithm is described in core/src/limiter/mod.rs; memory.rs is
-- this script's twin and every branch here has one there.
--
-- KEYS[1] log: sorted set, one member "c1,c2,c3,c4,<seq>,<request id>" per booking, scored
--              by its start (µs, Redis clock). The sequence number keeps two bookings of
--              one id with equal costs apart.
-- KEYS[2] st:  hash of running sums (s1..s4) and cursors (k1..k4: entries scored at or
--              below are outside the window), the windows they were built for (w1..w4),
--              the monotonic now, state generation, latest start (ls) and what set it (lb),
--              cooldown (cd), per-day block (db), day start/end/after (ds, de, da), counts
--              for this day and the next (dc, nc), the member sequence (q), the fence (fs: the latest start a lost state had), the
--              limits the bookings were made under (l1..l4, -1: unlimited; absent in a
--              hash written before they were), the latest start pruned from the log (pr: a
--              window that grows past it cannot be recounted), the server the state was
--              last written on (rid: the first 48 bits of Redis's replication id), the
--              learned cut of the windowed rates (ac, per mille: lowered by unexplained
--              429s, raised after clean windows) and when it last changed (al), until when
--              a window may hold room given back (rm: a release, a lower reconcile, a
--              re-fit), the latest start of a booking checked before its start (ck:
--              it may be called already, so no other tenant may take it over), the
--              lowest priority class ever booked (pm), and
--              "t:<request id>" -> the id's latest member, "p:<request id>" -> its
--              priority class when not 0.
-- KEYS[3], KEYS[4] (optional): the project's spend state, a log and a hash of the same
--              shape over every model of the project (members' ids are "<request id>
--              <KEYS[1]>"), only its spend limited. Given when the pool limits spend; the
--              model's state then records spend without limiting it.
-- Tenants (a pool that declares them): each tenant's own bookings of this (project,
-- model) are a companion state of the same shape (KEYS after the project's: a log and a
-- hash, members' ids the request ids), limited by the tenant's ceiling, and weighed for
-- its fair share. The model's hash records when each tenant last booked ("a:<tenant>":
-- its latest start), so a share is counted among the tenants active within a window.
-- No key carries a TTL: the script prunes the log, and eviction must never take one
-- key without the other (see RedisLimiter::eviction_policy).
-- ARGV[1] is the operation: a (acquire), c (check before the call), r (reconcile),
-- x (release), p (penalize: m per-minute cooldown, d per-day block, a unexplained 429 on
-- a shared quota), u (usage), n (the tenants' usage: ARGV[2] their count, their states the
-- last keys, ARGV[3] the requests window; nothing is written). A tenant's keys are three:
-- its state of this model (a log and a hash) and its budgets' hash (one per project). With the project's state, acquire takes its hint after the
-- model's (ARGV[27..28]: generation, latest start), check too (ARGV[14..15]), and both
-- answer its generation and latest start after their usual fields. (The project's hint is
-- always sent, zeros without the project's state, so what follows has a fixed place.)
-- Tenants: acquire's ARGV[29] is how many the pool declares (their states are the last
-- 2n keys), ARGV[30] the request's (1-based; 0: none), then per tenant its name, weight,
-- floor and ceiling (per mille of the pool's limits, 1000: no ceiling). Check's ARGV[16],
-- reconcile's ARGV[8] and release's ARGV[4] name the ticket's tenant ('' : none), whose
-- state is then the last two keys. After the tenants, acquire's priority class (0 when
-- absent): higher books ahead of lower bookings that have not started; then the months'
-- boundaries (the month holding now, the next, the one after) and the caller's hint of the
-- request's tenant's budgets (generation, day end, day's spend, month end, month's
-- spend), which acquire answers after the project's part. Numbers are integers; they are
-- formatted with %d, never tostring (which turns µs times into floats with exponents).
local op = ARGV[1]
-- TIME once: on Redis 7.0 repeated calls differ within one script.
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
local DAY = 86400000000
local CUT_MAX, CUT_STEP = 900, 100 -- the learned cut's bounds (see learned)
local CAP = 4000 -- the most log entries one walk reads

local function fmt(x) return string.format('%d', x) end
local function costs_of(m)
  local a, b, c, d = string.match(m, '^(%d+),(%d+),(%d+),(%d+),')
  return { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
end
local function seq_of(m) return tonumber(string.match(m, '^%d+,%d+,%d+,%d+,(%d+),')) end
local function id_of(m) return string.match(m, '^%d+,%d+,%d+,%d+,%d+,(.*)$') end

-- The server this runs on, by its replication id: a replica promoted with REPLICAOF NO ONE
-- and a restarted server get a new one, the two ways the state can go back in time while
-- keeping its generation (a promoted replica that lagged, a restart from an older
-- snapshot). 0 when INFO is refused (some managed services): then only the hints tell.
-- (memory.rs has no twin of this: one process cannot be promoted or restarted in place.)
local server = 0
local info = redis.pcall('INFO', 'replication')
if type(info) == 'string' then
  local hex = string.match(info, 'master_replid:(%x+)')
  if hex then server = tonumber(string.sub(hex, 1, 12), 16) or 0 end
end
-- Redis time, kept monotonic across failovers and clock steps: the latest of TIME and
-- every opened state's own now (set once all are open, see start).
local now = clock

-- One limiter state (a log and its hash): everything below works on the state it was
-- opened on, so one decision can weigh a (project, model) and its project together.
-- dd: the dimension the day's (and month's) counts are kept in: requests (1) for a model's
-- per-day quota, spend (4) for a tenant's budgets (a hash alone: log is nil).
local function open(log, st, dd)
  dd = dd or 1
  local NAMES = { 'now', 'gen', 'ls', 'lb', 'cd', 'db', 'ds', 'de', 'da', 'dc', 'nc',
    's1', 's2', 's3', 's4', 'k1', 'k2', 'k3', 'k4', 'w1', 'w2', 'w3', 'w4', 'q', 'fs',
    'l1', 'l2', 'l3', 'l4', 'pr', 'rid', 'ac', 'al', 'rm', 'ck', 'fr', 'fp', 'fm', 'pm',
    'ms', 'me', 'ma', 'mc', 'mn' }
  -- Fields that stay absent until known (everything else reads 0 when absent).
  local OPTIONAL = { l1 = true, l2 = true, l3 = true, l4 = true }
  local raw = redis.call('HMGET', st, unpack(NAMES))
  local S, has = {}, {}
  for i, n in ipairs(NAMES) do
    S[n] = tonumber(raw[i])
    if S[n] == nil and not OPTIONAL[n] then S[n] = 0 end
    has[n] = raw[i] ~= false
  end
  local fresh = not has.gen
  -- A budget's state is a hash alone (log nil).
  local count = 0
  if log then count = redis.call('ZCARD', log) end
  local sum = { S.s1, S.s2, S.s3, S.s4 }
  local cur = { S.k1, S.k2, S.k3, S.k4 }
  local win = { S.w1, S.w2, S.w3, S.w4 }

  -- Once every state is open and now is known.
  local function start()
    S.now = now
    -- A new hash: sequence numbers start from now so they cannot repeat a lost hash's.
    if fresh then S.gen, S.q = now, now end
  end

  local function save()
    S.s1, S.s2, S.s3, S.s4 = sum[1], sum[2], sum[3], sum[4]
    S.k1, S.k2, S.k3, S.k4 = cur[1], cur[2], cur[3], cur[4]
    S.w1, S.w2, S.w3, S.w4 = win[1], win[2], win[3], win[4]
    local a = {}
    for _, n in ipairs(NAMES) do
      if S[n] ~= nil then
        a[#a + 1] = n
        a[#a + 1] = fmt(S[n])
      end
    end
    redis.call('HSET', st, unpack(a))
    -- Keys written by a version that set TTLs (or by one still running during a rollout)
    -- lose them: eviction must never take one key without the other.
    if redis.call('PTTL', st) >= 0 then
      redis.call('PERSIST', st)
      if log then redis.call('PERSIST', log) end
    end
  end

  local function roll_day(b)
    if S.de ~= 0 and now < S.de then return end
    local ds, de, da
    if now < b[1] then ds, de, da = now, b[1], b[2]
    elseif now < b[2] then ds, de, da = b[1], b[2], b[3]
    elseif now < b[3] then ds, de, da = b[2], b[3], b[4]
    elseif now < b[4] then ds, de, da = b[3], b[4], b[4] + DAY
    else ds, de, da = b[4], b[4] + DAY, b[4] + 2 * DAY end
    -- Bookings made into the next day count against it once it comes.
    if ds == S.de then S.dc = S.nc else S.dc = 0 end
    S.nc = 0
    S.ds, S.de, S.da = ds, de, da
  end

  -- The month (a tenant's monthly budget), as roll_day: mb is the start of the month
  -- holding now, the next month's start and the one after.
  local function roll_month(mb)
    if S.me ~= 0 and now < S.me then return end
    local ms, me, ma = mb[1], mb[2], mb[3]
    if now >= mb[2] then ms, me, ma = mb[2], mb[3], mb[3] + 31 * DAY end
    if ms == S.me then S.mc = S.mn else S.mc = 0 end
    S.mn = 0
    S.ms, S.me, S.ma = ms, me, ma
  end

  -- Counts a booking at start of cost x (in dimension dd) in its day and month.
  local function tally(start, x)
    if start >= S.ds and start < S.de then S.dc = math.max(0, S.dc + x)
    elseif start >= S.de then S.nc = math.max(0, S.nc + x) end
    if S.me > 0 then
      if start >= S.ms and start < S.me then S.mc = math.max(0, S.mc + x)
      elseif start >= S.me then S.mn = math.max(0, S.mn + x) end
    end
  end

  -- Moves dimension d's cursor past every entry starting at or before target.
  local function advance(d, target)
    if target <= cur[d] then return end
    local items = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(cur[d]), fmt(target))
    for _, m in ipairs(items) do sum[d] = sum[d] - costs_of(m)[d] end
    cur[d] = target
  end

  -- Recounts dimension d (its window changed, or the hash and the log disagree).
  local function rebuild(d, target)
    local items = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(target), '+inf')
    local total = 0
    for _, m in ipairs(items) do total = total + costs_of(m)[d] end
    sum[d], cur[d] = total, target
  end

  -- The earliest start from s0 on at which dimension d's window holds at most need; the
  -- second value is false when the walk hit CAP and the time is only a lower bound. Reads
  -- the log in growing pages: usually the first few entries are enough.
  local function earliest(d, need, s0, w)
    if sum[d] <= need then return s0, true end
    local left, walked, offset, size = sum[d], 0, 0, 16
    local from = '(' .. fmt(cur[d])
    local function page()
      return redis.call('ZRANGEBYSCORE', log, from, '+inf', 'WITHSCORES', 'LIMIT', offset, size)
    end
    local items = page()
    while true do
      local n = #items / 2
      if n == 0 then return s0, true end
      local full = n == size
      local nxt_page = nil
      local score = 0
      for i = 1, n do
        score = tonumber(items[2 * i])
        left = left - costs_of(items[2 * i - 1])[d]
        walked = walked + 1
        if left <= need then
          -- Entries with one start leave the window together: look at the next one.
          local nxt = items[2 * i + 2]
          if nxt == nil and full then
            offset, size = offset + size, math.min(size * 2, 512)
            nxt_page = page()
            nxt = nxt_page[2]
          end
          if nxt == nil or tonumber(nxt) ~= score then return score + w, true end
        end
      end
      if not full then return score + w, true end
      if walked >= CAP then return score + w, false end
      if not nxt_page then
        offset, size = offset + size, math.min(size * 2, 512)
        nxt_page = page()
      end
      items = nxt_page
    end
  end

  -- Cursors that follow now, never a queue's start (a state whose log holds bookings
  -- later than one queue's: the project's, a tenant's): the sums count every booking any
  -- start from now on can share a window with.
  local function follow_now(W)
    for d = 1, 4 do
      if win[d] ~= W[d] then
        win[d] = W[d]
        rebuild(d, now - W[d])
      else
        advance(d, now - W[d])
      end
    end
  end

  -- Removes entries outside every window that started at or before keep_from (bookings
  -- stay until their check and reconcile, even behind a queue longer than a window). An
  -- id's mapping goes with its entry only if it still names that entry (a later booking of
  -- the same id keeps its own).
  local function prune(keep_from)
    local lo = math.min(cur[1], cur[2], cur[3], cur[4], keep_from)
    local scored = redis.call('ZRANGEBYSCORE', log, '-inf', fmt(lo), 'WITHSCORES', 'LIMIT', 0, 1000)
    if #scored == 0 then return end
    local old = {}
    for i = 1, #scored / 2 do old[i] = scored[2 * i - 1] end
    S.pr = math.max(S.pr, tonumber(scored[#scored]))
    local fields, members = {}, {}
    for _, m in ipairs(old) do
      local id = id_of(m)
      if id then
        fields[#fields + 1] = 't:' .. id
        members[#members + 1] = m
      end
    end
    if #fields > 0 then
      local mapped = redis.call('HMGET', st, unpack(fields))
      local gone = {}
      for i, f in ipairs(fields) do
        if mapped[i] == members[i] then
          gone[#gone + 1] = f
          gone[#gone + 1] = 'p:' .. string.sub(f, 3)
        end
      end
      if #gone > 0 then redis.call('HDEL', st, unpack(gone)) end
    end
    redis.call('ZREM', log, unpack(old))
  end

  local function member(c, q, id)
    return fmt(c[1]) .. ',' .. fmt(c[2]) .. ',' .. fmt(c[3]) .. ',' .. fmt(c[4]) .. ','
      .. fmt(q) .. ',' .. id
  end

  -- Adds an entry (a new sequence number unless q is given) and counts it where it lies
  -- inside a window.
  local function add(start, c, id, q)
    if not q then
      S.q = S.q + 1
      q = S.q
    end
    local m = member(c, q, id)
    redis.call('ZADD', log, fmt(start), m)
    for d = 1, 4 do
      if start > cur[d] then sum[d] = sum[d] + c[d] end
    end
    return m
  end

  -- The entry booked for request id with this start: the id's latest booking, or an earlier
  -- one (a later booking of the same id has taken the mapping since).
  local function booked(id, start)
    local m = redis.call('HGET', st, 't:' .. id)
    if m then
      local sc = redis.call('ZSCORE', log, m)
      if sc and tonumber(sc) == start then return m end
    end
    local items = redis.call('ZRANGEBYSCORE', log, fmt(start), fmt(start), 'LIMIT', 0, 1000)
    for _, x in ipairs(items) do
      if id_of(x) == id then return x end
    end
    return nil
  end

  -- Replaces booking m (request id, start) by the same booking with costs `new`, or
  -- releases it when `new` is nil (a request never sent does not count against the day).
  local function replace(m, id, start, new)
    local old = costs_of(m)
    -- Room given back: windows holding start may have room before the queue's end.
    S.rm = math.max(S.rm, start + math.max(win[1], win[2], win[3], win[4]))
    redis.call('ZREM', log, m)
    for d = 1, 4 do
      if start > cur[d] then sum[d] = sum[d] - old[d] end
    end
    local mapped = redis.call('HGET', st, 't:' .. id) == m
    if new then
      local nm = add(start, new, id, seq_of(m))
      if mapped then redis.call('HSET', st, 't:' .. id, nm) end
      -- A budget is charged what the call cost (a request stays a request).
      if dd ~= 1 then tally(start, new[dd] - old[dd]) end
    else
      if mapped then redis.call('HDEL', st, 't:' .. id, 'p:' .. id) end
      tally(start, -old[dd])
    end
  end

  -- Evidence that state was lost: the caller saw another generation (Redis restarted
  -- without persistence), or a later booking than the state holds (a rollback: a promoted
  -- lagging replica or an older snapshot keeps the generation), or the hash and the log
  -- disagree (one key lost). Then every limited dimension waits out its own window from the
  -- latest start anyone saw, or now if that is later still (fs, raised only by a later
  -- start, so later stale callers do not extend it). A lost booking that had started by the time of the loss may have been
  -- called, so the fence also covers that time: the generation's start after a restart,
  -- now for a lost key or a rollback found by this call; a lost booking that starts later
  -- is never called, as its check finds it gone. What only the callers still know of the
  -- day comes back from their hints: the day's count (the most any of them saw, a lower
  -- bound of the lost one) and a per-day block. h is the caller's hint (gen, latest start,
  -- day end, day count, day block). Returns whether there was evidence.
  local function fence(h)
    local hint_gen, hint_last = h[1], h[2]
    -- The caller last talked to another server (it learns the server at connect and from
    -- every reply), and this key's state is gone: a restart or failover that lost it, seen
    -- even by a caller that never held a hint for this key.
    local hint_server = h[6] or 0
    local replaced = fresh and server > 0 and hint_server > 0 and hint_server ~= server
    -- One key lost: the hash is gone but the log is not, or the log is gone while the hash
    -- still counts bookings in a window. (Both judged from what any version of the script
    -- writes, so replicas mid-rollout do not look like a loss.)
    local broken = (fresh and count > 0)
      or (not fresh and count == 0 and (sum[1] > 0 or sum[2] > 0 or sum[3] > 0 or sum[4] > 0))
    local other_gen = hint_gen > 0 and hint_gen ~= S.gen
    local rolled_back = hint_last > S.ls
    -- Written on another server: what the old one held after its last replicated write
    -- may be gone, and the callers that saw it may not be the first to come back.
    local moved = server > 0 and S.rid > 0 and S.rid ~= server
    if server > 0 then S.rid = server end
    if moved or replaced then rolled_back = true end
    if not (broken or other_gen or rolled_back) then return false end
    if h[3] == S.de then S.dc = math.max(S.dc, h[4]) end
    S.db = math.max(S.db, h[5])
    local at = hint_last
    if other_gen then at = math.max(at, S.gen) end
    if rolled_back then at = math.max(at, now) end
    if broken then
      -- Count what the log still holds, and fence from its latest booking and the hash's.
      local top = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
      if top[2] then at = math.max(at, tonumber(top[2])) end
      at = math.max(at, S.ls, now)
      for d = 1, 4 do rebuild(d, cur[d]) end
    end
    -- Never past now: a lost booking that starts later was not called (its holder sleeps
    -- to its start, then checks, and finds it gone), so waiting for it would only idle
    -- the limit (after a failover: a full queue of max_wait on top of the window).
    at = math.min(at, now)
    if at > S.fs then S.fs = at end
    S.ls = math.max(S.ls, at)
    return true
  end

  -- The limits changed (a lower limit, a longer window or margin, more headroom, or a
  -- raise): the bookings that have not started are fitted again under the new limits, in
  -- start order, each kept at its start if every window ending there still holds at most the
  -- limit (counting what has started and what was kept before it), released otherwise, so
  -- the latest go first. Their holders' check finds them gone (Lost). The latest start (ls)
  -- stays: it is every caller's rollback hint, and new bookings still queue behind it.
  -- Returns whether the recorded limits changed.
  -- The learned cut: a shared quota that answers bare 429s (Vertex AI) has no published
  -- limit, so the rate it takes is learned. The request, token and image limits are cut by
  -- ac per mille; one window without an unexplained 429 gives back 100 per mille (additive
  -- increase), each unexplained 429 takes 30 % of what is left (multiplicative decrease, at
  -- most once per half window: the 429s of one over-full window count once). Applied to L
  -- before refit, so a cut releases the bookings beyond it like any lowered limit.
  local function learned(L, W, raise)
    if S.ac <= 0 then return end
    if raise and now - S.al >= W[1] then
      S.ac, S.al = math.max(0, S.ac - CUT_STEP), now
    end
    for d = 1, 3 do
      if L[d] > 0 then L[d] = math.max(1, math.floor(L[d] * (1000 - S.ac) / 1000)) end
    end
  end

  local function refit(L, W)
    local known = S.l1 ~= nil
    local before = { S.l1, S.l2, S.l3, S.l4 }
    S.l1, S.l2, S.l3, S.l4 = L[1], L[2], L[3], L[4]
    if not known then return true end
    local same = true
    for d = 1, 4 do
      if before[d] ~= L[d] or win[d] ~= W[d] then same = false end
    end
    if same then return false end
    local reach = nil
    for d = 1, 4 do
      if L[d] >= 0 and (reach == nil or W[d] > reach) then reach = W[d] end
    end
    if reach == nil then return true end
    -- A longer window may reach entries already pruned: what cannot be counted is taken as
    -- full, as after a loss (each limited dimension waits its window from them).
    for d = 1, 4 do
      if L[d] >= 0 and W[d] > win[d] then S.fs = math.max(S.fs, S.pr) end
    end
    local items = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(now - reach), '+inf', 'WITHSCORES')
    local list = {}
    for i = 1, #items / 2 do
      local m = items[2 * i - 1]
      list[#list + 1] = { m = m, s = tonumber(items[2 * i]), q = seq_of(m) or 0, c = costs_of(m) }
    end
    -- Members with one start sort by their text; bookings sort by when they were made.
    table.sort(list, function(x, y)
      if x.s ~= y.s then return x.s < y.s end
      return x.q < y.q
    end)
    local kept, lo, held, gone = {}, { 1, 1, 1, 1 }, { 0, 0, 0, 0 }, {}
    for _, e in ipairs(list) do
      local fits = true
      for d = 1, 4 do
        if L[d] >= 0 then
          while lo[d] <= #kept and kept[lo[d]].s <= e.s - W[d] do
            held[d] = held[d] - kept[lo[d]].c[d]
            lo[d] = lo[d] + 1
          end
          if held[d] + e.c[d] > L[d] then fits = false end
          if e.c[d] > 0 and e.s < S.fs + W[d] then fits = false end
        end
      end
      if e.s <= now or fits then
        kept[#kept + 1] = e
        for d = 1, 4 do held[d] = held[d] + e.c[d] end
      else
        gone[#gone + 1] = e
      end
    end
    for _, e in ipairs(gone) do replace(e.m, id_of(e.m) or '', e.s, nil) end
    -- A raise opens room in every window up to the queue's end.
    S.rm = math.max(S.rm, S.ls + reach)
    return true
  end

  -- Whether a booking at g (before the queue's latest start) keeps every window that holds
  -- g within its limit: the windows ending at g and at each booking starting less than a
  -- window after it, counted exactly. The queue's walk (earliest) counts everything booked
  -- after the cursor, so after a raise or a release it would wait behind bookings that leave
  -- room.
  local function room_at(g, c, L, W, rpd)
    if S.db > g then return false end
    if rpd >= 0 and (g >= S.de or S.dc + c[1] > rpd) then return false end
    local reach = 0
    for d = 1, 4 do
      if L[d] >= 0 and c[d] > 0 then
        if g < S.fs + W[d] then return false end
        if W[d] > reach then reach = W[d] end
      end
    end
    if reach == 0 then return true end
    local items = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(g - reach), '(' .. fmt(g + reach),
      'WITHSCORES', 'LIMIT', 0, CAP)
    local n = #items / 2
    if n >= CAP then return false end
    local at, cost = {}, {}
    for i = 1, n do
      at[i] = tonumber(items[2 * i])
      cost[i] = costs_of(items[2 * i - 1])
    end
    for d = 1, 4 do
      if L[d] >= 0 and c[d] > 0 then
        local w, room = W[d], L[d] - c[d]
        -- A sliding sum over the windows (t - w, t], t = g and each later start.
        local lo, hi, held = 1, 1, 0
        local function within(t)
          while hi <= n and at[hi] <= t do
            held = held + cost[hi][d]
            hi = hi + 1
          end
          while lo < hi and at[lo] <= t - w do
            held = held - cost[lo][d]
            lo = lo + 1
          end
          return held <= room
        end
        if not within(g) then return false end
        while hi <= n and at[hi] < g + w do
          if not within(at[hi]) then return false end
        end
      end
    end
    return true
  end

  return { S = S, sum = sum, cur = cur, win = win, fresh = fresh, log = log, st = st,
    start = start, save = save, roll_day = roll_day, advance = advance, rebuild = rebuild,
    earliest = earliest, prune = prune, add = add, booked = booked, replace = replace,
    roll_month = roll_month, tally = tally, follow_now = follow_now,
    fence = fence, learned = learned, refit = refit, room_at = room_at }
end

-- The (project, model)'s state, and with KEYS[3] and KEYS[4] its project's spend state:
-- Google's spend limit is per project, shared by the project's models, so a model books
-- its spend there, in the same step (same hash tag, one slot). The model's own state still
-- records each booking's spend (for its usage) but does not limit it.
-- The request's tenant's state (T), and on acquire every tenant the pool declares (TEN,
-- TI the request's): their keys come last.
local TEN, TI, tkeys = {}, 0, 0
if op == 'a' then
  local n = tonumber(ARGV[29]) or 0
  tkeys = 3 * n
  TI = tonumber(ARGV[30]) or 0
  for j = 1, n do
    local o = 30 + 6 * (j - 1)
    TEN[j] = { name = ARGV[o + 1], w = tonumber(ARGV[o + 2]), fl = tonumber(ARGV[o + 3]),
      cl = tonumber(ARGV[o + 4]), bd = tonumber(ARGV[o + 5]), bm = tonumber(ARGV[o + 6]),
      log = KEYS[#KEYS - tkeys + 3 * j - 2], st = KEYS[#KEYS - tkeys + 3 * j - 1],
      bk = KEYS[#KEYS - tkeys + 3 * j] }
  end
elseif op == 'n' then
  tkeys = 3 * (tonumber(ARGV[2]) or 0)
else
  local named = { c = ARGV[16], r = ARGV[8], x = ARGV[4] }
  if named[op] and named[op] ~= '' then tkeys = 3 end
end
local nk = #KEYS - tkeys
local M = open(KEYS[1], KEYS[2])
local P = nil
if nk >= 4 and op ~= 'p' then P = open(KEYS[3], KEYS[4]) end
local T = nil
-- And the tenant's budgets (B): a hash per (project, tenant), over all its models.
local B = nil
if TI > 0 then
  T = open(TEN[TI].log, TEN[TI].st)
  B = open(nil, TEN[TI].bk, 4)
elseif tkeys == 3 and op ~= 'n' then
  T = open(KEYS[nk + 1], KEYS[nk + 2])
  B = open(nil, KEYS[nk + 3], 4)
end
now = math.max(now, M.S.now)
if P then now = math.max(now, P.S.now) end
if T then now = math.max(now, T.S.now) end
if B then now = math.max(now, B.S.now) end
M.start()
if P then P.start() end
if T then T.start() end
if B then B.start() end
local S, sum, win, fresh = M.S, M.sum, M.win, M.fresh
-- In the project's log an entry's id names its model too: two models may book one id.
local function pid(id) return id .. ' ' .. KEYS[1] end
-- The project's limits: only spend, over the spend window.
local function project_limits(L, W)
  return { -1, -1, -1, L[4] }, { W[4], W[4], W[4], W[4] }
end
-- The project's part of a booking.
local function spend_only(c) return { 0, 0, 0, c[4] } end

if op == 'a' then
  local id = ARGV[2]
  local c = { tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]) }
  local max_wait = tonumber(ARGV[7])
  local L = { tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]) }
  local W = { tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15]) }
  local rpd = tonumber(ARGV[16])
  local b = { tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19]), tonumber(ARGV[20]) }
  local h = {}
  for i = 1, 5 do h[i] = tonumber(ARGV[20 + i]) or 0 end
  h[6] = tonumber(ARGV[26]) or 0
  local PL, PW
  if P then
    PL, PW = project_limits(L, W)
    L[4] = -1
    -- The caller's hint of the project state: its generation and latest start; the day
    -- is the model's business.
    P.fence({ tonumber(ARGV[27]) or 0, tonumber(ARGV[28]) or 0, 0, 0, 0, h[6] })
    P.refit(PL, PW)
  end
  M.roll_day(b)
  M.fence(h)
  M.learned(L, W, true)
  M.refit(L, W)
  -- The pool's limits as this decision applies them (the learned cut included, spend the
  -- project's): a tenant's ceiling and share are parts of these.
  local LF = { L[1], L[2], L[3], L[4] }
  if P then LF[4] = PL[4] end
  local function portion(pm)
    local out = {}
    for d = 1, 4 do
      if LF[d] < 0 then out[d] = -1 else out[d] = math.floor(LF[d] * pm / 1000) end
    end
    return out
  end
  -- The tenant's ceiling: its limits, enforced even while the pool has room.
  local TL = { -1, -1, -1, -1 }
  if T then
    if TEN[TI].cl < 1000 then TL = portion(TEN[TI].cl) end
    -- Callers keep no hint of a tenant's state: a lost one is found by the model's.
    T.fence({ 0, 0, 0, 0, 0, h[6] })
    T.refit(TL, W)
  end
  local opened, refunded = {}, {}
  local prio = tonumber(ARGV[31 + 6 * #TEN]) or 0
  -- The tenant's budgets (spend per day and per month, -1: none), counted in its state's
  -- day and month.
  local BD, BM = -1, -1
  local mo = 31 + 6 * #TEN
  local MB = { tonumber(ARGV[mo + 1]) or 0, tonumber(ARGV[mo + 2]) or 0,
    tonumber(ARGV[mo + 3]) or 0 }
  if T then
    BD, BM = TEN[TI].bd or -1, TEN[TI].bm or -1
    B.roll_day(b)
    B.roll_month(MB)
    -- The budgets' hash lost (deleted, evicted, a restart without persistence): what the
    -- caller saw spent in this day and month comes back (the most any caller saw, a lower
    -- bound of what was lost). Its hint (generation, day end, day's spend, month end,
    -- month's spend) is of another generation of the hash.
    local bh = {}
    for i = 1, 5 do bh[i] = tonumber(ARGV[mo + 3 + i]) or 0 end
    if bh[1] > 0 and bh[1] ~= B.S.gen then
      if bh[2] == B.S.de then B.S.dc = math.max(B.S.dc, bh[3]) end
      if bh[4] == B.S.me then B.S.mc = math.max(B.S.mc, bh[5]) end
    end
  end
  -- Whether a booking at x stays within the tenant's budgets (the day and month it is in
  -- only: a slot taken over is never in a later one).
  local function within_budget(x)
    if not T or c[4] <= 0 then return true end
    if BD >= 0 and (x >= B.S.de or B.S.dc + c[4] > BD) then return false end
    if BM >= 0 and (x >= B.S.me or B.S.mc + c[4] > BM) then return false end
    return true
  end
  -- The tenant's budgets at start s: the start they allow (the next day's or month's when
  -- this one's is spent), and with a third value the time to retry from when that is a
  -- later day or month than the one after (nothing is booked that far ahead).
  local function budget(s, blocker)
    if not T or c[4] <= 0 then return s, blocker, nil end
    if BM >= 0 then
      if s < B.S.me and B.S.mc + c[4] > BM then s, blocker = B.S.me, 9 end
      if s >= B.S.me and (s >= B.S.ma or B.S.mn + c[4] > BM) then
        return s, 9, math.max(s, B.S.ma)
      end
    end
    if BD >= 0 then
      if s < B.S.de and B.S.dc + c[4] > BD then s, blocker = B.S.de, 9 end
      if s >= B.S.de and (s >= B.S.da or B.S.nc + c[4] > BD) then
        return s, 9, math.max(s, B.S.da)
      end
    end
    return s, blocker, nil
  end
  -- Whether a booking at s (in this day or a later one) stays within the budgets.
  local function within_budget_from(x)
    if not T or c[4] <= 0 then return true end
    local bs, _, retry = budget(x, 0)
    return retry == nil and bs == x
  end
  -- Gives a victim's spend back to its tenant's budgets (j: its tenant).
  local function refund(j, x, spend)
    if spend <= 0 or j == 0 then return end
    local VB = B
    if j ~= TI then
      VB = refunded[j]
      if not VB then
        VB = open(nil, TEN[j].bk, 4)
        VB.start()
        VB.roll_day(b)
        VB.roll_month(MB)
        refunded[j] = VB
      end
    end
    VB.tally(x, -spend)
  end
  local function reply(kind, v, blocker, costs)
    M.save()
    if T then T.save() end
    if B then B.save() end
    for _, U in pairs(opened) do U.save() end
    for _, VB in pairs(refunded) do VB.save() end
    local pg, pl = 0, 0
    if P then
      P.save()
      pg, pl = P.S.gen, P.S.ls
    end
    local bg, bde, bdc, bme, bmc = 0, 0, 0, 0, 0
    if T then bg, bde, bdc, bme, bmc = B.S.gen, B.S.de, B.S.dc, B.S.me, B.S.mc end
    return { kind, v, blocker, now, S.gen, S.ls, costs[1], costs[2], costs[3], costs[4],
      S.de, S.dc, S.db, server, pg, pl, bg, bde, bdc, bme, bmc }
  end
  -- A retried acquire of the same delivery gets its ticket back while the start is ahead;
  -- once it has passed, the entry stays counted and the id books afresh.
  local m = redis.call('HGET', M.st, 't:' .. id)
  if m then
    local sc = redis.call('ZSCORE', M.log, m)
    if sc and tonumber(sc) > now then return reply(1, tonumber(sc), 0, costs_of(m)) end
  end
  for d = 1, 4 do
    if L[d] >= 0 and c[d] > L[d] then return reply(2, -1, 7, c) end
  end
  if P and PL[4] >= 0 and c[4] > PL[4] then return reply(2, -1, 7, c) end
  for d = 1, 4 do
    if TL[d] >= 0 and c[d] > TL[d] then return reply(2, -1, 7, c) end
  end
  if T and ((TEN[TI].bd or -1) >= 0 and c[4] > TEN[TI].bd or (TEN[TI].bm or -1) >= 0 and c[4] > TEN[TI].bm) then
    return reply(2, -1, 7, c)
  end
  if rpd >= 0 and c[1] > rpd then return reply(2, -1, 7, c) end
  local keep_from = now - math.max(W[1], W[2], W[3], W[4])
  local function prune_all()
    M.prune(keep_from)
    if P then P.prune(now - PW[4]) end
    if T then T.prune(keep_from) end
  end
  -- Books at start `at`: in the model's log, and its spend in the project's.
  local function book(at)
    redis.call('HSET', M.st, 't:' .. id, M.add(at, c, id))
    if at < S.de then S.dc = S.dc + c[1] else S.nc = S.nc + c[1] end
    if P then
      redis.call('HSET', P.st, 't:' .. pid(id), P.add(at, spend_only(c), pid(id)))
      if at > P.S.ls then P.S.ls = at end
    end
    if prio ~= 0 then
      redis.call('HSET', M.st, 'p:' .. id, fmt(prio))
      if prio < S.pm then S.pm = prio end
    end
    if T then
      B.tally(at, c[4])
      redis.call('HSET', T.st, 't:' .. id, T.add(at, c, id))
      if at > T.S.ls then T.S.ls = at end
      local f = 'a:' .. TEN[TI].name
      if at > (tonumber(redis.call('HGET', M.st, f)) or 0) then redis.call('HSET', M.st, f, fmt(at)) end
    end
  end
  -- The earliest slot of a booking of a lower priority class this request may take over
  -- (not started, not checked, costing at least as much in every limited dimension), the
  -- swap made; nil when there is none.
  local function overtake()
    local lo = math.max(now + 1, S.ck + 1, S.cd, S.db)
    for d = 1, 4 do
      if LF[d] >= 0 and c[d] > 0 then
        lo = math.max(lo, S.fs + W[d])
        if T then lo = math.max(lo, T.S.fs + W[d]) end
        if P and d == 4 then lo = math.max(lo, P.S.fs + PW[4]) end
      end
    end
    local items = redis.call('ZRANGEBYSCORE', M.log, fmt(lo), '+inf', 'WITHSCORES', 'LIMIT', 0, 64)
    local n = #items / 2
    if n == 0 then return nil end
    local fields = {}
    for i = 1, n do fields[i] = 'p:' .. (id_of(items[2 * i - 1]) or '') end
    local classes = redis.call('HMGET', M.st, unpack(fields))
    for i = 1, n do
      local m, x = items[2 * i - 1], tonumber(items[2 * i])
      local vid = id_of(m)
      local cheaper = vid ~= nil and (tonumber(classes[i]) or 0) < prio
      local cv = costs_of(m)
      for d = 1, 4 do
        if LF[d] >= 0 and cv[d] < c[d] then cheaper = false end
      end
      if cheaper and within_budget(x) and (not T or T.room_at(x, c, TL, W, -1)) then
        local rm, prm = S.rm, P and P.S.rm
        M.replace(m, vid, x, nil)
        if P then
          local pm = P.booked(pid(vid), x)
          if pm then P.replace(pm, pid(vid), x, nil) end
          P.S.rm = prm
        end
        -- Out of its tenant's state too (the same tenant's, or another's).
        for j, t in ipairs(TEN) do
          local U = T
          if j ~= TI then
            U = opened[j]
            if not U then
              U = open(t.log, t.st)
              U.start()
              opened[j] = U
            end
          end
          local um = U.booked(vid, x)
          if um then
            U.replace(um, vid, x, nil)
            refund(j, x, cv[4])
            break
          end
        end
        S.rm = rm
        book(x)
        return x
      end
    end
    return nil
  end
  -- The earliest slot of another tenant's booking this request may take over (see the
  -- fair shares below), the swap made; nil when there is none.
  local function fair_slot()
    local reach = 0
    for d = 1, 4 do
      if LF[d] >= 0 and W[d] > reach then reach = W[d] end
    end
    if reach == 0 then return nil end
    local fields = {}
    for j, t in ipairs(TEN) do fields[j] = 'a:' .. t.name end
    local seen = redis.call('HMGET', M.st, unpack(fields))
    local active = {}
    for j, t in ipairs(TEN) do
      active[j] = j == TI or (tonumber(seen[j]) or 0) > now - reach
    end
    -- Each active tenant's share, per mille: the rest after the tenants held at their
    -- floor or ceiling, by weight, until none moves.
    local shares, fixed = {}, {}
    for _ = 1, #TEN + 1 do
      local rest, wsum, moved = 1000, 0, false
      for j, t in ipairs(TEN) do
        if active[j] then
          if fixed[j] then rest = rest - shares[j] else wsum = wsum + t.w end
        end
      end
      for j, t in ipairs(TEN) do
        if active[j] and not fixed[j] then
          local v = math.floor(math.max(rest, 0) * t.w / math.max(wsum, 1))
          if v < t.fl then shares[j], fixed[j], moved = t.fl, true, true
          elseif v > t.cl then shares[j], fixed[j], moved = t.cl, true, true
          else shares[j] = v end
        end
      end
      if not moved then break end
    end
    local function share(j) return shares[j] end
    local SL = portion(share(TI))
    -- Not before a fence, a cooldown, a day block, or a booking already checked.
    local lo = math.max(now + 1, S.ck + 1, S.cd, S.db)
    local prim = nil
    for d = 1, 4 do
      if LF[d] >= 0 and c[d] > 0 then
        if c[d] > SL[d] then return nil end
        lo = math.max(lo, S.fs + W[d], T.S.fs + W[d])
        if P and d == 4 then lo = math.max(lo, P.S.fs + PW[4]) end
      end
      if LF[d] >= 0 and prim == nil then prim = d end
    end
    if prim == nil then return nil end
    -- Past where this tenant last found no room within its share, at this share (the
    -- scan's frontier), unless room was given back in its state since.
    if T.S.fp == share(TI) and T.S.fm == T.S.rm then lo = math.max(lo, T.S.fr + 1) end
    -- Candidates: each other active tenant's earliest bookings from lo, in start order. A
    -- start where this tenant has no room skips to when its earliest booking in that
    -- window leaves it (no start before then has room), and the scan fetches from there.
    local frontier = true
    for _ = 1, 8 do
      local cands = {}
      for j, t in ipairs(TEN) do
        if j ~= TI and active[j] then
          local items = redis.call('ZRANGEBYSCORE', t.log, fmt(lo), '+inf', 'WITHSCORES', 'LIMIT', 0, 16)
          for i = 1, #items / 2 do
            cands[#cands + 1] = { j = j, m = items[2 * i - 1], x = tonumber(items[2 * i]) }
          end
        end
      end
      table.sort(cands, function(a, b)
        if a.x ~= b.x then return a.x < b.x end
        return a.j < b.j
      end)
      local skip = nil
      for _, v in ipairs(cands) do
        if not (T.room_at(v.x, c, SL, W, -1) and T.room_at(v.x, c, TL, W, -1)) then
          local first = redis.call('ZRANGEBYSCORE', T.log, '(' .. fmt(v.x - W[prim]), '+inf',
            'WITHSCORES', 'LIMIT', 0, 1)
          skip = v.x + 1
          if first[2] then skip = math.max(skip, tonumber(first[2]) + W[prim]) end
          -- No room within the share before skip: later scans start there.
          if frontier then T.S.fr, T.S.fp, T.S.fm = skip - 1, share(TI), T.S.rm end
          break
        end
        frontier = false
        if not within_budget(v.x) then return nil end
        local cv = costs_of(v.m)
        local cheaper = true
        for d = 1, 4 do
          if LF[d] >= 0 and cv[d] < c[d] then cheaper = false end
        end
        if cheaper then
          -- The other tenant is above its share in the window ending at its slot.
          local U = opened[v.j]
          if not U then
            U = open(TEN[v.j].log, TEN[v.j].st)
            U.start()
            opened[v.j] = U
          end
          local held = 0
          local items = redis.call('ZRANGEBYSCORE', U.log, '(' .. fmt(v.x - W[prim]), fmt(v.x))
          for _, m in ipairs(items) do held = held + costs_of(m)[prim] end
          local vid = id_of(v.m)
          local mm = held > portion(share(v.j))[prim] and M.booked(vid, v.x)
          if mm then
            -- A swap gives no room back: the model's and the project's states keep their
            -- record of that (the other tenant's state does not: it has room now).
            local rm, prm = S.rm, P and P.S.rm
            M.replace(mm, vid, v.x, nil)
            U.replace(v.m, vid, v.x, nil)
            refund(v.j, v.x, cv[4])
            if P then
              local pm = P.booked(pid(vid), v.x)
              if pm then P.replace(pm, pid(vid), v.x, nil) end
              P.S.rm = prm
            end
            S.rm = rm
            book(v.x)
            return v.x
          end
        end
      end
      if not skip then return nil end
      lo = skip
    end
    return nil
  end
  -- Callers queue in arrival order: nobody starts before the latest booking (but see
  -- the room taken below).
  local s, blocker = now, 1
  if S.ls > s then s, blocker = S.ls, (S.lb > 0 and S.lb or 1) end
  if S.cd > s then s, blocker = S.cd, 6 end
  local s0 = s
  for d = 1, 4 do
    if win[d] ~= W[d] then
      win[d] = W[d]
      M.rebuild(d, s0 - W[d])
    else
      M.advance(d, s0 - W[d])
    end
  end
  -- The project's log holds every model's bookings, some later than this model's queue:
  -- its cursor follows now, never one model's start, so its sum counts every booking
  -- that any start from now on can share a window with.
  if P then P.follow_now(PW) end
  -- The tenant's log holds its bookings only, some later than the others': its cursor
  -- follows now too.
  if T then T.follow_now(W) end
  -- A queue ahead, yet room now (a raised limit, released bookings): take it. Only where
  -- room was given back (rm, here or in the project's spend): otherwise the queue's walk left none, and the exact count
  -- reads every booking within a window of g, the dearest step of a decision.
  local g = math.max(now, S.cd)
  local given_back = g < S.rm or (P ~= nil and g < P.S.rm)
  if S.ls > g and given_back and g - now <= max_wait and M.room_at(g, c, L, W, rpd)
    and (not P or P.room_at(g, spend_only(c), PL, PW, -1))
    and (not T or T.room_at(g, c, TL, W, -1)) and within_budget(g) then
    book(g)
    prune_all()
    return reply(1, g, 0, c)
  end
  -- Priority: behind a queue, a request of a higher class takes the slot of the earliest
  -- booking of a lower one that has not started (its holder's check finds it gone and it
  -- books afresh). Before fairness: priority overtakes shares, never a ceiling.
  if prio > S.pm and S.ls > now then
    local x = overtake()
    if x then
      prune_all()
      return reply(1, x, 0, c)
    end
  end
  -- Fair shares: behind a queue, a tenant below its share takes the slot of a booking of
  -- a tenant above its own share (not started, not checked), in start order; the holder's
  -- check finds it gone and it books afresh. Shares are weights among the tenants active
  -- within a window (booked from a window ago on), raised to a tenant's floor and cut to
  -- its ceiling; an idle tenant's share goes to the others, so the pool stays full.
  if T and #TEN > 1 and S.ls > now then
    local x = fair_slot()
    if x then
      prune_all()
      return reply(1, x, 0, c)
    end
  end
  if s0 - now > max_wait then
    prune_all()
    return reply(2, s0 - now, blocker, c)
  end
  for d = 1, 4 do
    if L[d] >= 0 then
      local e, exact = M.earliest(d, L[d] - c[d], s0, W[d])
      if not exact then
        prune_all()
        return reply(2, math.max(e, s) - now, d, c)
      end
      if e > s then s, blocker = e, d end
      -- After lost state: this dimension's window from the latest start anyone saw.
      if c[d] > 0 and S.fs + W[d] > s then s, blocker = S.fs + W[d], d end
    end
  end
  -- The project's spend: the earliest start from s at which every spend window holding it
  -- has room, counting every model's bookings (a later start only frees the model's own
  -- windows, as nothing of this model starts after s).
  if P and PL[4] >= 0 and c[4] > 0 then
    local e, exact = P.earliest(4, PL[4] - c[4], s, PW[4])
    if not exact then
      prune_all()
      return reply(2, math.max(e, s) - now, 4, c)
    end
    if e > s then s, blocker = e, 4 end
    if P.S.fs + PW[4] > s then s, blocker = P.S.fs + PW[4], 4 end
  end
  -- The tenant's ceiling, counting all of its bookings (its cursor follows now, so the
  -- walk holds for any later start), and its budgets. A tenant they hold back waits in
  -- the queue, not in the log: booked past the start the pool gives, it would move the
  -- queue's end for every other tenant (nobody books before the latest start).
  if T then
    local pool_s = s
    for d = 1, 4 do
      if TL[d] >= 0 and c[d] > 0 then
        local e, exact = T.earliest(d, TL[d] - c[d], s, W[d])
        if not exact then
          prune_all()
          return reply(2, math.max(e, s) - now, d, c)
        end
        if e > s then s, blocker = e, d end
        if T.S.fs + W[d] > s then s, blocker = T.S.fs + W[d], d end
      end
    end
    local bs, _, retry = budget(s, blocker)
    if retry or bs > s then
      prune_all()
      return reply(2, (retry or bs) - now, 9, c)
    end
    if s > pool_s then
      prune_all()
      return reply(2, s - now, blocker, c)
    end
  end
  if S.db > s then s, blocker = S.db, 5 end
  if rpd >= 0 then
    if s < S.de and S.dc + c[1] > rpd then s, blocker = S.de, 5 end
    if s >= S.de and (s >= S.da or S.nc + c[1] > rpd) then
      prune_all()
      return reply(2, math.max(s, S.da) - now, 5, c)
    end
  end
  if s - now > max_wait then
    prune_all()
    return reply(2, s - now, blocker, c)
  end
  -- The per-day quota may have moved the start into the next day: the budgets again.
  if T and not within_budget_from(s) then
    prune_all()
    local bs, _, retry = budget(s, blocker)
    return reply(2, math.max(retry or bs, s + 1) - now, 9, c)
  end
  book(s)
  S.ls, S.lb = s, blocker
  for d = 1, 4 do M.advance(d, s - W[d]) end
  prune_all()
  return reply(1, s, 0, c)
elseif op == 'r' or op == 'x' then
  local id, start = ARGV[2], tonumber(ARGV[3])
  local new = nil
  if op == 'r' then
    new = { tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]) }
  end
  local done = 0
  -- What the booking was estimated to cost, for the tenant's budgets.
  local spent = nil
  if not fresh then
    local m = M.booked(id, start)
    if m then
      spent = costs_of(m)[4]
      M.replace(m, id, start, new)
      M.save()
      done = 1
    end
  end
  if P and not P.fresh then
    local pm = P.booked(pid(id), start)
    if pm then
      P.replace(pm, pid(id), start, new and spend_only(new))
      P.save()
      done = 1
    end
  end
  if T and not T.fresh then
    local tm = T.booked(id, start)
    if tm then
      spent = spent or costs_of(tm)[4]
      T.replace(tm, id, start, new)
      T.save()
      done = 1
    end
  end
  -- The budgets are charged what the call cost, or given the estimate back.
  if B and spent and not B.fresh then
    B.tally(start, (new and new[4] or 0) - spent)
    B.save()
  end
  return { done }
elseif op == 'c' then
  -- Just before a booked call: the state must not have been lost, the booking must still
  -- be held (in the project's spend state too), and no cooldown or day block set since it
  -- was booked (a booking made under one starts after it) may forbid it. Replies carry
  -- the generation and latest start (the project state's after them).
  -- ARGV: id, start, the hint (4..8), the day boundaries (9..12), the server (13), the
  -- project state's hint (14, 15), the tenant (16). A booking checked before its start
  -- (the caller's clock ran ahead) may be called from now: no other tenant takes it over.
  local id, start = ARGV[2], tonumber(ARGV[3])
  local h = {}
  for i = 1, 5 do h[i] = tonumber(ARGV[3 + i]) or 0 end
  h[6] = tonumber(ARGV[13]) or 0
  if ARGV[9] then
    M.roll_day({ tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]) })
  end
  local function answer(kind, v, code)
    local pg, pl = 0, 0
    if P then pg, pl = P.S.gen, P.S.ls end
    return { kind, v, code, S.gen, S.ls, S.de, S.dc, S.db, server, pg, pl }
  end
  -- Gives the booking up in both states (the model's state is saved by the caller).
  local function drop()
    local m = (not fresh) and M.booked(id, start)
    if m then M.replace(m, id, start, nil) end
    if P and not P.fresh then
      local pm = P.booked(pid(id), start)
      if pm then P.replace(pm, pid(id), start, nil) end
      P.save()
    end
    if T and not T.fresh then
      local tm = T.booked(id, start)
      if tm then T.replace(tm, id, start, nil) end
      T.save()
    end
    if B and m and not B.fresh then
      B.tally(start, -costs_of(m)[4])
      B.save()
    end
  end
  local lost = M.fence(h)
  if P and P.fence({ tonumber(ARGV[14]) or 0, tonumber(ARGV[15]) or 0, 0, 0, 0, h[6] }) then
    lost = true
  end
  if lost then
    -- Fenced now, so nobody books into the lost window; this ticket is not used.
    drop()
    M.save()
    if P then P.save() end
    return answer(2, -1, 8)
  end
  local m = (not fresh) and M.booked(id, start)
  local held = m and (not P or (not P.fresh and P.booked(pid(id), start)))
    and (not T or (not T.fresh and T.booked(id, start)))
  if not held then
    drop()
    if fresh then return { 2, -1, 8 } end
    M.save()
    return answer(2, -1, 8)
  end
  local until_, code = 0, 0
  if S.cd > now then until_, code = S.cd, 6 end
  if S.db > now and S.db > until_ then until_, code = S.db, 5 end
  if code == 0 then
    if start > S.ck and start > now then
      S.ck = start
      redis.call('HSET', M.st, 'ck', fmt(start))
    end
    return answer(1, 0, 0)
  end
  drop()
  M.save()
  return answer(2, until_ - now, code)
elseif op == 'p' then
  local delay, scope = tonumber(ARGV[2]), ARGV[3]
  M.roll_day({ tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]) })
  if scope == 'd' then
    S.db = math.max(S.db, S.de)
  else
    S.cd = math.max(S.cd, now + delay)
  end
  if scope == 'a' and (S.ac == 0 or now - S.al >= math.floor(win[1] / 2)) then
    S.ac = math.min(CUT_MAX, 1000 - math.floor((1000 - S.ac) * 7 / 10))
    S.al = now
  end
  M.save()
  return { 1 }
elseif op == 'u' then
  -- From the running sums, O(1): they cover the window ending at the latest booking (or
  -- the latest decision); once that booking is a full window old, nothing is left. Spend
  -- is the project's when its state is given.
  -- ARGV: the windows (2..5), then the limits (6..9). The operator reads usage with the
  -- config it has just compiled, so a limit change is applied here, at once, even while
  -- every replica sleeps on its booking and none acquires.
  local W = { tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]) }
  if ARGV[6] then
    local L = { tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]) }
    if P and not P.fresh then
      local PL, PW = project_limits(L, W)
      if P.refit(PL, PW) then P.save() end
    end
    if P then L[4] = -1 end
    if not fresh then
      M.learned(L, W, false)
      if M.refit(L, W) then M.save() end
    end
  end
  local out = { now }
  for d = 1, 4 do
    local w = W[d]
    if fresh or S.ls <= now - w then out[#out + 1] = 0 else out[#out + 1] = math.max(0, sum[d]) end
  end
  if P then
    if P.fresh or P.S.ls <= now - W[4] then out[5] = 0 else out[5] = math.max(0, P.sum[4]) end
  end
  local today = 0
  if now < S.de then today = S.dc end
  out[#out + 1] = math.max(0, S.cd - now)
  out[#out + 1] = math.max(0, S.db - now)
  out[#out + 1] = today
  out[#out + 1] = math.max(0, S.ls - now)
  out[#out + 1] = S.ac
  return out
end
if op == 'n' then
  -- Per tenant: requests started within the window, requests booked ahead, what its
  -- bookings cost today and this month (its day and month rolled over as they would be,
  -- without writing), and how far ahead its latest booking is.
  local n = tonumber(ARGV[2]) or 0
  local w = tonumber(ARGV[3])
  local out = { now }
  -- A day's (or month's) count while it lasts, the next one's once it has come.
  local function current(start, stop, after, count, next_count)
    if now >= start and now < stop then return count end
    if now >= stop and now < after then return next_count end
    return 0
  end
  for j = 1, n do
    local U = open(KEYS[nk + 3 * j - 2], KEYS[nk + 3 * j - 1])
    local UB = open(nil, KEYS[nk + 3 * j], 4)
    local items = redis.call('ZRANGEBYSCORE', U.log, '(' .. fmt(now - w), '+inf', 'WITHSCORES')
    local used, ahead = 0, 0
    for i = 1, #items / 2 do
      local cost = costs_of(items[2 * i - 1])[1]
      if tonumber(items[2 * i]) <= now then used = used + cost else ahead = ahead + cost end
    end
    local S2 = UB.S
    out[#out + 1] = used
    out[#out + 1] = ahead
    out[#out + 1] = current(S2.ds, S2.de, S2.da, S2.dc, S2.nc)
    out[#out + 1] = current(S2.ms, S2.me, S2.ma, S2.mc, S2.mn)
    out[#out + 1] = math.max(0, U.S.ls - now)
  end
  return out
end
return redis.error_reply('pacer limiter: unknown operation ' .. tostring(op))
