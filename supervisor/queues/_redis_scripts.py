"""Key names and the Lua scripts of the Redis queue (see ``redis.py`` for how they fit).

Every step that must not be seen half done is one script: Redis runs a script atomically,
so a pod killed between two commands cannot leave a batch acked but uncounted, or counted
but still pending. All keys of a job share the hash tag ``{<job_id>}`` (one cluster slot).

Entry ids are ``0-<seq + 1>``: a batch's stream id says its ``seq`` without a field.
"""

from __future__ import annotations

from typing import NamedTuple

from supervisor.jobs import END_STATES

__all__ = [
    "CLAIM",
    "COMMIT",
    "COMPLETE_CLAIM",
    "COMPLETE_DONE",
    "COMPLETE_RELEASE",
    "COMPLETE_RENEW",
    "COUNTERS",
    "CREATE",
    "GIVE_BACK",
    "GIVE_BACK_SOME",
    "GROUP",
    "HEARTBEAT",
    "JOBS",
    "JOIN",
    "JOINABLE",
    "LEAVE",
    "PODS",
    "READ_COUNTERS",
    "RENEW",
    "RUNNING",
    "SET_STATUS",
    "JobKeys",
    "as_bytes",
    "entry_id",
    "job_keys",
    "seq_of",
]

GROUP = b"dispatch"  # the one consumer group of every job stream
JOBS = "supervisor:jobs"  # the set of job ids
RUNNING = "supervisor:running"  # hash: job_id -> api_name, of the jobs whose status is running
# stream: one entry (api, job) each time a job may have become joinable (it started running,
# a pod left it); idle workers block on it (XREAD BLOCK from the last id each has seen).
JOINABLE = "supervisor:joinable"
JOINABLE_MAXLEN = 100  # entries kept (about): a waiter only needs those after its last id
RETURNED = "returned"  # the consumer that holds batches given back on close (free to claim)

# The counters every script returns, in this order, after its changes.
COUNTERS = ("total_batches", "succeeded", "dead", "failed_attempts", "time_per_batch_sum")


class JobKeys(NamedTuple):
    job: str  # hash: the JobRecord's fields
    stream: str  # the batches not resolved yet (acked and dead entries are deleted)
    attempts: str  # hash: seq -> the failed attempts' records, one JSON per line
    dead: str  # stream: one entry per dead batch (seq, body, attempts)
    complete: str  # the /on-job-complete claim
    returned: str  # set: ids given back by a feed that left, claimable uncounted
    pods: str  # hash: pod_id -> "<state> <ms of Redis TIME> <lease ms>", the last heartbeat
    lost: str  # hash: seq -> how many of the batch's deliveries were lost with their consumer
    enqueuer: str  # set while a process enqueues the job, with a lease it renews per chunk


def job_keys(job_id: str) -> JobKeys:
    p = f"supervisor:{{{job_id}}}:"
    return JobKeys(*(p + k for k in JobKeys._fields))


def as_bytes(value: str | bytes) -> bytes:
    """A reply of a client made with ``decode_responses=False`` (typed ``str | bytes``)."""
    return value if isinstance(value, bytes) else value.encode()


def entry_id(seq: int) -> bytes:
    return b"0-%d" % (seq + 1)


def seq_of(entry: bytes) -> int:
    return int(entry.partition(b"-")[2]) - 1


_JOINABLE_LUA = f"""
local function joinable(key, api, job_id)
  redis.call('XADD', key, 'MAXLEN', '~', {JOINABLE_MAXLEN}, '*', 'api', api, 'job', job_id)
end
"""

_COUNTERS_LUA = """
local function counters(job)
  return redis.call('HMGET', job, 'total_batches', 'succeeded', 'dead', 'failed_attempts',
                    'time_per_batch_sum')
end
local function body_of(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then return nil end
  local f = e[1][2]
  for i = 1, #f, 2 do if f[i] == 'body' then return f[i + 1] end end
  return nil
end
local function dead_letter(stream, attempts, dead, job, id, records)
  -- Move the batch to the dead-letter stream with every attempt's record, ack and count it.
  local body = body_of(stream, id)
  local seq = tonumber(string.sub(id, 3)) - 1
  redis.call('XADD', dead, '*', 'seq', seq, 'body', body or '', 'attempts', records)
  redis.call('XACK', stream, ARGV[1], id)
  redis.call('XDEL', stream, id)
  redis.call('HDEL', attempts, seq)
  redis.call('HINCRBY', job, 'dead', 1)
end
"""

# KEYS: job. Returns the counters.
READ_COUNTERS = (
    _COUNTERS_LUA
    + """
return counters(KEYS[1])
"""
)

# KEYS: job, index, enqueuer. ARGV: job_id, api_name, digest, spec_json, created_time,
# enqueue lease (ms): the job is never seen enqueuing without its enqueuer's lease.
# Returns 0 if the job exists already.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'api_name', ARGV[2], 'digest', ARGV[3], 'spec_json', ARGV[4],
           'status', 'enqueuing', 'created_time', ARGV[5], 'succeeded', 0, 'dead', 0,
           'failed_attempts', 0, 'time_per_batch_sum', 0)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
return 1
"""

# KEYS: job, running, joinable. ARGV: status, start_time, end_time, worker_counts ('' =
# keep), job_id, running (the status that puts a job in the running index). 0 if no job,
# -1 if it has ended already: an end state is final (a pod that joined just before a stop,
# or before the last pod recorded `succeeded`, must not make the job run again), else 1.
# The start time is set once: every pod that joins a shared job marks it running, and the
# job started with the first. The running index (job_id -> api_name) changes with the
# status, so an idle worker reads the running jobs only. A job that starts running (it was
# not) is announced on the joinable stream; the pods joining it later, which mark it
# running again, are not (they would wake every idle worker for nothing).
SET_STATUS = (
    _JOINABLE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local was = redis.call('HGET', KEYS[1], 'status')
local ended = {"""
    + ", ".join(f"['{s}'] = true" for s in sorted(END_STATES))
    + """}
if ended[was] then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[1], 'start_time', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'end_time', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'worker_counts', ARGV[4]) end
if ARGV[1] == ARGV[6] then
  local api = redis.call('HGET', KEYS[1], 'api_name')
  redis.call('HSET', KEYS[2], ARGV[5], api)
  if was ~= ARGV[6] then joinable(KEYS[3], api, ARGV[5]) end
else
  redis.call('HDEL', KEYS[2], ARGV[5])
end
return 1
"""
)

# The committer's one round trip: failures and acks reported since the last commit.
# KEYS: job, stream, attempts, dead.
# ARGV: group, consumer, max_attempts, n_failures, then n_failures triples (id, attempt,
# record), then pairs (id, elapsed) for acks. Failures go first: a batch's failures always
# come before its ack.
# A failure applies only while the entry is this consumer's and its delivery count is the
# attempt that failed (a retried commit is not applied twice); then the attempt's record is
# kept and the batch is dead-lettered if that was the last allowed delivery, else its
# delivery count is raised for the next attempt (it stays with us). An ack counts only if
# XACK removed the entry (a batch acked by two pods that both held it counts once).
# Returns {status per failure (1 retry, 0 dead, -1 stale)}, then the counters.
COMMIT = (
    _COUNTERS_LUA
    + """
local job, stream, attempts, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n_failures = tonumber(ARGV[4])
local out = {}
local i = 5
for _ = 1, n_failures do
  local id, attempt, record = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  i = i + 3
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 or p[1][2] ~= me or p[1][4] ~= attempt then
    table.insert(out, -1)
  else
    redis.call('HINCRBY', job, 'failed_attempts', 1)
    local seq = tonumber(string.sub(id, 3)) - 1
    local prev = redis.call('HGET', attempts, seq)
    local records = prev and (prev .. '\\n' .. record) or record
    if attempt >= max then
      dead_letter(stream, attempts, dead, job, id, records)
      table.insert(out, 0)
    else
      redis.call('HSET', attempts, seq, records)
      redis.call('XCLAIM', stream, group, me, 0, id, 'RETRYCOUNT', attempt + 1, 'JUSTID')
      table.insert(out, 1)
    end
  end
end
local ok, time = 0, 0
while i <= #ARGV do
  local id = ARGV[i]
  if redis.call('XACK', stream, group, id) == 1 then
    ok = ok + 1
    time = time + tonumber(ARGV[i + 1])
    redis.call('XDEL', stream, id)
    redis.call('HDEL', attempts, tonumber(string.sub(id, 3)) - 1)
  end
  i = i + 2
end
if ok > 0 then
  redis.call('HINCRBY', job, 'succeeded', ok)
  redis.call('HINCRBYFLOAT', job, 'time_per_batch_sum', time)
end
for _, v in ipairs(counters(job)) do table.insert(out, v) end
return out
"""
)

# Take over batches whose lease ran out (their consumer died or was cut off) or that a
# leaving feed gave back. KEYS: job, stream, attempts, dead, returned, lost. ARGV: group,
# consumer, min_idle_ms, count, max_attempts, time (RFC3339, for a lost attempt's record),
# count_lost ('1' or '0'), cap (LOST_DELIVERY_CAP).
# A given-back batch keeps its delivery count. A lost delivery is recorded, then decided as
# base.after_lost_delivery decides it: with count_lost it is a failed attempt (the delivery
# count XAUTOCLAIM raised is the next attempt) and a batch whose deliveries are used up is
# dead-lettered; without, the delivery count is put back (the same attempt again) until the
# batch's lost deliveries reach the cap, and then it is dead-lettered, counted as one failed
# attempt. The delivery count stays the attempt number, which COMMIT checks.
# Returns {n, then n triples (id, body, attempt)}, then the counters.
CLAIM = (
    _COUNTERS_LUA
    + """
local job, stream, attempts, dead, returned, lostk = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
local group, me, max = ARGV[1], ARGV[2], tonumber(ARGV[5])
local count_lost, cap = ARGV[7] == '1', tonumber(ARGV[8])
local want = tonumber(ARGV[4])
local got = {}
-- XAUTOCLAIM looks at no more than COUNT * 10 pending entries per call: follow its cursor,
-- or a batch given back (or whose lease ran out) behind many held ones is not found.
local cursor = '0-0'
repeat
local r = redis.call('XAUTOCLAIM', stream, group, me, ARGV[3], cursor, 'COUNT',
                     want - math.floor(#got / 3))
cursor = r[1]
for _, e in ipairs(r[2]) do
  local id = e[1]
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  local count = p[1][4]
  local seq = tonumber(string.sub(id, 3)) - 1
  local body = ''
  for k = 1, #e[2], 2 do if e[2][k] == 'body' then body = e[2][k + 1] end end
  local records = redis.call('HGET', attempts, seq)
  local is_dead = false
  if redis.call('SREM', returned, id) == 1 then
    count = math.max(1, count - 1)
    redis.call('XCLAIM', stream, group, me, 0, id, 'RETRYCOUNT', count, 'JUSTID')
  elseif count > 1 then
    -- the previous delivery was lost with its consumer
    local attempt = count - 1
    local lost = redis.call('HINCRBY', lostk, seq, 1)
    local error = 'lease expired: its consumer stopped renewing it'
    if not count_lost then
      error = error .. ' (lost delivery ' .. lost .. ' of at most ' .. cap .. ')'
    end
    local record = cjson.encode({attempt = attempt, error = error, time = ARGV[6]})
    records = records and (records .. '\\n' .. record) or record
    if count_lost then
      redis.call('HINCRBY', job, 'failed_attempts', 1)
      is_dead = count > max
    elseif lost >= cap then
      redis.call('HINCRBY', job, 'failed_attempts', 1)
      is_dead = true
    else
      count = attempt
      redis.call('XCLAIM', stream, group, me, 0, id, 'RETRYCOUNT', count, 'JUSTID')
    end
  end
  if is_dead or count > max then
    dead_letter(stream, attempts, dead, job, id, records or '')
  else
    if records then redis.call('HSET', attempts, seq, records) end
    table.insert(got, id)
    table.insert(got, body)
    table.insert(got, count)
  end
end
until cursor == '0-0' or math.floor(#got / 3) >= want
local out = {#got / 3}
for _, v in ipairs(got) do table.insert(out, v) end
for _, v in ipairs(counters(job)) do table.insert(out, v) end
return out
"""
)

# Renew the lease of the batches this consumer holds: reset their idle time without counting
# a delivery. KEYS: stream. ARGV: group, consumer, then the ids held. Returns those still
# this consumer's (others lost their lease and were claimed). Entries pending for this
# consumer that it does not know of (a read whose reply was lost) are not renewed: they are
# claimed after the lease like a dead consumer's.
RENEW = """
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then table.insert(mine, ARGV[i]) end
end
for i = 1, #mine, 1000 do
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for k = i, math.min(i + 999, #mine) do table.insert(args, mine[k]) end
  table.insert(args, 'JUSTID')
  redis.call('XCLAIM', unpack(args))
end
return mine
"""

# On leaving a feed: give back everything still pending for it (what it held unresolved,
# and what a read cut short left with it), claimable at once and uncounted (see CLAIM),
# then forget the consumer. KEYS: stream, returned. ARGV: group, consumer.
GIVE_BACK = (
    """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', stream) == 0 then return 0 end
local mine = redis.call('XPENDING', stream, group, '-', '+', 1000000, me)
for _, p in ipairs(mine) do
  redis.call('XCLAIM', stream, group, '"""
    + RETURNED
    + """', 0, p[1], 'IDLE', 1000000000, 'JUSTID')
  redis.call('SADD', KEYS[2], p[1])
end
redis.call('XGROUP', 'DELCONSUMER', stream, group, me)
return #mine
"""
)

# Give back some batches a feed read ahead and did not hand out (its consumer stopped
# asking): as GIVE_BACK does on leaving, claimable at once and uncounted, but only the ids
# given that are still this consumer's, and the consumer stays. KEYS: stream, returned.
# ARGV: group, consumer, then the ids. Returns how many were given back.
GIVE_BACK_SOME = (
    """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == me then
    redis.call('XCLAIM', stream, group, '"""
    + RETURNED
    + """', 0, ARGV[i], 'IDLE', 1000000000, 'JUSTID')
    redis.call('SADD', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"""
)

# The one /on-job-complete: claimed when the job is enqueued and its stream is empty
# (nothing pending, nothing in flight: acked and dead entries are deleted).
# KEYS: job, stream, complete. ARGV: owner, lease_ms. Returns 1 if claimed.
COMPLETE_CLAIM = """
local total = redis.call('HGET', KEYS[1], 'total_batches')
if not total then return 0 end
if redis.call('XLEN', KEYS[2]) > 0 then return 0 end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: complete. ARGV: owner, lease_ms. Returns 1 if the claim is still ours.
COMPLETE_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: complete. ARGV: owner. The call was made: the job is completed for good.
COMPLETE_DONE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'done:' .. ARGV[1])
return 1
"""

# KEYS: complete. ARGV: owner. The call did not happen: another pod may claim it.
COMPLETE_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


# Pods sharing a job. Times are Redis's own (TIME), so the pods' clocks never matter. A pod
# is live while heard from within its lease and not in a final state; one silent for
# GONE leases is deleted (and the whole hash expires when every pod is that silent).
_PODS_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local final = {failed = true, killed_oom = true, stopped = true}
local function parse(v)
  local state, at, lease = string.match(v, '^(%S+) (%d+) (%d+)$')
  return state, tonumber(at), tonumber(lease)
end
local function beat(key, pod, state, lease, gone)
  redis.call('HSET', key, pod, state .. ' ' .. now_ms() .. ' ' .. lease)
  redis.call('PEXPIRE', key, lease * gone)
end
"""

# KEYS: pods. ARGV: pod_id, state, lease_ms, gone (leases).
HEARTBEAT = (
    _PODS_LUA
    + """
beat(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
)

# lifecycle.may_join, atomically: admit the pod (as 'creating') while fewer than `workers`
# other pods are live. KEYS: pods. ARGV: pod_id, workers, lease_ms, gone. Returns 1 if in.
JOIN = (
    _PODS_LUA
    + """
local now, gone = now_ms(), tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
local live = 0
for i = 1, #all, 2 do
  local state, at, lease = parse(all[i + 1])
  local age = now - at
  if age > lease * gone then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] and age <= lease and not final[state] then
    live = live + 1
  end
end
if live >= tonumber(ARGV[2]) then return 0 end
beat(KEYS[1], ARGV[1], 'creating', tonumber(ARGV[3]), gone)
return 1
"""
)

# A pod leaves a job: its place is free at once, which is announced on the joinable stream
# while the job runs. KEYS: pods, job, joinable. ARGV: pod_id, job_id, running. Returns 1 if
# the pod was there.
LEAVE = (
    _JOINABLE_LUA
    + """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local job = redis.call('HMGET', KEYS[2], 'status', 'api_name')
if job[1] == ARGV[3] and job[2] then joinable(KEYS[3], job[2], ARGV[2]) end
return 1
"""
)

# KEYS: pods. Returns a flat list: pod_id, state, age_ms, lease_ms for each pod.
PODS = (
    _PODS_LUA
    + """
local now = now_ms()
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local state, at, lease = parse(all[i + 1])
  table.insert(out, all[i])
  table.insert(out, state)
  table.insert(out, now - at)
  table.insert(out, lease)
end
return out
"""
)
