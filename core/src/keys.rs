//! Every Redis key Pacer writes, in one place, and the hash tag each one carries.
//!
//! The same names serve a standalone Redis and a Redis Cluster. A cluster hashes only the
//! part of a key between the first `{` and the next `}` (its hash tag) when there is one,
//! so keys that one script or one `MULTI` touches together carry the same tag and live in
//! one slot. Tags are chosen on purpose: as wide as atomicity needs, no wider, so the load
//! spreads over every primary.
//!
//! | key | type | hash tag | touched together with |
//! |---|---|---|---|
//! | `{pacer:<project>}:<model>:log` | sorted set | `pacer:<project>` | `…:<model>:st` and the project's spend keys, in every limiter decision (`acquire.lua`) |
//! | `{pacer:<project>}:<model>:st` | hash | `pacer:<project>` | as above |
//! | `{pacer:<project>}:*spend:log` | sorted set | `pacer:<project>` | `…:*spend:st` and one model's two keys, in a decision of a pool that limits spend |
//! | `{pacer:<project>}:*spend:st` | hash | `pacer:<project>` | as above |
//! | `{pacer:<project>}:<model>:*t:<tenant>:log` | sorted set | `pacer:<project>` | `…:*t:<tenant>:st` and the model's keys: a tenant's bookings of a model (its ceiling, its share), in a decision of a pool with tenants (every tenant's, for fair shares) |
//! | `{pacer:<project>}:<model>:*t:<tenant>:st` | hash | `pacer:<project>` | as above |
//! | `{pacer:<project>}:*t:<tenant>:budget` | hash | `pacer:<project>` | the tenant's states: its spend per day and per month, over every model |
//! | `{pacer:config}:pools` | hash | `pacer:config` | the other two config keys, in one `MULTI` |
//! | `{pacer:config}:chains` | hash | `pacer:config` | as above |
//! | `{pacer:config}:version` | integer | `pacer:config` | as above |
//! | `pacer:alert:account:<pool>` | string, TTL | none | nothing (one `SET`, one `GET`) |
//! | `pacer:calls:<pool>` | hash (`ms`, `n`) | none | nothing (two `HINCRBY` in a pipeline) |
//! | `{pacer:<id>}:result` | string (JSON), TTL 15 days | `pacer:<id>` | `…:claim`, when the record is stored and the claim dropped in one script |
//! | `{pacer:<id>}:claim` | string, TTL (lease) | `pacer:<id>` | `…:result` |
//!
//! One project is one slot: Google's spend limit is the project's, shared by its models, so
//! a decision books the model's windows and the project's spend in one script on one node.
//! A cluster spreads a fleet's projects over its primaries (one busy project needs well
//! under one core: about 100 decisions a second at Tier 3). The compiled config is one
//! slot: it is small and read rarely (a `GET` of the version twice a second per replica,
//! the hashes only when it moves). Each request's record and claim share a slot of their
//! own, so records spread evenly. The tags start with `pacer:`, so a tag is never empty
//! (an empty `{}` is no tag at all: the whole key would be hashed) whatever an id holds;
//! an id that itself contains `}` only shortens the tag, the same way for both keys.
//!
//! Result records and claims may live in a Redis of their own (`PACER_RECORDS_REDIS_URL`);
//! everything else lives in the limiter's. The account alert is read with the config, so
//! it is written to the limiter's Redis too.
//!
//! Until issue 14 the config keys were `pacer:config:{pools,chains,version}` and records
//! `pacer:result:<id>` and `pacer:claim:<id>` (both cross-slot on a cluster). After an
//! upgrade the operator writes the config again on its next resync (or run `pacer apply`
//! again); records written before it are not found, so a redelivery of an old request runs
//! again, and the sink's check (an object found carrying the request's id) still keeps it
//! from being generated twice.
//!
//! Until issue 13 a limiter state's tag was `pacer:<project>:<model>`; a project's spend
//! is shared by its models, so the tag is now the project's (see the README on upgrading:
//! old and new workers must not run side by side).

// The compiled config's three keys share the tag `pacer:config`: they change in one `MULTI`.

/// The hash of pools: name (`namespace/name`) → JSON `CompiledPool`.
pub const POOLS_KEY: &str = "{pacer:config}:pools";
/// The hash of chains: name (`namespace/name`) → JSON `CompiledChain`.
pub const CHAINS_KEY: &str = "{pacer:config}:chains";
/// The config version, bumped in the same transaction as every change.
pub const VERSION_KEY: &str = "{pacer:config}:version";

/// The hash tag of a project's limiter keys (every model's, and the project's spend).
pub fn limiter_tag(project: &str) -> String {
    format!("{{pacer:{project}}}")
}

/// The prefix of one limiter state's two keys (`…:log`, `…:st`): a model of a project, or
/// with `model` `None` the project's spend state. `*` is in no model id.
pub fn limiter_state(project: &str, model: Option<&str>) -> String {
    format!("{}:{}", limiter_tag(project), model.unwrap_or("*spend"))
}

/// A tenant's budgets in a project (its spend per day and per month, over every model): a
/// hash in the project's slot.
pub fn tenant_budget(project: &str, tenant: &str) -> String {
    format!("{}:*t:{tenant}:budget", limiter_tag(project))
}

/// A pool's account alert (a revoked key, spent credit): set with a TTL by the replica
/// that met it, read by every replica and the operator.
pub fn account_alert(pool: &str) -> String {
    format!("pacer:alert:account:{pool}")
}

/// A pool's provider calls so far, summed by every replica (`ms` taken, `n` calls): the
/// operator sizes the fleet from their latest mean.
pub fn call_times(pool: &str) -> String {
    format!("pacer:calls:{pool}")
}

/// A request's final result record.
pub fn result(id: &str) -> String {
    format!("{{pacer:{id}}}:result")
}

/// Which replica is generating a request right now (with a lease).
pub fn claim(id: &str) -> String {
    format!("{{pacer:{id}}}:claim")
}

/// The hash tag a key is placed by in a cluster: between the first `{` and the next `}`
/// if that is not empty, else the whole key (Redis's rule).
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_used_together_share_a_hash_tag() {
        for k in [POOLS_KEY, CHAINS_KEY, VERSION_KEY] {
            assert_eq!(hash_tag(k), "pacer:config", "{k}");
        }
        for id in ["r1", "}", "}x", "a}b", "{x}", "", "ns-r{7}"] {
            assert_eq!(hash_tag(&result(id)), hash_tag(&claim(id)), "id {id:?}");
            assert!(hash_tag(&result(id)).starts_with("pacer:"), "id {id:?}");
        }
        assert_ne!(hash_tag(&result("a")), hash_tag(&result("b")));
        let log = format!("{}:log", limiter_state("p", Some("m")));
        let st = format!("{}:st", limiter_state("p", Some("m")));
        let spend = format!("{}:st", limiter_state("p", None));
        assert_eq!(hash_tag(&log), hash_tag(&st));
        assert_eq!(hash_tag(&log), hash_tag(&spend));
        assert_eq!(hash_tag(&log), "pacer:p");
        assert_ne!(hash_tag(&log), hash_tag(&limiter_state("q", Some("m"))));
    }

    #[test]
    fn the_hash_tag_follows_redis() {
        assert_eq!(hash_tag("{user1000}.following"), "user1000");
        assert_eq!(hash_tag("foo{}{bar}"), "foo{}{bar}");
        assert_eq!(hash_tag("foo{{bar}}zap"), "{bar");
        assert_eq!(hash_tag("foo{bar}{zap}"), "bar");
        assert_eq!(hash_tag("plain"), "plain");
    }
}
