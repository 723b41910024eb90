//! End-to-end tests of Pacer against real services started by `tests/rig/up`.
//!
//! [`Rig`] reads the addresses `tests/rig/up` wrote; a test that needs a service the rig
//! did not start fails with a message saying how to start it.
use std::{collections::HashMap, path::PathBuf};

/// The addresses of the rig's services.
#[derive(Debug, Clone)]
pub struct Rig {
    vars: HashMap<String, String>,
}

impl Rig {
    /// The file `tests/rig/up` writes: `$PACER_RIG_ENV`, else `.rig/env` in the repo.
    pub fn env_file() -> PathBuf {
        std::env::var_os("PACER_RIG_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| Self::repo_root().join(".rig/env"))
    }

    /// Loads the rig's addresses, or panics with how to start the rig.
    pub fn load() -> Rig {
        let path = Self::env_file();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the test rig is not running ({}: {e}); start it with `tests/rig/up` \
                 (or run the whole suite with `tests/run`)",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('\'').to_owned()))
            .collect();
        Rig { vars }
    }

    /// One address, or a panic naming the missing variable and how to start the rig.
    pub fn get(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_else(|| {
            panic!(
                "{name} is missing from {}: the rig did not start that service; run `tests/rig/up`",
                Self::env_file().display()
            )
        })
    }
}

/// Which of the rig's Redis a test runs on: tests that take either run on both (see
/// [`on_both_redis!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    /// The single server (`REDIS_URL`).
    Single,
    /// The three-primary Redis Cluster (`REDIS_CLUSTER_URL`, one of its nodes).
    Cluster,
}

impl RedisKind {
    /// The rig variable holding its URL.
    pub fn env(self) -> &'static str {
        match self {
            RedisKind::Single => "REDIS_URL",
            RedisKind::Cluster => "REDIS_CLUSTER_URL",
        }
    }
}

/// Runs each named `async fn name(kind: RedisKind)` as two tests, `name::single` and
/// `name::cluster`, one per Redis of the rig.
#[macro_export]
macro_rules! on_both_redis {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn single() {
                super::$name($crate::RedisKind::Single).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::$name($crate::RedisKind::Cluster).await
            }
        }
    )*};
}

/// A connection to the Redis at `url` that routes by key on a cluster (a test's raw
/// commands: `DEL`, `DUMP`, `PTTL`, `GET`…), or a panic saying how to start the rig.
pub async fn redis_at(url: &str) -> pacer_core::connection::RedisConnection {
    pacer_core::connection::RedisConnection::open(
        url,
        pacer_core::connection::RedisOptions {
            timeout: std::time::Duration::from_secs(5),
            connect_timeout: std::time::Duration::from_secs(5),
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!("cannot reach Redis at {url} ({e}); is the rig up? run `tests/rig/up`")
    })
}

/// The keys matching `pattern` on every primary (`SCAN`, node by node: a cluster has no
/// one keyspace, and Pacer itself never lists keys).
pub async fn scan_keys(
    conn: &pacer_core::connection::RedisConnection,
    pattern: &str,
) -> Vec<String> {
    let mut scan = redis::cmd("SCAN");
    // One SCAN call per node with a count large enough for a test's keyspace.
    scan.arg(0)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1_000_000);
    let mut keys = Vec::new();
    for (node, answer) in conn
        .on_every_primary(&scan)
        .await
        .unwrap_or_else(|e| panic!("SCAN {pattern}: {e}"))
    {
        let (cursor, found): (String, Vec<String>) = answer
            .and_then(|v| Ok(redis::from_redis_value(v)?))
            .unwrap_or_else(|e| panic!("SCAN {pattern} on {node:?}: {e}"));
        assert_eq!(
            cursor, "0",
            "SCAN {pattern} on {node:?} did not finish in one call"
        );
        keys.extend(found);
    }
    keys
}

impl Rig {
    /// The URL of one of the rig's Redis.
    pub fn redis_url(&self, kind: RedisKind) -> String {
        self.get(kind.env())
    }

    /// A multiplexed connection to the rig's Redis.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let url = self.get("REDIS_URL");
        let client = redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("REDIS_URL {url} is not a Redis URL: {e}"));
        client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach Redis at {url} ({e}); is the rig up? run `tests/rig/up`")
            })
    }

    /// AWS SDK configuration pointing at the rig's moto server, with its dummy credentials.
    pub async fn aws_config(&self) -> aws_config::SdkConfig {
        let creds = aws_sdk_sqs::config::Credentials::new(
            self.get("AWS_ACCESS_KEY_ID"),
            self.get("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "pacer-rig",
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(self.get("AWS_ENDPOINT_URL"))
            .region(aws_config::Region::new(self.get("AWS_REGION")))
            .credentials_provider(creds)
            .load()
            .await
    }

    /// An SQS client for moto.
    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.aws_config().await)
    }

    /// Creates the SQS queue `name` on moto and returns its URL.
    pub async fn create_queue(&self, name: &str) -> String {
        self.sqs()
            .await
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("creating queue {name} on moto (is the rig up?): {e:?}"))
            .queue_url
            .expect("moto answers CreateQueue with a queue URL")
    }

    /// Creates the SQS queue `name` with a dead-letter queue (`<name>-dlq`) that takes a
    /// message at its `max_receives`th receive, as the Lambda template's redrive policy
    /// does; returns both URLs (queue, dead-letter queue).
    pub async fn create_queue_with_dlq(&self, name: &str, max_receives: u32) -> (String, String) {
        use aws_sdk_sqs::types::QueueAttributeName;
        let sqs = self.sqs().await;
        let queue_url = self.create_queue(name).await;
        let dlq_url = self.create_queue(&format!("{name}-dlq")).await;
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("the dead-letter queue's ARN")
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .expect("moto answers with a QueueArn");
        sqs.set_queue_attributes()
            .queue_url(&queue_url)
            .attributes(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives})
                    .to_string(),
            )
            .send()
            .await
            .expect("the queue's redrive policy");
        (queue_url, dlq_url)
    }

    /// Asserts the dead-letter queue at `url` holds nothing (deferrals never put a message
    /// there), naming what it holds otherwise.
    pub async fn assert_none_dead_lettered(&self, url: &str) {
        let dead = self.drain_bodies(url).await;
        assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    }

    /// Sends each body (JSON) to the queue at `url`, in order.
    pub async fn send_bodies(
        &self,
        url: &str,
        bodies: impl IntoIterator<Item = serde_json::Value>,
    ) {
        let sqs = self.sqs().await;
        for body in bodies {
            sqs.send_message()
                .queue_url(url)
                .message_body(body.to_string())
                .send()
                .await
                .unwrap_or_else(|e| panic!("send to {url}: {e:?}"));
        }
    }

    /// Every body waiting in the queue at `url`, received once each (hidden 10 minutes):
    /// what a dead-letter queue holds.
    pub async fn drain_bodies(&self, url: &str) -> Vec<String> {
        let sqs = self.sqs().await;
        let mut bodies = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .visibility_timeout(600)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap_or_else(|e| panic!("receive from {url}: {e:?}"));
            let messages = got.messages.unwrap_or_default();
            if messages.is_empty() {
                return bodies;
            }
            bodies.extend(messages.into_iter().filter_map(|m| m.body));
        }
    }

    /// An S3 client for moto (path-style addressing: moto serves no bucket subdomains).
    pub async fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::from(&self.aws_config().await)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// A Kubernetes client for the rig's apiserver, as its admin.
    pub async fn kube(&self) -> kube::Client {
        let path = self.get("KUBECONFIG");
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)
            .unwrap_or_else(|e| panic!("cannot read the rig's kubeconfig {path}: {e}"));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("the rig's kubeconfig {path} is unusable: {e}"));
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    /// A command for one of the rig's tools (`HELM`, `KUBECTL`, `PYTHON`, `CARGO_LAMBDA`),
    /// with `KUBECONFIG` set to the rig's.
    pub fn tool(&self, name: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.get(name));
        cmd.env("KUBECONFIG", self.get("KUBECONFIG"));
        cmd
    }

    /// A name no other test run uses, for queues, buckets and namespaces.
    pub fn unique(prefix: &str) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "{prefix}-{}-{nanos:x}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The repository's root folder. Read at run time (cargo sets `CARGO_MANIFEST_DIR` for
    /// every test it runs): a build cached from another checkout must not send the tests
    /// to that checkout's files.
    pub fn repo_root() -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("..")
    }
}

/// Applies both CRDs (server-side, forced) and waits until the apiserver serves them.
pub async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{
        Api, CustomResourceExt, ResourceExt,
        api::{Patch, PatchParams},
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("pacer-tests").force();
    for crd in [pacer_crds::QuotaPool::crd(), pacer_crds::ModelChain::crd()] {
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(std::time::Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established within 30 s"))
            .unwrap_or_else(|e| panic!("watch CRD {name}: {e}"));
    }
}

/// Creates a namespace (the rig's apiserver never finishes deleting one: leave it).
pub async fn create_namespace(client: &kube::Client, name: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.to_owned());
    api.create(&Default::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

/// Runs `kubectl` with `stdin`, returning (success, stdout, stderr).
pub fn kubectl(rig: &Rig, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = rig.tool("KUBECTL");
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run kubectl");
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or("").as_bytes())
            .expect("write kubectl stdin");
    }
    let out = child.wait_with_output().expect("wait for kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("version difference") && !l.starts_with("WARNING: version"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Child processes that are killed (and reaped) when the guard drops, even when a test
/// panics, so no worker or emulator outlives its test.
#[derive(Debug, Default)]
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A one-model pool (`<namespace>/pool`, project `<namespace>`) and a one-step chain
/// (`<namespace>/chain`) over it, as QuotaPool and ModelChain YAML. Its windows carry a
/// 250 ms margin (the default is 1/60 of the window: 83 ms on 5 s): on a shared test
/// machine a call can reach the simulator that long after its booked start, which the
/// margin is for (`windowMarginMs`, "raise it if upstream 429s appear while usage stays
/// under the limit").
pub fn single_model_config(
    namespace: &str,
    model: &str,
    rpm: u64,
    window_seconds: u32,
    max_wait_seconds: u32,
) -> String {
    format!(
        "apiVersion: pacer.dev/v1alpha1\nkind: QuotaPool\nmetadata: {{name: pool, namespace: {namespace}}}\n\
         spec:\n  project: {namespace}\n  tier: Tier2\n  windowMarginMs: 250\n  models:\n  - {{name: {model}, rpm: {rpm}, windowSeconds: {window_seconds}}}\n\
         ---\napiVersion: pacer.dev/v1alpha1\nkind: ModelChain\nmetadata: {{name: chain, namespace: {namespace}}}\n\
         spec:\n  pool: pool\n  steps:\n  - {{model: {model}, maxWaitSeconds: {max_wait_seconds}}}\n"
    )
}

impl Rig {
    /// Compiles QuotaPool and ModelChain YAML and writes it to the rig's Redis, as
    /// `pacer apply` does.
    pub async fn apply_config(&self, yaml: &str) {
        let compiled = pacer_crds::compile::compile_documents(yaml, "default", &Default::default())
            .unwrap_or_else(|e| panic!("test config does not compile: {e}"));
        let store = pacer_core::config::ConfigStore::connect(&self.get("REDIS_URL"))
            .await
            .unwrap_or_else(|e| panic!("config store on the rig's Redis: {e}"));
        for pool in &compiled.pools {
            store.put_pool(pool).await.expect("write pool");
        }
        for chain in &compiled.chains {
            store.put_chain(chain).await.expect("write chain");
        }
    }
}

impl Rig {
    /// Compiles QuotaPool and ModelChain YAML and writes it to the Redis at `url`, as
    /// `pacer apply` does (for tests that run their own Redis, or re-apply after a loss).
    pub async fn apply_config_at(url: &str, yaml: &str) {
        let compiled = pacer_crds::compile::compile_documents(yaml, "default", &Default::default())
            .unwrap_or_else(|e| panic!("test config does not compile: {e}"));
        let store = pacer_core::config::ConfigStore::connect(url)
            .await
            .unwrap_or_else(|e| panic!("config store on {url}: {e}"));
        for pool in &compiled.pools {
            store.put_pool(pool).await.expect("write pool");
        }
        for chain in &compiled.chains {
            store.put_chain(chain).await.expect("write chain");
        }
    }
}

/// The `pacer` binary built next to this test (`cargo build -p pacer --bin pacer`;
/// `cargo test --workspace` builds it), or `$PACER_BIN`.
pub fn pacer_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PACER_BIN") {
        return PathBuf::from(bin);
    }
    // Test executables live in target/<profile>/deps; binaries one folder up.
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(format!("pacer{}", std::env::consts::EXE_SUFFIX)))
        .expect("target folder");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p pacer --bin pacer` (tests/run does), \
         or point PACER_BIN at one",
        bin.display()
    );
    bin
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `redis-server` a test owns: its own port and folder, so the test can kill it, restart
/// it empty or from an older snapshot at the same address, or make it a replica, without
/// touching the rig's Redis. Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    binary: String,
    extra: Vec<String>,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts a server on a free port, persisting nothing on its own (`SAVE` still writes
    /// `dump.rdb` in `dir`, and a restart loads it). Waits until it answers PING.
    pub fn start(rig: &Rig, dir: &std::path::Path, extra: &[&str]) -> RedisServer {
        std::fs::create_dir_all(dir).expect("redis folder");
        let binary = rig
            .vars
            .get("REDIS_SERVER")
            .cloned()
            .unwrap_or_else(|| "redis-server".to_owned());
        let mut server = RedisServer {
            port: free_port(),
            dir: dir.to_owned(),
            binary,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.start_again();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The folder holding its `dump.rdb`.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kills the server (SIGKILL: nothing is saved on the way out).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again at the same port and folder (loading `dump.rdb` if there
    /// is one) and waits until it answers PING with its data loaded.
    pub fn start_again(&mut self) {
        self.kill();
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (run tests/rig/install): {e}", self.binary));
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("redis url");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let pong = client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {} did not answer within 20 s",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The rig's toxiproxy (`TOXIPROXY_URL`): proxies whose faults a test controls.
#[derive(Debug, Clone)]
pub struct Toxiproxy {
    api: String,
    http: reqwest::Client,
}

/// One toxiproxy proxy: clients connect to `listen`, toxiproxy forwards to the upstream.
#[derive(Debug, Clone)]
pub struct Proxy {
    api: String,
    http: reqwest::Client,
    pub name: String,
    /// `host:port` clients connect to.
    pub listen: String,
}

async fn toxiproxy_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut req = http.request(method.clone(), url);
    if let Some(b) = &body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap_or_else(|e| {
        panic!("toxiproxy at {url} unreachable ({e}); is the rig up? run `tests/rig/up`")
    });
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "toxiproxy {method} {url} {body:?}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

impl Toxiproxy {
    /// The rig's toxiproxy, or a panic saying how to start it.
    pub fn from_rig(rig: &Rig) -> Toxiproxy {
        Toxiproxy {
            api: rig.get("TOXIPROXY_URL"),
            http: reqwest::Client::new(),
        }
    }

    /// A new proxy to `upstream` (`host:port`) on a free loopback port.
    pub async fn create(&self, name: &str, upstream: &str) -> Proxy {
        let created = toxiproxy_call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/proxies", self.api),
            Some(serde_json::json!({
                "name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true
            })),
        )
        .await;
        let listen = created["listen"]
            .as_str()
            .unwrap_or_else(|| panic!("toxiproxy answered without a listen address: {created}"))
            .to_owned();
        Proxy {
            api: self.api.clone(),
            http: self.http.clone(),
            name: name.to_owned(),
            listen,
        }
    }

    /// An existing proxy by name (e.g. the rig's `TOXIPROXY_REDIS_PROXY`).
    pub async fn get(&self, name: &str) -> Proxy {
        let got = toxiproxy_call(
            &self.http,
            reqwest::Method::GET,
            &format!("{}/proxies/{name}", self.api),
            None,
        )
        .await;
        Proxy {
            api: self.api.clone(),
            http: self.http.clone(),
            name: name.to_owned(),
            listen: got["listen"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

impl Proxy {
    fn url(&self) -> String {
        format!("{}/proxies/{}", self.api, self.name)
    }

    /// Enabled: forwards. Disabled: closes every connection and refuses new ones.
    pub async fn set_enabled(&self, enabled: bool) {
        toxiproxy_call(
            &self.http,
            reqwest::Method::POST,
            &self.url(),
            Some(serde_json::json!({ "enabled": enabled })),
        )
        .await;
    }

    /// Points the proxy at another upstream (existing connections are closed).
    pub async fn set_upstream(&self, upstream: &str) {
        toxiproxy_call(
            &self.http,
            reqwest::Method::POST,
            &self.url(),
            Some(serde_json::json!({ "upstream": upstream })),
        )
        .await;
    }

    /// Adds a toxic (`latency`, `timeout`, `bandwidth`, ...) on `stream` (`upstream` is
    /// client to server, `downstream` server to client).
    pub async fn add_toxic(
        &self,
        name: &str,
        kind: &str,
        stream: &str,
        attributes: serde_json::Value,
    ) {
        toxiproxy_call(
            &self.http,
            reqwest::Method::POST,
            &format!("{}/toxics", self.url()),
            Some(serde_json::json!({
                "name": name, "type": kind, "stream": stream, "toxicity": 1.0,
                "attributes": attributes
            })),
        )
        .await;
    }

    /// Removes a toxic.
    pub async fn remove_toxic(&self, name: &str) {
        toxiproxy_call(
            &self.http,
            reqwest::Method::DELETE,
            &format!("{}/toxics/{name}", self.url()),
            None,
        )
        .await;
    }

    /// Deletes the proxy.
    pub async fn delete(&self) {
        toxiproxy_call(&self.http, reqwest::Method::DELETE, &self.url(), None).await;
    }
}

/// A Redis Cluster of a test's own (three primaries, three replicas, started by
/// `tests/rig/redis-cluster`, the script the rig's cluster comes from), for tests that kill
/// a node: the rig's cluster is shared. Every node is SIGKILLed when it is dropped.
pub struct RedisCluster {
    dir: PathBuf,
    url: String,
    /// (port, pid) of each node, in start order.
    nodes: Vec<(u16, u32)>,
}

impl RedisCluster {
    /// Starts a cluster with its files under `dir`; waits until it is healthy.
    pub fn start(rig: &Rig, dir: &std::path::Path) -> RedisCluster {
        std::fs::create_dir_all(dir).expect("cluster folder");
        let script = rig.get("REDIS_CLUSTER_SCRIPT");
        let out = std::process::Command::new(&script)
            .arg(dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {script} (start the rig with tests/rig/up): {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script} {} failed: {text}",
            dir.display()
        );
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{script} printed no {name}: {text}"))
                .to_owned()
        };
        let ports: Vec<u16> = var("REDIS_CLUSTER_PORTS")
            .split(',')
            .map(|p| p.parse().expect("a port"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let pid =
                    std::fs::read_to_string(dir.join(format!("pids/redis-cluster-{}.pid", i + 1)))
                        .ok()
                        .and_then(|p| p.trim().parse().ok())
                        .unwrap_or_else(|| panic!("no pid for node {port}"));
                (*port, pid)
            })
            .collect();
        RedisCluster {
            dir: dir.to_owned(),
            url: var("REDIS_CLUSTER_URL"),
            nodes,
        }
    }

    /// One node's URL (any node will do: clients learn the rest).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The ports of the nodes still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.0).collect()
    }

    /// The port of the primary serving `key`'s slot, as node `via` sees the cluster.
    pub async fn primary_of(&self, key: &str) -> u16 {
        for port in self.ports() {
            let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
                continue;
            };
            let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let Ok(slot) = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async::<u16>(&mut c)
                .await
            else {
                continue;
            };
            let Ok(slots) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<redis::Value>>(&mut c)
                .await
            else {
                continue;
            };
            // Each range: start, end, then [host, port, id, …] of its primary, then replicas.
            for range in slots {
                let redis::Value::Array(parts) = range else {
                    continue;
                };
                let number = |v: Option<&redis::Value>| match v {
                    Some(redis::Value::Int(n)) => Some(*n),
                    _ => None,
                };
                let (Some(a), Some(b)) = (number(parts.first()), number(parts.get(1))) else {
                    continue;
                };
                let Some(redis::Value::Array(node)) = parts.get(2) else {
                    continue;
                };
                if (a..=b).contains(&i64::from(slot))
                    && let Some(p) = number(node.get(1))
                {
                    return u16::try_from(p).expect("a port");
                }
            }
        }
        panic!(
            "no node of the cluster at {} knows the primary of {key}",
            self.url
        )
    }

    /// SIGKILLs the node on `port` (nothing saved on the way out) and forgets it.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.nodes.iter().position(|n| n.0 == port) {
            let (_, pid) = self.nodes.remove(i);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }

    /// Waits (bounded by `within`) until a node other than `dead` is the primary of
    /// `key`'s slot and every live node reports `cluster_state:ok`; returns its port.
    pub async fn wait_for_new_primary(
        &self,
        key: &str,
        dead: u16,
        within: std::time::Duration,
    ) -> u16 {
        let deadline = std::time::Instant::now() + within;
        loop {
            let primary = self.primary_of(key).await;
            if primary != dead && self.all_ok().await {
                return primary;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no replica took over from the primary on {dead} within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn all_ok(&self) -> bool {
        for port in self.ports() {
            let ok = async {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                Some(info.lines().any(|l| l.trim() == "cluster_state:ok"))
            }
            .await;
            if ok != Some(true) {
                return false;
            }
        }
        true
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in self.ports() {
            self.kill(port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
