//! Every [`ProviderError`] variant, produced by the simulator and decoded back by the
//! client; plus the simulator's own promises (shared project quotas, streaming framings,
//! stats, concurrency).
use std::time::Duration;

use pacer_core::{
    gemini::{GeminiClient, GeminiConfig, vertex::AccessTokens},
    models::{ImageSize, ServiceTier},
    provider::{
        ApiKey, BlockReason, CallContext, Disposition, ImageProvider, ImageRequest, ProviderError,
        QuotaDimension,
    },
};
use pacer_simulator::{RunningSimulator, SimConfig, Simulator, config::KeySpec};

const PRO: &str = "gemini-3-pro-image";
const FLASH: &str = "gemini-3.1-flash-image";

async fn start(config: SimConfig) -> RunningSimulator {
    Simulator::new(config)
        .spawn()
        .await
        .expect("simulator binds")
}

fn client(sim: &RunningSimulator, key: &str) -> GeminiClient {
    GeminiClient::new(GeminiConfig::new(ApiKey::new(key)).base_url(sim.url())).expect("client")
}

fn with_limit(spec: &str) -> SimConfig {
    SimConfig {
        limits: vec![spec.parse().expect("limit")],
        ..SimConfig::default()
    }
}

fn req() -> ImageRequest {
    ImageRequest::new("a lighthouse at dusk").aspect_ratio("16:9")
}

#[tokio::test]
async fn success_is_a_png_with_usage() {
    let sim = start(SimConfig::default()).await;
    let r = client(&sim, "k")
        .generate(PRO, &req().image_size(ImageSize::K4))
        .await
        .expect("image");
    let image = &r.images[0];
    assert_eq!(image.mime_type, "image/png");
    let decoder = png::Decoder::new(std::io::Cursor::new(&image.data));
    let info = decoder.read_info().expect("valid png").info().clone();
    assert_eq!((info.width, info.height), (64, 36));
    let usage = r.usage.expect("usage");
    assert_eq!(usage.image_tokens, 2000);
    assert!(usage.prompt_tokens > 0 && usage.total_tokens > usage.image_tokens);
    assert_eq!(r.model_version.as_deref(), Some(PRO));
    assert!(r.response_id.is_some());
    let r = client(&sim, "k")
        .generate(FLASH, &ImageRequest::new("x"))
        .await
        .expect("image");
    assert_eq!(r.usage.map(|u| u.image_tokens), Some(1120));
}

#[tokio::test]
async fn rate_limited_per_minute_with_retry_info() {
    let sim = start(with_limit(&format!("{PRO}:rpm=1,window=30"))).await;
    let c = client(&sim, "k");
    c.generate(PRO, &req()).await.expect("first fits");
    let e = c.generate(PRO, &req()).await.expect_err("second is over");
    match &e {
        ProviderError::RateLimited {
            quota,
            model,
            retry_delay,
            violations,
            ..
        } => {
            assert_eq!(*quota, QuotaDimension::RequestsPerMinute);
            assert_eq!(model.as_deref(), Some(PRO));
            // The window's remainder in whole seconds: at most the window; how much less
            // depends on the machine's pace between the two calls, so no lower bound.
            let d = retry_delay.expect("RetryInfo");
            assert!(d <= Duration::from_secs(30), "{d:?}");
            assert_eq!(violations[0].limit, Some(1));
        }
        other => panic!("{other:?}"),
    }
    // A named quota is cooled down and the chain falls through: not retried in place.
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::Penalize {
            scope: pacer_core::limiter::PenaltyScope::PerMinute,
            ..
        }
    ));
    let stats = sim.stats();
    assert_eq!(stats["models"][PRO]["rejected"]["rpm"], 1);
    assert_eq!(stats["models"][PRO]["max_in_any_window"]["rpm"], 1);
    assert_eq!(stats["models"][PRO]["max_arrivals_in_any_window"]["rpm"], 2);
    assert_eq!(stats["models"][PRO]["arrivals"], 2);
}

#[tokio::test]
async fn every_exceeded_dimension_is_a_violation() {
    let sim = start(with_limit(&format!("{PRO}:rpm=1,ipm=1,tpm=100000,rpd=1"))).await;
    let c = client(&sim, "k");
    c.generate(PRO, &req()).await.expect("first fits");
    match c.generate(PRO, &req()).await {
        Err(ProviderError::RateLimited {
            quota, violations, ..
        }) => {
            // Per-day binds longest, so it is the one reported.
            assert_eq!(quota, QuotaDimension::RequestsPerDay);
            let dims: Vec<_> = violations.iter().map(|v| v.dimension).collect();
            assert_eq!(
                dims,
                vec![
                    QuotaDimension::RequestsPerMinute,
                    QuotaDimension::ImagesPerMinute,
                    QuotaDimension::RequestsPerDay
                ]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn per_day_quota_falls_through() {
    let sim = start(with_limit(&format!("{PRO}:rpd=1"))).await;
    let c = client(&sim, "k");
    c.generate(PRO, &req()).await.expect("first fits");
    let e = c.generate(PRO, &req()).await.expect_err("day spent");
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::Penalize {
            scope: pacer_core::limiter::PenaltyScope::PerDay,
            ..
        }
    ));
    assert_eq!(e.metric_label(), "rate_limited_rpd");
    // The delay runs to the next Pacific midnight.
    assert!(e.retry_delay().expect("delay") <= Duration::from_secs(25 * 3600));
}

#[tokio::test]
async fn limit_zero_leaves_quota_value_out() {
    let sim = start(with_limit(&format!("{PRO}:rpm=0"))).await;
    match client(&sim, "k").generate(PRO, &req()).await {
        Err(ProviderError::RateLimited { violations, .. }) => {
            assert_eq!(violations[0].limit, None);
            // A free-tier project's quota, as Google names it.
            assert_eq!(
                violations[0].quota_id,
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn keys_share_their_projects_quota() {
    let config = SimConfig {
        projects: vec!["acme".into(), "other".into()],
        keys: ["acme=k1", "acme=k2", "other=k3"]
            .iter()
            .map(|k| k.parse::<KeySpec>().expect("key"))
            .collect(),
        ..with_limit(&format!("{PRO}:rpm=1"))
    };
    let sim = start(config).await;
    client(&sim, "k1")
        .generate(PRO, &req())
        .await
        .expect("acme's one");
    assert!(matches!(
        client(&sim, "k2").generate(PRO, &req()).await,
        Err(ProviderError::RateLimited { .. })
    ));
    client(&sim, "k3")
        .generate(PRO, &req())
        .await
        .expect("other project, own quota");
}

#[tokio::test]
async fn ghost_429_is_bare() {
    let mut config = SimConfig::default();
    config.faults.ghost_429 = 1.0;
    let sim = start(config).await;
    let e = client(&sim, "k")
        .generate(PRO, &req())
        .await
        .expect_err("ghost");
    assert!(
        matches!(
            e,
            ProviderError::RateLimitedBare {
                retry_delay: None,
                ..
            }
        ),
        "{e:?}"
    );
    let stats = sim.stats();
    assert_eq!(stats["models"][PRO]["faults"]["ghost_429"], 1);
    // A fault is answered without a quota decision, but the request arrived.
    assert_eq!(stats["models"][PRO]["arrivals"], 1);
    assert_eq!(stats["models"][PRO]["accepted"], 0);
    assert_eq!(stats["models"][PRO]["max_arrivals_in_any_window"]["rpm"], 1);
}

#[tokio::test]
async fn overload_and_server_errors() {
    let mut config = SimConfig::default();
    config.faults.overload = 1.0;
    let sim = start(config).await;
    let e = client(&sim, "k")
        .generate(PRO, &req())
        .await
        .expect_err("503");
    assert!(matches!(e, ProviderError::Overloaded { .. }), "{e:?}");

    let mut config = SimConfig::default();
    config.faults.server_error = 1.0;
    let sim = start(config).await;
    let e = client(&sim, "k")
        .generate(PRO, &req())
        .await
        .expect_err("500");
    assert!(
        matches!(e, ProviderError::ServerError { status: 500, .. }),
        "{e:?}"
    );

    let mut config = SimConfig::default();
    config.faults.gateway_timeout = 1.0;
    let sim = start(config).await;
    let e = client(&sim, "k")
        .generate(PRO, &req())
        .await
        .expect_err("504");
    assert!(
        matches!(e, ProviderError::ServerError { status: 504, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
}

#[tokio::test]
async fn blocks_by_prompt_pattern() {
    let config = SimConfig {
        blocks: vec![
            "forbidden=PROHIBITED_CONTENT".parse().expect("rule"),
            "gore".parse().expect("rule"),
            "famous painting=IMAGE_RECITATION".parse().expect("rule"),
        ],
        ..SimConfig::default()
    };
    let sim = start(config).await;
    let c = client(&sim, "k");
    for (prompt, want) in [
        (
            "something Forbidden",
            BlockReason::Prompt("PROHIBITED_CONTENT".into()),
        ),
        ("gore", BlockReason::Finish("IMAGE_SAFETY".into())),
        (
            "a famous painting",
            BlockReason::Finish("IMAGE_RECITATION".into()),
        ),
    ] {
        let e = c
            .generate(PRO, &ImageRequest::new(prompt))
            .await
            .expect_err(prompt);
        // A recitation may not recur on another call: retried, then the next step.
        // Safety and prohibited content are final.
        let retried = matches!(&want, BlockReason::Finish(r) if r == "IMAGE_RECITATION");
        assert_eq!(
            matches!(
                e.disposition(&CallContext::first_call()),
                Disposition::Retry { .. }
            ),
            retried,
            "{prompt}: {:?}",
            e.disposition(&CallContext::first_call())
        );
        if !retried {
            assert_eq!(
                e.disposition(&CallContext::first_call()),
                Disposition::FailRequest,
                "{prompt}"
            );
        }
        match e {
            ProviderError::Blocked { reason, .. } => assert_eq!(reason, want),
            other => panic!("{prompt}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn spent_credit_is_402() {
    let config = SimConfig {
        credits: vec!["sim-project=200000".parse().expect("credit")],
        ..SimConfig::default()
    };
    let sim = start(config).await;
    let c = client(&sim, "k");
    c.generate(PRO, &req()).await.expect("credit for one");
    let e = c.generate(PRO, &req()).await.expect_err("spent");
    assert!(matches!(e, ProviderError::CreditExhausted { .. }), "{e:?}");
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::DeferAndAlert { .. }
    ));
    // Refused for credit, still an arrival.
    let stats = sim.stats();
    assert_eq!(stats["models"][PRO]["arrivals"], 2);
    assert_eq!(stats["models"][PRO]["accepted"], 1);
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let sim = start(SimConfig::default()).await;
    let c = client(&sim, "k");
    let e = c
        .generate(PRO, &ImageRequest::new("x").aspect_ratio("7:3"))
        .await
        .expect_err("bad ratio");
    match &e {
        ProviderError::Invalid { violations, .. } => assert_eq!(
            violations[0].field,
            "generation_config.image_config.aspect_ratio"
        ),
        other => panic!("{other:?}"),
    }
    let e = c
        .generate(PRO, &ImageRequest::new("x").image_size(ImageSize::Half))
        .await
        .expect_err("pro has no 512");
    match &e {
        ProviderError::Invalid { violations, .. } => assert_eq!(
            violations[0].field,
            "generation_config.image_config.image_size"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn half_size_images_are_sent_as_512() {
    let sim = start(SimConfig::default()).await;
    let c = client(&sim, "k");
    // The smallest size (Pacer also reads it as "0.5K") goes out as Google's "512", which
    // 3.1 flash takes.
    for _ in 0..2 {
        let r = c
            .generate(FLASH, &ImageRequest::new("x").image_size(ImageSize::Half))
            .await
            .expect("512");
        assert_eq!(r.usage.map(|u| u.image_tokens), Some(747));
    }
    // Google refuses "0.5K" itself, naming the field.
    let body = r#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"imageConfig":{"imageSize":"0.5K"}}}"#;
    let path = format!("/v1beta/models/{FLASH}:generateContent?key=k");
    let (status, _, text) = raw(&sim, &path, body).await;
    assert_eq!(status, 400, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        v["error"]["details"][0]["fieldViolations"][0]["field"],
        "generation_config.image_config.image_size"
    );
    // Every request counted as an arrival, the refused one too.
    let stats = sim.stats();
    assert_eq!(stats["models"][FLASH]["arrivals"], 3);
    assert_eq!(stats["models"][FLASH]["accepted"], 2);
}

#[tokio::test]
async fn bad_and_missing_keys_are_unauthorized() {
    let config = SimConfig {
        keys: vec!["good".parse().expect("key")],
        ..SimConfig::default()
    };
    let sim = start(config).await;
    let e = client(&sim, "bad")
        .generate(PRO, &req())
        .await
        .expect_err("bad key");
    assert!(
        matches!(e, ProviderError::Unauthorized { status: 400, .. }),
        "{e:?}"
    );
    let e = client(&sim, "")
        .generate(PRO, &req())
        .await
        .expect_err("no key");
    assert!(
        matches!(e, ProviderError::Unauthorized { status: 403, .. }),
        "{e:?}"
    );
    client(&sim, "good")
        .generate(PRO, &req())
        .await
        .expect("good key");
}

#[tokio::test]
async fn retired_and_unknown_models_are_not_found() {
    let config = SimConfig {
        retired: vec![FLASH.into()],
        ..SimConfig::default()
    };
    let sim = start(config).await;
    let c = client(&sim, "k");
    for model in [
        "gemini-2.5-flash-image",
        "gemini-3-pro-image-preview",
        "no-such-model",
        FLASH,
    ] {
        let e = c.generate(model, &req()).await.expect_err("404");
        assert!(
            matches!(e, ProviderError::ModelNotFound { model: ref m, .. } if m == model),
            "{e:?}"
        );
        assert!(matches!(
            e.disposition(&CallContext::first_call()),
            Disposition::NextStep { .. }
        ));
    }
}

#[tokio::test]
async fn slow_answers_time_out() {
    let config = SimConfig {
        latency: Duration::from_secs(5),
        ..SimConfig::default()
    };
    let sim = start(config).await;
    let c = GeminiClient::new(
        GeminiConfig::new(ApiKey::new("k"))
            .base_url(sim.url())
            .timeout(Duration::from_millis(200)),
    )
    .expect("client");
    let e = c.generate(PRO, &req()).await.expect_err("timeout");
    assert!(matches!(e, ProviderError::Timeout { .. }), "{e:?}");
    // Counted on arrival even though the answer never came.
    assert_eq!(sim.stats()["models"][PRO]["accepted"], 1);
}

#[tokio::test]
async fn connection_reset_is_transport() {
    let mut config = SimConfig::default();
    config.faults.reset = 1.0;
    let sim = start(config).await;
    let e = client(&sim, "k")
        .generate(PRO, &req())
        .await
        .expect_err("reset");
    assert!(matches!(e, ProviderError::Transport { .. }), "{e:?}");
    assert!(e.is_retryable());
}

async fn raw(sim: &RunningSimulator, path: &str, body: &str) -> (u16, String, String) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", sim.url()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("sent");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, ctype, resp.text().await.expect("body"))
}

#[tokio::test]
async fn wire_shapes() {
    let sim = start(with_limit(&format!("{PRO}:rpm=3"))).await;
    let body = r#"{"contents":[{"parts":[{"text":"a cat"}]}],"generationConfig":{"responseModalities":["TEXT","IMAGE"]}}"#;
    let path = format!("/v1/models/{PRO}:streamGenerateContent?alt=sse&key=k");
    let (status, ctype, text) = raw(&sim, &path, body).await;
    assert_eq!((status, ctype.as_str()), (200, "text/event-stream"));
    let data = text.strip_prefix("data: ").expect("sse frame").trim();
    let r = pacer_core::gemini::decode_response(data.as_bytes()).expect("chunk decodes");
    assert_eq!(r.texts.len(), 1);
    let path = format!("/v1beta/models/{PRO}:streamGenerateContent?key=k");
    let (status, _, text) = raw(&sim, &path, body).await;
    assert_eq!(status, 200);
    assert!(text.trim_start().starts_with('['));
    // Over quota: no Retry-After header, the delay is in the body only.
    let path = format!("/v1beta/models/{PRO}:generateContent?key=k");
    raw(&sim, &path, body).await;
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", sim.url()))
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_none());
    let text = resp.text().await.expect("body");
    assert!(text.contains("Please retry in "), "{text}");
    // Unknown names and bad enums get Google's 400.
    let (status, _, text) = raw(
        &sim,
        &path,
        r#"{"contents":[{"parts":[{"text":"a"}]}],"generationConfig":{"responseModalities":["PICTURE"]}}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        text.contains("generation_config.response_modalities[0]"),
        "{text}"
    );
    // Imagen's :predict is gone with its models.
    let (status, _, _) = raw(
        &sim,
        "/v1beta/models/imagen-4.0-generate-001:predict?key=k",
        r#"{"instances":[{"prompt":"a"}]}"#,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_a_thousand_concurrent_connections() {
    let config = SimConfig {
        latency: Duration::from_millis(500),
        ..with_limit(&format!("{FLASH}:rpm=600"))
    };
    let sim = start(config).await;
    let c = client(&sim, "k");
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.generate(FLASH, &ImageRequest::new(format!("prompt {i}")))
                    .await
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => ok += 1,
            Err(ProviderError::RateLimited { .. }) => limited += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, limited), (600, 400));
    let stats = sim.stats();
    assert_eq!(
        stats["models"][FLASH]["max_arrivals_in_any_window"]["rpm"],
        1000
    );
    assert_eq!(stats["models"][FLASH]["rejected"]["rpm"], 400);
    let at = stats["models"][FLASH]["accepted_at_ms"]
        .as_array()
        .expect("accepted_at_ms");
    assert_eq!(at.len(), 600);
    assert!(at.windows(2).all(|w| w[0].as_i64() <= w[1].as_i64()));
    assert_eq!(
        sim.stats()["models"][FLASH]["max_in_any_window"]["rpm"],
        600
    );
}

async fn tagged(sim: &RunningSimulator, model: &str, ticket: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!(
            "{}/v1beta/models/{model}:generateContent",
            sim.url()
        ))
        .header("x-goog-api-key", "k")
        .body(r#"{"contents":[{"parts":[{"text":"a"}]}]}"#);
    if let Some(t) = ticket {
        req = req.header(pacer_simulator::TICKET_HEADER, t);
    }
    req.send().await.expect("sent").status().as_u16()
}

#[tokio::test]
async fn tickets_are_counted_per_project_and_replays_flagged() {
    let config = SimConfig {
        projects: vec!["acme".into(), "other".into()],
        keys: ["acme=k", "other=k2"]
            .iter()
            .map(|k| k.parse::<KeySpec>().expect("key"))
            .collect(),
        ..with_limit(&format!("{PRO}:rpm=2"))
    };
    let sim = start(config).await;
    assert_eq!(tagged(&sim, PRO, Some("b1")).await, 200);
    assert_eq!(tagged(&sim, PRO, Some("b2")).await, 200);
    // A replayed booking, refused for quota: still an arrival, still a duplicate.
    assert_eq!(tagged(&sim, PRO, Some("b1")).await, 429);
    assert_eq!(tagged(&sim, FLASH, Some("b2")).await, 200);
    assert_eq!(tagged(&sim, FLASH, None).await, 200);
    let stats = sim.stats();
    let acme = &stats["projects"]["acme"];
    assert_eq!(
        acme[PRO]["tickets"],
        serde_json::json!({"tagged": 3, "untagged": 0, "duplicates": 1})
    );
    // The same ticket on another model of the same project is a replay too.
    assert_eq!(
        acme[FLASH]["tickets"],
        serde_json::json!({"tagged": 1, "untagged": 1, "duplicates": 1})
    );
    assert_eq!(acme[PRO]["arrivals"], 3);
    assert_eq!(acme[PRO]["accepted"], 2);
    assert_eq!(acme[PRO]["max_arrivals_in_any_window"]["rpm"], 3);
    assert_eq!(stats["models"][FLASH]["tickets"]["duplicates"], 1);
    // Another project's tickets are its own.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", sim.url()))
        .header("x-goog-api-key", "k2")
        .header(pacer_simulator::TICKET_HEADER, "b1")
        .body(r#"{"contents":[{"parts":[{"text":"a"}]}]}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        sim.stats()["projects"]["other"][PRO]["tickets"]["duplicates"],
        0
    );
}

#[tokio::test]
async fn reset_forgets_counts_and_windows() {
    let sim = start(with_limit(&format!("{PRO}:rpm=1"))).await;
    assert_eq!(tagged(&sim, PRO, Some("t")).await, 200);
    assert_eq!(tagged(&sim, PRO, Some("t")).await, 429);
    let resp = reqwest::Client::new()
        .post(format!("{}/_sim/reset", sim.url()))
        .send()
        .await
        .expect("reset");
    assert!(resp.status().is_success());
    let stats = sim.stats();
    assert_eq!(stats["models"], serde_json::json!({}));
    assert!(stats["uptime_s"].as_f64().is_some());
    // The window is empty again, and the ticket forgotten.
    assert_eq!(tagged(&sim, PRO, Some("t")).await, 200);
    let stats = sim.stats();
    assert_eq!(stats["models"][PRO]["arrivals"], 1);
    assert_eq!(stats["models"][PRO]["tickets"]["duplicates"], 0);
}

/// An empty directory of this test's own.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pacer-sim-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creates a scratch directory");
    dir
}

/// A key file for the simulator's Vertex routes.
fn vertex_key_file(sim: &RunningSimulator, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("sa.json");
    sim.write_vertex_key_file(&path, "vertex-proj")
        .expect("writes the key file");
    path
}

fn vertex_client(sim: &RunningSimulator, key_file: &std::path::Path) -> GeminiClient {
    let tokens = std::sync::Arc::new(AccessTokens::from_key_file(key_file));
    GeminiClient::new(
        GeminiConfig::vertex("vertex-proj", "us-central1", tokens).base_url(sim.url()),
    )
    .expect("client")
}

#[tokio::test]
async fn vertex_calls_carry_an_oauth_token_and_bill_the_project_in_the_path() {
    let sim = start(SimConfig {
        projects: vec!["ai-studio".into(), "vertex-proj".into()],
        limits: vec![
            format!("vertex-proj/{PRO}:rpm=1,window=30")
                .parse()
                .expect("limit"),
        ],
        ..SimConfig::default()
    })
    .await;
    let dir = scratch_dir("vertex-path");
    let key_file = vertex_key_file(&sim, &dir);
    let vertex = vertex_client(&sim, &key_file);
    let r = vertex.generate(PRO, &req()).await.expect("image on Vertex");
    assert_eq!(r.images[0].mime_type, "image/png");
    // Vertex's shared quota answers a bare 429: no quota named, no delay.
    let e = vertex
        .generate(PRO, &req())
        .await
        .expect_err("over the quota");
    assert!(
        matches!(
            e,
            ProviderError::RateLimitedBare {
                retry_delay: None,
                ..
            }
        ),
        "{e:?}"
    );
    let stats = sim.stats();
    assert_eq!(
        stats["projects"]["vertex-proj"][PRO]["arrivals"], 2,
        "{stats}"
    );
    assert!(stats["projects"].get("ai-studio").is_none(), "{stats}");
    // An AI Studio key on a Vertex route, or a token the endpoint never issued: 401.
    let (status, _, body) = raw(
        &sim,
        &format!("/v1/projects/vertex-proj/locations/global/publishers/google/models/{PRO}:generateContent"),
        r#"{"contents":[{"parts":[{"text":"x"}]}]}"#,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UNAUTHENTICATED"), "{body}");
}

#[tokio::test]
async fn vertex_refuses_a_project_it_does_not_serve_and_a_broken_credential_is_an_account_problem()
{
    let sim = start(SimConfig {
        projects: vec!["other".into()],
        ..SimConfig::default()
    })
    .await;
    let dir = scratch_dir("vertex-refusals");
    let key_file = vertex_key_file(&sim, &dir);
    let e = vertex_client(&sim, &key_file)
        .generate(PRO, &req())
        .await
        .expect_err("project not served");
    assert!(
        matches!(e, ProviderError::Unauthorized { status: 403, .. }),
        "{e:?}"
    );
    let missing = dir.join("missing.json");
    let e = vertex_client(&sim, &missing)
        .generate(PRO, &req())
        .await
        .expect_err("no key file");
    match &e {
        ProviderError::Unauthorized {
            status: 401,
            message,
        } => {
            assert!(message.contains("missing.json"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let stats = sim.stats();
    assert_eq!(
        stats["projects"],
        serde_json::json!({}),
        "nothing reached a model: {stats}"
    );
}

/// Issue 13: a step on the flex tier sends `serviceTier: flex`, which the simulator (as
/// Google) bills at half the standard rates.
#[tokio::test]
async fn flex_calls_are_billed_at_half_the_standard_rates() {
    let sim = start(SimConfig {
        projects: vec!["standard".into(), "flex".into()],
        keys: vec![
            "standard=k-standard".parse().expect("key"),
            "flex=k-flex".parse().expect("key"),
        ],
        ..SimConfig::default()
    })
    .await;
    let standard = req().image_size(ImageSize::K1);
    let mut flex = standard.clone();
    flex.service_tier = Some(ServiceTier::Flex);
    assert_eq!(
        serde_json::to_value(GeminiClient::request_body(&flex)).expect("json")["serviceTier"],
        "flex"
    );
    client(&sim, "k-standard")
        .generate(PRO, &standard)
        .await
        .expect("standard image");
    client(&sim, "k-flex")
        .generate(PRO, &flex)
        .await
        .expect("flex image");
    let stats = sim.stats();
    let spend = |project: &str| {
        stats["projects"][project][PRO]["max_in_any_window"]["spend"]
            .as_u64()
            .unwrap_or_else(|| panic!("{project}'s spend: {stats}"))
    };
    assert!(spend("standard") > 0, "{stats}");
    assert_eq!(spend("flex"), spend("standard") / 2, "{stats}");
}
