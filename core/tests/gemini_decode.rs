//! The Gemini decoders on captured bodies (one per error variant), and fuzzed on arbitrary
//! input: they must never panic.
use std::time::Duration;

use pacer_core::gemini::{decode_error, decode_response};
use pacer_core::limiter::PenaltyScope;
use pacer_core::provider::{BlockReason, CallContext, Disposition, ProviderError, QuotaDimension};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    // Read at run time: a build cached from another checkout must read this one's files.
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    let path = format!("{root}/tests/fixtures/gemini/{name}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn error(status: u16, name: &str) -> ProviderError {
    decode_error(status, &fixture(name), "gemini-3-pro-image", None)
}

#[test]
fn rpm_429_with_help_first() {
    let e = error(429, "429_rpm_help_quota_retry.json");
    match &e {
        ProviderError::RateLimited {
            quota,
            quota_id,
            model,
            retry_delay,
            violations,
            ..
        } => {
            assert_eq!(*quota, QuotaDimension::RequestsPerMinute);
            assert_eq!(quota_id, "GenerateRequestsPerMinutePerProjectPerModel");
            assert_eq!(model.as_deref(), Some("gemini-3-pro-image"));
            assert_eq!(*retry_delay, Some(Duration::new(45, 837_906_927)));
            assert_eq!(violations[0].limit, Some(20));
        }
        other => panic!("{other:?}"),
    }
    // A named quota is cooled down for its delay, not retried on the same model.
    assert_eq!(
        e.disposition(&CallContext::first_call()),
        Disposition::Penalize {
            model: Some("gemini-3-pro-image".into()),
            cooldown: Duration::new(45, 837_906_927),
            scope: PenaltyScope::PerMinute,
        }
    );
    assert!(!e.is_retryable());
    assert_eq!(e.metric_label(), "rate_limited_rpm");
}

#[test]
fn tpm_429_with_retry_info_first_and_fractional_delay() {
    let e = error(429, "429_tpm_retry_first_fractional.json");
    assert!(matches!(
        e,
        ProviderError::RateLimited {
            quota: QuotaDimension::InputTokensPerMinute,
            retry_delay: Some(d),
            ..
        } if d == Duration::new(45, 837_906_927)
    ));
}

#[test]
fn free_tier_limit_zero_per_day_binds() {
    let e = error(429, "429_free_tier_limit_zero_rpd_and_rpm.json");
    match &e {
        ProviderError::RateLimited {
            quota, violations, ..
        } => {
            assert_eq!(*quota, QuotaDimension::RequestsPerDay);
            assert_eq!(violations.len(), 2);
            assert!(violations.iter().all(|v| v.limit.is_none()));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::Penalize {
            scope: PenaltyScope::PerDay,
            ..
        }
    ));
    assert!(!e.is_retryable());
    // RetryInfo says "40s", the message "40.216546s": the longer wins.
    assert_eq!(e.retry_delay(), Some(Duration::from_micros(40_216_546)));
}

#[test]
fn quota_model_differs_and_delay_comes_from_message() {
    let e = error(429, "429_other_model_no_retryinfo.json");
    assert!(matches!(
        e,
        ProviderError::RateLimited {
            quota: QuotaDimension::RequestsPerDay,
            model: Some(ref m),
            retry_delay: Some(d),
            ..
        } if m == "gemini-3-pro-image-preview" && d == Duration::from_millis(3_723_500)
    ));
}

#[test]
fn bare_429_is_a_ghost() {
    let e = error(429, "429_bare.json");
    assert!(matches!(
        e,
        ProviderError::RateLimitedBare {
            retry_delay: None,
            ..
        }
    ));
    assert!(e.is_retryable());
    // Not even JSON: still a bare 429.
    assert!(matches!(
        decode_error(429, b"", "m", None),
        ProviderError::RateLimitedBare { .. }
    ));
}

#[test]
fn server_side_failures_are_retryable() {
    let e = error(503, "503_overloaded.json");
    assert!(matches!(e, ProviderError::Overloaded { .. }) && e.is_retryable());
    let e = error(500, "500_internal.json");
    assert!(matches!(e, ProviderError::ServerError { status: 500, .. }) && e.is_retryable());
    let e = error(504, "504_deadline.json");
    assert!(matches!(e, ProviderError::ServerError { status: 504, .. }) && e.is_retryable());
}

#[test]
fn invalid_argument_carries_field_violations() {
    let e = error(400, "400_field_violations.json");
    match &e {
        ProviderError::Invalid { violations, .. } => {
            assert_eq!(violations[0].field, "generation_config.image_config");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.disposition(&CallContext::first_call()),
        Disposition::FailRequest
    );
}

#[test]
fn key_problems_are_unauthorized() {
    let e = error(400, "400_api_key_invalid.json");
    assert!(matches!(e, ProviderError::Unauthorized { status: 400, .. }));
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::DeferAndAlert { .. }
    ));
    let e = error(403, "403_permission_denied.json");
    assert!(matches!(e, ProviderError::Unauthorized { status: 403, .. }));
}

#[test]
fn spent_credit_is_fatal() {
    let e = error(402, "402_prepaid_credit.json");
    assert!(matches!(e, ProviderError::CreditExhausted { .. }));
    assert!(!e.is_retryable());
}

/// Spent prepaid credit also arrives as a 429 naming no quota: an account problem (defer
/// and alert), not a rate limit to retry at the quota's pace.
#[test]
fn spent_credit_as_a_429_is_an_account_problem() {
    let e = error(429, "429_prepayment_credits_depleted.json");
    assert!(matches!(e, ProviderError::CreditExhausted { .. }), "{e:?}");
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::DeferAndAlert { .. }
    ));
    // A quota 429 that happens to mention billing stays a rate limit.
    let e = error(429, "429_rpm_help_quota_retry.json");
    assert!(matches!(e, ProviderError::RateLimited { .. }), "{e:?}");
}

/// 400 FAILED_PRECONDITION (a region the API does not serve, billing not enabled) is the
/// account's, not the request's: every message would fail alike, so it defers and alerts.
#[test]
fn failed_precondition_is_an_account_problem() {
    let e = error(400, "400_failed_precondition_location.json");
    assert!(
        matches!(e, ProviderError::Unauthorized { status: 400, .. }),
        "{e:?}"
    );
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::DeferAndAlert { .. }
    ));
    let e = error(400, "400_field_violations.json");
    assert!(matches!(e, ProviderError::Invalid { .. }), "{e:?}");
}

#[test]
fn retired_model_is_not_found() {
    let e = decode_error(
        404,
        &fixture("404_model_retired.json"),
        "gemini-2.5-flash-image",
        None,
    );
    assert!(
        matches!(e, ProviderError::ModelNotFound { ref model, .. } if model == "gemini-2.5-flash-image")
    );
    assert!(matches!(
        e.disposition(&CallContext::first_call()),
        Disposition::NextStep { .. }
    ));
}

#[test]
fn blocks_are_errors_with_their_reason() {
    let cases = [
        (
            "200_prompt_blocked.json",
            BlockReason::Prompt("PROHIBITED_CONTENT".into()),
        ),
        (
            "200_image_safety.json",
            BlockReason::Finish("IMAGE_SAFETY".into()),
        ),
        (
            "200_no_image_text_only.json",
            BlockReason::Finish("NO_IMAGE".into()),
        ),
    ];
    for (name, want) in cases {
        match decode_response(&fixture(name)) {
            Err(ProviderError::Blocked { reason, .. }) => assert_eq!(reason, want, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn success_decodes_image_text_and_usage() {
    let r = decode_response(&fixture("200_success.json")).expect("success");
    assert_eq!(r.images.len(), 1);
    assert_eq!(r.images[0].mime_type, "image/png");
    assert_eq!(&r.images[0].data[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(r.texts, vec!["Here is your lighthouse."]);
    let u = r.usage.expect("usage");
    assert_eq!(
        (
            u.prompt_tokens,
            u.candidate_tokens,
            u.image_tokens,
            u.thought_tokens,
            u.total_tokens
        ),
        (10, 1126, 1120, 162, 1298)
    );
    assert_eq!(r.model_version.as_deref(), Some("gemini-3-pro-image"));
}

/// Arbitrary JSON values, nested a few levels.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("type.googleapis.com/google.rpc.RetryInfo"),
            Just("type.googleapis.com/google.rpc.QuotaFailure"),
            Just("type.googleapis.com/google.rpc.BadRequest"),
            Just("45.837906927s"),
            Just("iVBORw0KGgo="),
        ]
        .prop_map(serde_json::Value::from),
    ];
    let keys = prop_oneof![
        Just("error".to_owned()),
        Just("details".to_owned()),
        Just("@type".to_owned()),
        Just("retryDelay".to_owned()),
        Just("violations".to_owned()),
        Just("quotaId".to_owned()),
        Just("quotaValue".to_owned()),
        Just("candidates".to_owned()),
        Just("content".to_owned()),
        Just("parts".to_owned()),
        Just("inlineData".to_owned()),
        Just("data".to_owned()),
        Just("usageMetadata".to_owned()),
        Just("promptFeedback".to_owned()),
        "[a-zA-Z]{1,8}",
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoders_never_panic_on_json(v in json(), status in prop_oneof![Just(200u16), Just(429), Just(400), Just(404), Just(503), 100u16..600]) {
        let bytes = serde_json::to_vec(&v).unwrap_or_default();
        let _ = decode_response(&bytes);
        let _ = decode_error(status, &bytes, "m", None);
        let _ = pacer_core::openai::decode_response(&bytes);
        let _ = pacer_core::openai::decode_error(status, &bytes, "m", None);
    }

    #[test]
    fn decoders_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), status in 0u16..1000) {
        let _ = decode_response(&bytes);
        let _ = decode_error(status, &bytes, "m", None);
        let _ = pacer_core::openai::decode_response(&bytes);
        let _ = pacer_core::openai::decode_error(status, &bytes, "m", None);
    }

    #[test]
    fn durations_never_panic(s in ".{0,40}") {
        let _ = pacer_core::gemini::decode::parse_proto_duration(&s);
        let _ = pacer_core::gemini::decode::parse_go_duration(&s);
    }
}
