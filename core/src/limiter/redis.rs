//! The shared limiter: one Lua script (`acquire.lua`) per decision, one round trip.
//!
//! One [`RedisLimiter`] per process: it is cheap to clone and shares one
//! [`RedisConnection`] (standalone or Cluster), which reconnects by itself. Every call is
//! bounded by a short timeout so a slow Redis cannot stall request handling; the failsafe
//! layer decides what happens then. The `redis` crate's `Script` sends `EVALSHA` (on a
//! cluster, to the primary of the pair's slot) and reloads the script on `NOSCRIPT` (after a
//! `SCRIPT FLUSH`, a restart or a failover to a replica that never ran it).
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::Script;

use super::memory::budget_key;
use super::{
    Blocker, Calendar, Check, Clock, Decision, DimensionUsage, Error, Hint, Limiter, Limits,
    Origin, PacificCalendar, PenaltyScope, QuotaKey, Result, SystemClock, TenantUsage, Ticket,
    Usage, costs_i64, dur_us, us_dur,
};
use crate::connection::RedisConnection;
pub use crate::connection::RedisOptions;
use crate::quota::{Costs, Dim, ModelQuota};

/// The limiter script, loaded once per Redis and run by its SHA.
pub const SCRIPT: &str = include_str!("acquire.lua");

/// The server's id as the script computes it: the first 48 bits (12 hex digits) of
/// `master_replid` in `INFO replication`.
fn server_id(info: &str) -> Option<i64> {
    let hex = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("master_replid:"))?;
    i64::from_str_radix(hex.get(..12)?, 16).ok()
}

/// The shared limiter on Redis (standalone or Cluster: a pair's keys share one slot).
#[derive(Clone)]
pub struct RedisLimiter {
    conn: RedisConnection,
    script: Arc<Script>,
    timeout: Duration,
    calendar: Arc<dyn Calendar>,
    hints: Arc<Mutex<HashMap<QuotaKey, Hint>>>,
    days: Arc<Mutex<[i64; 4]>>,
    /// The server this process last talked to (the first 48 bits of its replication id;
    /// 0: unknown), sent with every decision: a key found empty on another server was
    /// lost with the old one. Standalone only: see `servers`.
    server: Arc<AtomicI64>,
    /// On a cluster, the server each pair's state was last seen on. One process talks to
    /// every primary, so a process-wide "last server" would differ from the next pair's
    /// primary all the time and fence every new pair for nothing; per pair, a pair found
    /// empty on another server than its last one (a primary failed over to a replica that
    /// had not received it) is still caught. What a per-pair record cannot know: a pair
    /// this process never decided for, on a primary replaced before its first decision.
    servers: Arc<Mutex<HashMap<QuotaKey, i64>>>,
}

impl std::fmt::Debug for RedisLimiter {
    // The connection (and the URL's password) stays out of Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Connects to `url` (`redis://`, `rediss://` for TLS, with `user:password@` for ACL
    /// users or `:password@`; any node of a Redis Cluster).
    pub async fn connect(url: &str, options: RedisOptions) -> Result<RedisLimiter> {
        let conn = RedisConnection::open(url, options).await.map_err(|e| {
            if e.is_timeout() {
                Error::Timeout(options.connect_timeout)
            } else {
                e.into()
            }
        })?;
        let limiter = RedisLimiter::from_connection(conn, options);
        limiter.learn_server().await;
        Ok(limiter)
    }

    /// A limiter on an existing connection (share one per process).
    pub fn from_connection(conn: RedisConnection, options: RedisOptions) -> RedisLimiter {
        RedisLimiter {
            conn,
            script: Arc::new(Script::new(SCRIPT)),
            timeout: options.timeout,
            calendar: Arc::new(PacificCalendar),
            hints: Arc::default(),
            days: Arc::default(),
            server: Arc::default(),
            servers: Arc::default(),
        }
    }

    /// The server `key`'s state was last seen on, as sent to the script.
    fn server_for(&self, key: &QuotaKey) -> i64 {
        if self.conn.is_cluster() {
            crate::sync::lock(&self.servers)
                .get(key)
                .copied()
                .unwrap_or(0)
        } else {
            self.server.load(Ordering::Relaxed)
        }
    }

    /// Remembers the server a reply about `key` came from (its field `at`; 0 where INFO is
    /// refused).
    fn saw_server(&self, key: &QuotaKey, reply: &[i64], at: usize) {
        if let Some(&id) = reply.get(at)
            && id > 0
        {
            if self.conn.is_cluster() {
                crate::sync::lock(&self.servers).insert(key.clone(), id);
            } else {
                self.server.store(id, Ordering::Relaxed);
            }
        }
    }

    /// Learns the server before the first decision, so a process that connected before a
    /// restart knows the old server even for keys it has not used yet. (Not on a cluster:
    /// there the server is per pair, learnt from its first decision.)
    async fn learn_server(&self) {
        if self.conn.is_cluster() {
            return;
        }
        let mut conn = self.conn.clone();
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await;
        if let Some(id) = info.ok().as_deref().and_then(server_id) {
            self.server.store(id, Ordering::Relaxed);
        }
    }

    /// Adds one provider call's duration to `pool`'s running totals, which the operator
    /// reads to size the fleet ([`crate::keys::call_times`]).
    pub async fn note_call(&self, pool: &str, took: Duration) -> Result<()> {
        let key = crate::keys::call_times(pool);
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("ms")
            .arg(ms)
            .ignore()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("n")
            .arg(1)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// `pool`'s call totals: (milliseconds, calls), both 0 before the first call.
    pub async fn call_totals(&self, pool: &str) -> Result<(u64, u64)> {
        let mut conn = self.conn.clone();
        let (ms, n): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(crate::keys::call_times(pool))
            .arg("ms")
            .arg("n")
            .query_async(&mut conn)
            .await?;
        Ok((ms.unwrap_or(0), n.unwrap_or(0)))
    }

    /// The same limiter with another calendar (tests: short days).
    pub fn with_calendar(mut self, calendar: Arc<dyn Calendar>) -> RedisLimiter {
        self.calendar = calendar;
        self.days = Arc::default();
        self
    }

    /// The day boundaries around now, recomputed only once a day passes (the tz lookup
    /// costs more than the rest of a decision's client side).
    fn boundaries(&self) -> [i64; 4] {
        let now = SystemClock.now_us();
        let mut days = self.days.lock().unwrap_or_else(|p| p.into_inner());
        if days[1] == 0 || now >= days[1] || now < days[0] {
            *days = self.calendar.boundaries(now);
        }
        *days
    }

    /// What this process last saw of `key`'s state (all zero: nothing yet).
    fn hint(&self, key: &QuotaKey) -> Hint {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    /// The key this process keeps its hint of `key`'s project spend state under.
    fn spend_hint_key(key: &QuotaKey) -> QuotaKey {
        QuotaKey::new(key.project.clone(), "*spend")
    }

    /// The project spend state's hint as the script reads it: generation, latest start.
    fn spend_hint(&self, key: &QuotaKey) -> [i64; 2] {
        let h = self.hint(&Self::spend_hint_key(key));
        [h.generation, h.last_start]
    }

    /// Remembers the project spend state's generation and latest start from a reply's
    /// fields `at`.
    fn set_spend_hint(&self, key: &QuotaKey, reply: &[i64], at: usize) {
        if let (Some(&generation), Some(&last_start)) = (reply.get(at), reply.get(at + 1)) {
            self.set_hint(
                &Self::spend_hint_key(key),
                Hint {
                    generation,
                    last_start,
                    ..Hint::default()
                },
            );
        }
    }

    fn set_hint(&self, key: &QuotaKey, hint: Hint) {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), hint);
    }

    /// The Redis server's `maxmemory-policy`, or `None` where `CONFIG GET` is refused (as
    /// on many managed services: check the provider's settings by hand there). On a
    /// cluster every primary is asked and an unsafe answer from any of them is returned.
    ///
    /// # What Pacer needs from Redis
    ///
    /// - **Eviction must not take limiter keys one at a time.** Each (project, model) has
    ///   two keys, a log and a state hash, and neither carries a TTL (the script prunes the
    ///   log, so they stay small). `noeviction` is the right policy; the `volatile-*`
    ///   policies are safe too, because they only evict keys with a TTL. `allkeys-*`
    ///   policies can evict one key without the other: the limiter notices and fences (each
    ///   limited dimension waits one window), but what only the hash knew (cooldowns, the
    ///   exact day count) is gone. See [`eviction_policy_is_safe`].
    /// - **Persistence is a trade-off.** Without persistence (or with a replica promoted
    ///   before it caught up, or a restore from an older snapshot) the state is lost or
    ///   rolled back. Every replica sends what it last saw (the generation, the latest
    ///   start, the day's count and a per-day block), so the script detects the loss and
    ///   fences once: each limited dimension waits out its own window from the latest start
    ///   anyone saw, or from when the loss was found if that is later (about a minute for
    ///   per-minute limits, ten for spend); the day's count comes back as the most any
    ///   replica saw (a lower bound), and a shared cooldown is lost. A process that never
    ///   talked to the old state cannot tell a wiped Redis from a new one. AOF
    ///   (`appendfsync everysec`) avoids the pause and keeps the state, at the cost of a
    ///   disk write per second.
    pub async fn eviction_policy(&self) -> Result<Option<String>> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let answers = tokio::time::timeout(self.timeout, self.conn.on_every_primary(&cmd))
            .await
            .map_err(|_| Error::Timeout(self.timeout))??;
        let mut policies = Vec::new();
        for (_node, answer) in answers {
            match answer.and_then(|v| Ok(redis::from_redis_value::<Vec<String>>(v)?)) {
                Ok(pair) => policies.extend(pair.get(1).cloned()),
                // The server answered with an error (unknown or renamed command, no
                // permission): the setting cannot be read from here.
                Err(e)
                    if matches!(
                        e.kind(),
                        redis::ErrorKind::Server(
                            redis::ServerErrorKind::ResponseError | redis::ServerErrorKind::NoPerm
                        ) | redis::ErrorKind::Extension
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // On a cluster every primary holds limiter state: the least safe one decides.
        Ok(policies
            .iter()
            .find(|p| !eviction_policy_is_safe(p))
            .or(policies.first())
            .cloned())
    }

    /// Runs one operation on `key`'s state, on its project's spend state with
    /// `project_spend`, and on the states of `tenants` (after them).
    async fn run(
        &self,
        key: &QuotaKey,
        project_spend: bool,
        tenants: &[&str],
        args: Vec<String>,
    ) -> Result<Vec<i64>> {
        let mut inv = self.script.prepare_invoke();
        inv.key(key.log_key()).key(key.state_key());
        if project_spend {
            inv.key(key.spend_log_key()).key(key.spend_state_key());
        }
        for t in tenants {
            inv.key(key.tenant_log_key(t))
                .key(key.tenant_state_key(t))
                .key(key.tenant_budget_key(t));
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn))
            .await
            .map_err(|_| Error::Timeout(self.timeout))?
            .map_err(Error::from)
    }
}

fn args(items: &[&(dyn std::fmt::Display + Sync)]) -> Vec<String> {
    items.iter().map(|a| a.to_string()).collect()
}

/// The tenant state a ticket's operations also act on.
fn ticket_tenants(ticket: &Ticket) -> Vec<&str> {
    ticket.tenant.as_deref().into_iter().collect()
}

fn get(reply: &[i64], i: usize) -> Result<i64> {
    reply
        .get(i)
        .copied()
        .ok_or_else(|| Error::Protocol(format!("reply too short: {reply:?}")))
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn acquire_for(
        &self,
        key: &QuotaKey,
        quota: &ModelQuota,
        asker: super::Asker<'_>,
        request_id: &str,
        costs: Costs,
        max_wait: Duration,
    ) -> Result<Decision> {
        if request_id.is_empty() {
            return Err(Error::Invalid("empty request id".into()));
        }
        let tenant_at = super::tenant_index(quota, asker.tenant)?;
        let l = Limits::of(quota);
        let c = costs_i64(&costs);
        let b = self.boundaries();
        let h = self.hint(key).to_array();
        let project_spend = quota.spend_micros.limit.is_some();
        let ph = self.spend_hint(key);
        let mut argv = args(&[
            &"a",
            &request_id,
            &c[0],
            &c[1],
            &c[2],
            &c[3],
            &dur_us(max_wait),
            &l.limit[0],
            &l.limit[1],
            &l.limit[2],
            &l.limit[3],
            &l.window_us[0],
            &l.window_us[1],
            &l.window_us[2],
            &l.window_us[3],
            &l.per_day,
            &b[0],
            &b[1],
            &b[2],
            &b[3],
            &h[0],
            &h[1],
            &h[2],
            &h[3],
            &h[4],
            &self.server_for(key),
        ]);
        // The project's hint always, so the tenants' part has a fixed place.
        argv.extend(args(&[&ph[0], &ph[1]]));
        argv.extend(args(&[
            &quota.tenants.len(),
            &tenant_at.map_or(0, |i| i + 1),
        ]));
        for t in &quota.tenants {
            let budget = |b: Option<u64>| b.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
            argv.extend(args(&[
                &t.name,
                &t.weight,
                &t.floor_permille,
                &t.ceiling_permille,
                &budget(t.daily_budget_micros),
                &budget(t.monthly_budget_micros),
            ]));
        }
        argv.push(asker.priority.to_string());
        let months = self.calendar.months(crate::limiter::SystemClock.now_us());
        argv.extend(args(&[&months[0], &months[1], &months[2]]));
        // What this process saw of the tenant's budgets: a lost budget hash gets its spend
        // back from it.
        let bkey = tenant_at.map(|i| budget_key(key, &quota.tenants[i].name));
        let bh = bkey
            .as_ref()
            .map_or_else(Hint::default, |k| self.hint(k))
            .budget_array();
        argv.extend(args(&[&bh[0], &bh[1], &bh[2], &bh[3], &bh[4]]));
        let names: Vec<&str> = quota.tenants.iter().map(|t| t.name.as_str()).collect();
        let reply = self.run(key, project_spend, &names, argv).await?;
        self.saw_server(key, &reply, 13);
        if project_spend {
            self.set_spend_hint(key, &reply, 14);
        }
        if let Some((k, h)) = bkey.zip(Hint::budget_from_reply(&reply, 16)) {
            self.set_hint(&k, h);
        }
        let (kind, v, blocker, now) = (
            get(&reply, 0)?,
            get(&reply, 1)?,
            get(&reply, 2)?,
            get(&reply, 3)?,
        );
        let hint = Hint::from_reply(&reply, [4, 5, 10, 11, 12])
            .ok_or_else(|| Error::Protocol(format!("reply too short: {reply:?}")))?;
        self.set_hint(key, hint);
        match kind {
            1 => {
                let mut booked = [0u64; 4];
                for (i, b) in booked.iter_mut().enumerate() {
                    *b = u64::try_from(get(&reply, 6 + i)?).unwrap_or(0);
                }
                let ticket = Ticket {
                    key: key.clone(),
                    request_id: request_id.to_owned(),
                    start_us: v,
                    costs: Costs::from_array(booked),
                    origin: Origin::Shared,
                    project_spend,
                    tenant: tenant_at.map(|_| asker.tenant.to_owned()),
                };
                Ok(if v <= now {
                    Decision::Admitted { ticket }
                } else {
                    Decision::Booked {
                        ticket,
                        wait: us_dur(v - now),
                    }
                })
            }
            2 => Ok(Decision::Rejected {
                retry_after: (v >= 0).then(|| us_dur(v)),
                blocking: Blocker::from_code(blocker)
                    .ok_or_else(|| Error::Protocol(format!("unknown blocker {blocker}")))?,
            }),
            other => Err(Error::Protocol(format!("unknown decision {other}"))),
        }
    }

    async fn check(&self, ticket: &Ticket) -> Result<Check> {
        let rid = ticket.request_id.as_str();
        let h = self.hint(&ticket.key).to_array();
        let b = self.boundaries();
        let mut argv = args(&[
            &"c",
            &rid,
            &ticket.start_us,
            &h[0],
            &h[1],
            &h[2],
            &h[3],
            &h[4],
            &b[0],
            &b[1],
            &b[2],
            &b[3],
            &self.server_for(&ticket.key),
        ]);
        let ph = self.spend_hint(&ticket.key);
        let tenant = ticket.tenant.as_deref().unwrap_or("");
        argv.extend(args(&[&ph[0], &ph[1], &tenant]));
        let r = self
            .run(
                &ticket.key,
                ticket.project_spend,
                &ticket_tenants(ticket),
                argv,
            )
            .await?;
        self.saw_server(&ticket.key, &r, 8);
        if ticket.project_spend && r.len() > 10 {
            self.set_spend_hint(&ticket.key, &r, 9);
        }
        // A check on a state that is gone (and was not fenced) leaves the hint alone, so
        // the next acquire still sees the loss.
        if let Some(hint) = Hint::from_reply(&r, [3, 4, 5, 6, 7]) {
            self.set_hint(&ticket.key, hint);
        }
        match get(&r, 0)? {
            1 => Ok(Check::Go),
            2 => {
                let (v, code) = (get(&r, 1)?, get(&r, 2)?);
                Ok(Check::Cancelled {
                    retry_after: (v >= 0).then(|| us_dur(v)),
                    blocking: Blocker::from_code(code)
                        .ok_or_else(|| Error::Protocol(format!("unknown blocker {code}")))?,
                })
            }
            other => Err(Error::Protocol(format!("unknown check answer {other}"))),
        }
    }

    async fn reconcile(&self, ticket: &Ticket, actual: Costs) -> Result<()> {
        let c = costs_i64(&actual);
        let rid = ticket.request_id.as_str();
        let tenant = ticket.tenant.as_deref().unwrap_or("");
        self.run(
            &ticket.key,
            ticket.project_spend,
            &ticket_tenants(ticket),
            args(&[
                &"r",
                &rid,
                &ticket.start_us,
                &c[0],
                &c[1],
                &c[2],
                &c[3],
                &tenant,
            ]),
        )
        .await?;
        Ok(())
    }

    async fn release(&self, ticket: &Ticket) -> Result<()> {
        let rid = ticket.request_id.as_str();
        let tenant = ticket.tenant.as_deref().unwrap_or("");
        self.run(
            &ticket.key,
            ticket.project_spend,
            &ticket_tenants(ticket),
            args(&[&"x", &rid, &ticket.start_us, &tenant]),
        )
        .await?;
        Ok(())
    }

    async fn penalize(&self, key: &QuotaKey, delay: Duration, scope: PenaltyScope) -> Result<()> {
        let b = self.boundaries();
        let s = match scope {
            PenaltyScope::PerMinute => "m",
            PenaltyScope::PerDay => "d",
            PenaltyScope::Unexplained => "a",
        };
        self.run(
            key,
            false,
            &[],
            args(&[&"p", &dur_us(delay), &s, &b[0], &b[1], &b[2], &b[3]]),
        )
        .await?;
        Ok(())
    }

    async fn tenant_usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Vec<TenantUsage>> {
        if quota.tenants.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = quota.tenants.iter().map(|t| t.name.as_str()).collect();
        let w = Limits::of(quota).window_us[0];
        let r = self
            .run(key, false, &names, args(&[&"n", &names.len(), &w]))
            .await?;
        let at = |i: usize| get(&r, i).map(|v| u64::try_from(v).unwrap_or(0));
        names
            .iter()
            .enumerate()
            .map(|(j, name)| {
                let o = 1 + 5 * j;
                Ok(TenantUsage {
                    tenant: (*name).to_owned(),
                    requests: at(o)?,
                    booked_ahead: at(o + 1)?,
                    spent_today_micros: at(o + 2)?,
                    spent_this_month_micros: at(o + 3)?,
                    queue: us_dur(get(&r, o + 4)?),
                })
            })
            .collect()
    }

    fn day_resets_in(&self) -> Duration {
        super::day_resets_in(&*self.calendar, super::SystemClock.now_us())
    }

    fn failure_domain(&self, key: &QuotaKey) -> String {
        if self.conn.is_cluster() {
            key.hash_tag()
        } else {
            String::new()
        }
    }

    async fn usage(&self, key: &QuotaKey, quota: &ModelQuota) -> Result<Usage> {
        let l = Limits::of(quota);
        let w = l.window_us;
        let r = self
            .run(
                key,
                quota.spend_micros.limit.is_some(),
                &[],
                args(&[
                    &"u",
                    &w[0],
                    &w[1],
                    &w[2],
                    &w[3],
                    &l.limit[0],
                    &l.limit[1],
                    &l.limit[2],
                    &l.limit[3],
                ]),
            )
            .await?;
        let mut dimensions = Vec::with_capacity(4);
        for dim in Dim::ALL {
            dimensions.push(DimensionUsage {
                dim,
                used: u64::try_from(get(&r, 1 + dim.index())?).unwrap_or(0),
                limit: quota.dim(dim).limit,
                window: quota.dim(dim).window,
            });
        }
        Ok(Usage {
            dimensions,
            cooldown_remaining: us_dur(get(&r, 5)?),
            daily_blocked_remaining: us_dur(get(&r, 6)?),
            daily_used: u64::try_from(get(&r, 7)?).unwrap_or(0),
            daily_limit: quota.requests_per_day,
            queue: us_dur(get(&r, 8)?),
            // Absent in a reply from a script before it (a mixed-version fleet).
            rate_cut_permille: get(&r, 9).map_or(0, |c| u32::try_from(c).unwrap_or(0)),
        })
    }
}

/// Whether a `maxmemory-policy` keeps the limiter's state whole: `noeviction`, or a
/// `volatile-*` policy (limiter keys carry no TTL, so those never evict them). `allkeys-*`
/// policies may evict one limiter key without the other, and an unknown policy is not
/// trusted. See [`RedisLimiter::eviction_policy`] for what Pacer needs from Redis.
pub fn eviction_policy_is_safe(policy: &str) -> bool {
    let p = policy.trim().to_ascii_lowercase();
    p == "noeviction" || p.starts_with("volatile-")
}

#[cfg(test)]
mod tests {
    use super::eviction_policy_is_safe;

    #[test]
    fn eviction_policies() {
        for p in [
            "noeviction",
            "volatile-lru",
            "volatile-lfu",
            "volatile-ttl",
            "volatile-random",
            "NoEviction",
        ] {
            assert!(eviction_policy_is_safe(p), "{p}");
        }
        for p in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "",
            "something-new",
        ] {
            assert!(!eviction_policy_is_safe(p), "{p}");
        }
    }
}
