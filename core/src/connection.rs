//! One way into Redis for everything Pacer keeps there (limiter, compiled config, result
//! records and claims): a standalone server, or a Redis Cluster found from any one of its
//! nodes.
//!
//! The user gives one URL (`redis://` or `rediss://`, with `user:password@` for an ACL user
//! or `:password@`). [`RedisConnection::open`] asks that node `INFO cluster`: with
//! `cluster_enabled:1` it opens the redis crate's cluster client (which learns the slot map
//! from that node, follows `MOVED` and `ASK`, and refreshes the map when a primary fails and
//! its replica is promoted); otherwise a `ConnectionManager` (one multiplexed connection that
//! reconnects by itself). Managed cluster-mode services (ElastiCache and its Serverless
//! flavour, Memorystore Cluster, cluster-mode Valkey) are clusters like any other here.
//!
//! Both kinds implement [`redis::aio::ConnectionLike`], so commands, pipelines and scripts
//! run on either unchanged. On a cluster every multi-key operation must keep its keys in
//! one slot: [`crate::keys`] names every key and its hash tag, and nothing in Pacer uses
//! `KEYS` or a script over keys of two slots. Commands about the server rather than a key
//! (`INFO`, `CONFIG GET`) go to every primary through [`RedisConnection::on_every_primary`].
//! Where `INFO` is refused, `CLUSTER INFO` decides.
use std::time::Duration;

use redis::{
    Cmd, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo},
};

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct RedisOptions {
    /// The most one command may take, round trip included.
    pub timeout: Duration,
    /// The most one (re)connection attempt may take.
    pub connect_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A connection to a standalone Redis or to a Redis Cluster. Cheap to clone: clones share
/// one connection (standalone) or one set of node connections (cluster).
#[derive(Clone)]
pub enum RedisConnection {
    /// One server (or a failover address in front of one primary).
    Standalone(ConnectionManager),
    /// A Redis Cluster: commands go to the primary of their key's slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    // Nothing of the URL (and its password) is kept, so there is nothing to hide: only the
    // kind is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConnection::Standalone(_) => "RedisConnection::Standalone",
            RedisConnection::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl RedisConnection {
    /// Connects to `url`, detecting cluster mode from that node (`INFO cluster`, or
    /// `CLUSTER INFO` where `INFO` is refused). Every attempt is bounded by
    /// `options.connect_timeout`, every command by `options.timeout`.
    pub async fn open(url: &str, options: RedisOptions) -> RedisResult<RedisConnection> {
        let client = redis::Client::open(url)?;
        if is_cluster(&client, options).await? {
            let cluster = ClusterClientBuilder::new([url])
                .connection_timeout(options.connect_timeout)
                .response_timeout(options.timeout)
                // A failover takes the cluster's node timeout plus an election (seconds);
                // commands meanwhile fail fast and the caller's failure mode decides, while
                // the client keeps refreshing the slot map in the background.
                .retries(2)
                .min_retry_wait(50)
                .max_retry_wait(1000)
                .build()?;
            let conn = timed(options.connect_timeout, cluster.get_async_connection()).await?;
            return Ok(RedisConnection::Cluster(conn));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = timed(
            options.connect_timeout,
            client.get_connection_manager_with_config(config),
        )
        .await?;
        Ok(RedisConnection::Standalone(conn))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// Runs a command about the server rather than a key (`INFO`, `CONFIG GET`, `SCAN`) on the one
    /// server, or on every primary of a cluster: each node's answer (or its error) with the
    /// node's address (`""` for a standalone server).
    pub async fn on_every_primary(
        &self,
        cmd: &Cmd,
    ) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
        match self {
            RedisConnection::Standalone(conn) => {
                let answer = cmd.query_async::<Value>(&mut conn.clone()).await;
                Ok(vec![(String::new(), answer)])
            }
            RedisConnection::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let answer = conn.clone().route_command(cmd.clone(), routing).await?;
                // Without a response policy the cluster client answers a map of node
                // address to that node's reply, a refusal kept as a server error.
                let Value::Map(pairs) = answer else {
                    return Err(RedisError::from((
                        redis::ErrorKind::Client,
                        "a command on every primary did not answer per node",
                    )));
                };
                Ok(pairs
                    .into_iter()
                    .map(|(node, v)| {
                        let node = redis::from_redis_value::<String>(node).unwrap_or_default();
                        let v = match v {
                            Value::ServerError(e) => Err(RedisError::from(e)),
                            v => Ok(v),
                        };
                        (node, v)
                    })
                    .collect())
            }
        }
    }
}

/// Whether the node at `client` runs in cluster mode: `cluster_enabled:1` in `INFO
/// cluster`, or, where `INFO` is refused (a renamed or forbidden command), an answer to
/// `CLUSTER INFO` (a standalone server refuses it: "cluster support disabled"). A server
/// that refuses both is taken as standalone.
async fn is_cluster(client: &redis::Client, options: RedisOptions) -> RedisResult<bool> {
    let mut probe = timed(
        options.connect_timeout,
        client.get_multiplexed_async_connection(),
    )
    .await?;
    let limit = options.timeout.max(options.connect_timeout);
    let refused = |e: &RedisError| {
        matches!(
            e.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        )
    };
    let info = timed(
        limit,
        redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut probe),
    )
    .await;
    match info {
        Ok(info) => return Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1")),
        Err(e) if !refused(&e) => return Err(e),
        Err(_) => {}
    }
    let cluster_info = timed(
        limit,
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut probe),
    )
    .await;
    match cluster_info {
        Ok(info) => Ok(info.contains("cluster_state:")),
        Err(e) if refused(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `fut`, failing with a timeout error once `limit` passes.
async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("Redis did not answer within {limit:?}"),
        )))
    })
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Standalone(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Standalone(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}
