//! What a call is booked at, and the small policies around a call: the backoff between
//! retries, and the tag a call carries to name its booking.
use std::time::Duration;

use pacer_core::{
    config::{CompiledPool, RetryConfig},
    limiter::Ticket,
    models::{ImageSize, model_info},
    provider::Usage,
    quota::Costs,
};
use rand::Rng;

/// Tokens the request adds around the prompt (role, turn markers, the image instruction).
const FRAMING_TOKENS: u64 = 64;

/// An upper bound of the input tokens of `prompt`, in any script. Gemini's tokenizer falls
/// back to bytes for text it has no token for, so no text costs more tokens than its UTF-8
/// bytes (CJK is 3 bytes a character, emoji 4); counting characters is not a bound.
pub fn input_token_bound(prompt: &str) -> u64 {
    u64::try_from(prompt.len())
        .unwrap_or(u64::MAX / 2)
        .saturating_add(FRAMING_TOKENS)
}

/// An upper bound of what one image request costs on a model of the built-in table,
/// booked before the call; `reconcile` corrects it afterwards. A model the table does not
/// know is priced at 0 here: calls within a pool use [`booking_costs`], which knows the
/// pool's configured prices.
pub fn estimate_costs(model: &str, prompt: &str, image_size: Option<ImageSize>) -> Costs {
    let price = model_info(model)
        .map(|m| m.image_price_micros(image_size))
        .unwrap_or(0);
    Costs::new(1, input_token_bound(prompt), 1, price)
}

/// What one image request is booked at in `pool`: one request, one image, the input-token
/// bound and the spend bound (the pool's configured price, else the table's image price,
/// typical thinking and the input bound at the model's rates).
pub fn booking_costs(
    pool: &CompiledPool,
    model: &str,
    prompt: &str,
    image_size: Option<ImageSize>,
) -> Costs {
    let input = input_token_bound(prompt);
    let spend = pool
        .booking_spend_micros(model, image_size, input)
        .unwrap_or_else(|| {
            tracing::warn!(model, pool = %pool.name, "no price for this model: spend is not limited");
            0
        });
    Costs::new(1, input, 1, spend)
}

/// The price of one image in micro-dollars: the pool's configured price, else the built-in
/// table's (its largest when the model does not offer the size). Compile refuses a model
/// that has neither, so 0 here means a configuration written around the compiler.
pub fn image_price(pool: &CompiledPool, model: &str, size: Option<ImageSize>) -> u64 {
    pool.image_price_micros(model, size).unwrap_or_else(|| {
        tracing::warn!(model, pool = %pool.name, "no price for this model: spend is not limited");
        0
    })
}

/// What a call actually cost, for `reconcile`: what the provider reported, and the booked
/// estimate for every dimension it did not report (a response without `usageMetadata`
/// must not free the tokens it used). `spent` is the call's spend when known (its usage at
/// the model's rates, or the pool's per-image price). The actual may exceed the booking:
/// the limiter charges the overrun, so later bookings see it.
pub fn actual_costs(
    booked: &Costs,
    usage: Option<&Usage>,
    images: u64,
    spent: Option<u64>,
) -> Costs {
    let input_tokens = usage
        .map(|u| u.prompt_tokens)
        // No prompt costs 0 tokens: a 0 is a field the provider left out.
        .filter(|t| *t > 0)
        .unwrap_or(booked.input_tokens);
    Costs::new(
        booked.requests.max(1),
        input_tokens,
        images,
        spent.unwrap_or(booked.spend_micros),
    )
}

/// The tag a call carries to the provider (`x-pacer-ticket`): the booking's request id and
/// start, unique per limiter log entry.
pub fn ticket_tag(ticket: &Ticket) -> String {
    format!("{}@{}", ticket.request_id, ticket.start_us)
}

/// Full-jitter exponential backoff: uniform in [0, min(max, base * 2^(attempt-1))].
pub fn backoff(retry: &RetryConfig, attempt: u32) -> Duration {
    let ceiling = retry
        .base_delay_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(retry.max_delay_ms);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreported_dimensions_keep_the_booking_and_overruns_are_charged() {
        let booked = Costs::new(1, 100, 1, 39_000);
        // No usageMetadata, or one without a prompt count: the estimate stands.
        assert_eq!(actual_costs(&booked, None, 1, None), booked);
        let empty = Usage::default();
        assert_eq!(actual_costs(&booked, Some(&empty), 1, None), booked);
        // Reported: below the booking frees tokens, above it charges the overrun.
        let usage = |prompt_tokens| Usage {
            prompt_tokens,
            ..Usage::default()
        };
        assert_eq!(
            actual_costs(&booked, Some(&usage(40)), 1, None).input_tokens,
            40
        );
        assert_eq!(
            actual_costs(&booked, Some(&usage(400)), 1, None).input_tokens,
            400
        );
        // Spend follows the images generated.
        assert_eq!(
            actual_costs(&booked, None, 2, Some(78_000)).spend_micros,
            78_000
        );
    }

    #[test]
    fn the_ticket_tag_names_one_log_entry() {
        let ticket = Ticket {
            key: pacer_core::limiter::QuotaKey::new("p", "m"),
            request_id: "r1:0:m:replica:00ff:1".into(),
            start_us: 1_800_000_000_123_456,
            costs: Costs::default(),
            origin: pacer_core::limiter::Origin::Shared,
            project_spend: false,
            tenant: None,
        };
        assert_eq!(
            ticket_tag(&ticket),
            "r1:0:m:replica:00ff:1@1800000000123456"
        );
    }
}
