//! Replica processes (`--processes`): each is this executable in its hidden child role,
//! sharing only Redis and the queue with the others. A child streams everything it does
//! (calls as they leave and end, deferrals, image writes) as JSON lines on stdout, so the
//! parent counts a killed child's work too; a line it cannot read fails the run.
use super::*;

/// One line of a replica process's stdout.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ChildLine {
    /// A call left (its result is empty).
    Sent(Call),
    /// A call ended.
    Call(Call),
    /// A delivery went back to the queue.
    Deferred,
    /// An image was stored at this key.
    Stored(String),
    /// An image write failed by `sink-fail`.
    SinkFailed(String),
    /// The replica stopped cleanly: everything it did is above.
    Done,
}

/// The AWS settings of an in-process caller (tests build theirs from the rig) as the
/// environment of replica processes, which load theirs from it; nothing when the parent
/// loaded its own from the environment too.
pub(super) async fn aws_env(
    aws: Option<&aws_config::SdkConfig>,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    use aws_sdk_sqs::config::ProvideCredentials as _;
    let Some(conf) = aws else {
        return Ok(Vec::new());
    };
    let mut env = Vec::new();
    if let Some(url) = conf.endpoint_url() {
        env.push(("AWS_ENDPOINT_URL", url.to_owned()));
    }
    if let Some(region) = conf.region() {
        env.push(("AWS_REGION", region.to_string()));
    }
    if let Some(provider) = conf.credentials_provider() {
        let c = provider
            .provide_credentials()
            .await
            .context("AWS credentials for the replica processes")?;
        env.push(("AWS_ACCESS_KEY_ID", c.access_key_id().to_owned()));
        env.push(("AWS_SECRET_ACCESS_KEY", c.secret_access_key().to_owned()));
        if let Some(token) = c.session_token() {
            env.push(("AWS_SESSION_TOKEN", token.to_owned()));
        }
    }
    Ok(env)
}

/// A replica process as the parent sees it.
pub(super) struct ChildProc {
    pub(super) child: tokio::process::Child,
    pub(super) output: tokio::task::JoinHandle<anyhow::Result<ChildOutput>>,
    pub(super) killed: bool,
}

/// What a replica process streamed on stdout.
#[derive(Default)]
pub(super) struct ChildOutput {
    /// Calls that left and have not ended (yet).
    pub(super) open: Vec<Call>,
    pub(super) calls: Vec<Call>,
    pub(super) deferred: u64,
    /// Image writes per key.
    pub(super) sink_writes: HashMap<String, u64>,
    pub(super) sink_failed: u64,
    /// It stopped cleanly.
    pub(super) done: bool,
}

/// Reads a replica process's stdout to its end; a line that is not part of its report
/// fails the run (a report that cannot be read cannot be trusted in part).
pub(super) async fn read_child(
    index: usize,
    stdout: tokio::process::ChildStdout,
) -> anyhow::Result<ChildOutput> {
    let mut out = ChildOutput::default();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .with_context(|| format!("reading replica process {index}'s report"))?
    {
        let parsed: ChildLine = serde_json::from_str(&line).with_context(|| {
            format!("replica process {index} wrote a line that is not part of its report: {line:?}")
        })?;
        match parsed {
            ChildLine::Sent(call) => out.open.push(call),
            ChildLine::Call(call) => {
                if let Some(i) = out.open.iter().position(|c| {
                    (c.request.as_str(), c.start_ms, c.model.as_str())
                        == (call.request.as_str(), call.start_ms, call.model.as_str())
                }) {
                    out.open.swap_remove(i);
                }
                out.calls.push(call);
            }
            ChildLine::Deferred => out.deferred += 1,
            ChildLine::Stored(key) => *out.sink_writes.entry(key).or_default() += 1,
            ChildLine::SinkFailed(_) => out.sink_failed += 1,
            ChildLine::Done => out.done = true,
        }
    }
    Ok(out)
}

/// A replica process: serves the queue until stdin closes, streaming its calls on stdout.
pub(super) async fn child(args: &LoadtestArgs, index: usize) -> anyhow::Result<()> {
    let (Some(redis), Some(queue_url), Some(base_url), Some(out)) = (
        &args.conn.redis_url,
        &args.conn.queue_url,
        &args.conn.gemini_base_url,
        &args.out,
    ) else {
        anyhow::bail!("a replica process needs --redis-url, --queue-url, --gemini-base-url, --out");
    };
    let store: Arc<dyn Sink> = Arc::from(
        sink::from_url(out)
            .await
            .map_err(|e| anyhow::anyhow!("--out: {e}"))?,
    );
    let counted = Arc::new(FailingSink {
        stream: true,
        ..FailingSink::new(store, args.child_sink_failures)
    });
    let log = CallLog::streaming();
    let backend = Backend::Redis {
        url: redis.clone(),
        day_seconds: None,
    };
    let handler = replica(
        index,
        &backend,
        base_url,
        args.conn.gemini_api_key.as_deref(),
        // --processes serves one chain, on the replicas' own key.
        &Default::default(),
        counted.clone(),
        log.clone(),
    )
    .await?;
    let deferred = Arc::new(AtomicU64::new(0));
    let processor = Arc::new(Counting {
        inner: handler,
        deferred: deferred.clone(),
        received: Arc::default(),
        stream: true,
    });
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
            shutdown.cancel();
        });
    }
    let _ = &args.child_chain;
    worker::run(
        sqs_queue(queue_url, None).await,
        worker_options(args.concurrency, args.visibility_seconds),
        processor,
        Arc::new(Metrics::default()),
        shutdown,
    )
    .await?;
    CallLog::emit(&ChildLine::Done);
    Ok(())
}
