//! URLs as they may be shown (check-config, logs, errors): passwords replaced by `***`.

/// `url` with its password replaced by `***`: the one in the user information
/// (`scheme://user:password@host`; all of it in NATS's token form `nats://token@host`) and any `password=`, `pass=` or `sslpassword=` query
/// parameter (libpq takes both). Something that is no URL but holds an `@` is cut to what
/// follows the last `@`.
pub fn redact_url(url: &str) -> String {
    let mut out = match url.find("://") {
        Some(scheme_end) => {
            let start = scheme_end + 3;
            let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
            let mut out = url.to_owned();
            if let Some(at) = url[start..end].rfind('@') {
                match url[start..start + at].find(':') {
                    Some(colon) => out.replace_range(start + colon + 1..start + at, "***"),
                    // NATS's token form, `nats://<token>@host`: the user information is the
                    // secret.
                    None if matches!(&url[..scheme_end], "nats" | "tls" | "ws" | "wss") => {
                        out.replace_range(start..start + at, "***")
                    }
                    None => {}
                }
            }
            out
        }
        None => match url.rfind('@') {
            Some(at) => return format!("***@{}", &url[at + 1..]),
            None => url.to_owned(),
        },
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if ["password", "pass", "sslpassword"].iter().any(|p| k.eq_ignore_ascii_case(p)) =>
                {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_wherever_a_url_carries_them() {
        assert_eq!(redact_url("tls://node:s3cret@nats.internal:4222"), "tls://node:***@nats.internal:4222");
        assert_eq!(redact_url("postgres://fleet:p@ss@db/fleet"), "postgres://fleet:***@db/fleet");
        assert_eq!(
            redact_url("postgres://db/fleet?user=fleet&password=pw&sslmode=require"),
            "postgres://db/fleet?user=fleet&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgresql://db/f?PASSWORD=pw"), "postgresql://db/f?PASSWORD=***");
        assert_eq!(redact_url("mysql://u:pw@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("sqlite:///var/lib/fleet/registry.db"), "sqlite:///var/lib/fleet/registry.db");
        assert_eq!(redact_url("u:pw@host"), "***@host");
        assert_eq!(redact_url("postgres://user@db/fleet"), "postgres://user@db/fleet");
        assert_eq!(redact_url("tls://s3cr3ttoken@nats.internal:4222"), "tls://***@nats.internal:4222");
        assert_eq!(redact_url("nats://tok@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
    }
}
