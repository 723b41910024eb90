//! Service-account key files for rehearsing Vertex AI against the simulator: the key's
//! `token_uri` is the simulator's own `POST /token`, so a client that follows Google's
//! key-file flow (Pacer through `gcp_auth`, Google's SDKs through `google-auth`) gets an
//! access token the Vertex routes accept.
//!
//! The RSA key is a fixed rehearsal key made for this purpose, public in this source: the
//! simulator checks a grant's claims, never its signature, and no Google service trusts
//! it. Never use it, or a file written from it, against Google.

/// The rehearsal key (PKCS#8 PEM, RSA 2048), as a downloaded key file holds it.
pub const REHEARSAL_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQDrqd28mvl7EuE5\n5rNXQ8hNx6xjzW9bg63CT+29pitaWoZgo45QqCABjfBg3tlBr6+9W3YjVegP/kEK\nrc1KbyL2YBhWL5A7WYp+JUXTpfoDoEDb3c0dmzNYFV5CXgiPjm8gQXvJtzeM+X/3\nrGEqe+mHfCdkoQBJulaoLayxB403QMOZWFYRDgcXXbzyE9h0+PGqZtCqHQ7Vi7O+\nzcJBVIgK7fkYdzljULtccgRWrN74W097ZUxtvqEzvFhut1ngrO4s6a5a/uzJyr7o\nxDomgqZxD/+qXRXJfOOWhvOrpaNtbl+my2V1rhU9VEyQhuDOwalbyBVjNEH3uchW\nVI6tZxJ5AgMBAAECggEACtOwc9O5466LyZggrqvBoNiBgh9O1FPseyQmw8MF3wjl\nf2dG6KE6ForccOg5b9lgDVF4UBTIYdhi9Bg6jtwkGCYfkBwaIq6RMeJJVDkzTzsr\np6jycr+t4EgxCa2zc9GjJ4aipt3jmow0QHR7YqiJONfadnbSzNBXtAfPKoidM10l\nhsbnN2SqowQf/ih4xWUwchEiNMzniIjNgeQ8jH9ZFqmU527FNGcJGUPeaAMeseuX\ndIE9fY9CiFzdCQiqKBNDNdqXJGIz/g3QeWHFyhV3EvsiUpFA+nmUPVLvlt9eC/KE\n2yEQ+c9Az7RDxkZc+buO8LkJxRHus3lEue6xm1Cy1QKBgQD7ZY9Y9Cjuj9n5bfHA\nSHf4OUOcVaMOxAykMFI15xhkTDctoMciz4VIiikS2B7Pqbcc+q/IqfMrnF1LwLpl\nynZEQ4SUsRvSEAS8DluEYdoXfXlOHS5VwKZ7B3rzSHFCoqfZNl1bODd8ZEo8z3Os\n3/OLT+z68DSA9y1/tNSIUpdlDQKBgQDv+o5Jj0MWVN/23/gZP3l/rEdzc6Kw90JW\nAO60PoagoU1zmeUo6BNWDsoQ4qlK13+ctfIdrNhpGoXATSvdCC8zKKX+v6jJ3Dev\njjazjjxS27xj2c+gLkHhuBPID6+58sffuRUTJInzc5eZkUtE328m9P5L+TpBc/TW\nzVnU4lsgHQKBgQCKz8I+MNslFuMZ+h5BuQIdWqk9en/FmHUOd+v8/XSXdQoGtL8g\nNov2yOrzD8i7i4+jfbxwRX8S9o0BVhLWP9vbx5g+bijZbaTfneHkkA9XZx4DBtPd\n37lNN40pJjf7vkqGAqG7y6e/lLT1LOtHaoVUyDYnPVkQWOuTl2q/NzOHRQKBgQCW\nVgCNVJJSixlDL0vdhUY4FVUtnmNtOXj1J+BiSklMl8BNiztkRP7YCqvLqDMmD5qC\nMflbXcy1C0h/D9lKvrXS9sQGs0qqKqs373+VPKXNwppiczD+x/u9y/OYgTs04kMU\nhH4PX/SL7v4p1juxCcg4P4KPVbKJDntzlXGRS7yKgQKBgQDmBNq9/rnoHFogQFyC\noRc9fC4OmGhhalfc1Zhg6rIJIGDlpK+0lCbp9f/oIdtFp9hzhVeBQM3dqi7u+iEG\nX7yBTcFVK8pZmjScdA0U7B8hXREVOTIhMdDnRERQ40QpW8a1+RlM4Ln2zK4LRslS\ntNYsr0fG79VT8aQJno4warp3WA==\n-----END PRIVATE KEY-----\n";

/// A service-account key file's JSON for `project`, whose tokens come from the simulator
/// at `sim_url`.
pub fn service_account_json(sim_url: &str, project: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "pacer-simulator-rehearsal",
        "private_key": REHEARSAL_PRIVATE_KEY,
        "client_email": format!("pacer-rehearsal@{project}.iam.gserviceaccount.com"),
        "client_id": "0",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": format!("{}/token", sim_url.trim_end_matches('/')),
    })
    .to_string()
}
