//! The command topic `devices/<id>/commands/<name>[/ttl=<secs>]` and the packet identifiers of
//! queued commands (docs/spec/commands.md).

use fleet_registry::DeviceId;

use fleet_topic::{level, Addressed, Topic};

use crate::outcome::CommandRefusal;

/// Longest time-to-live a `ttl=` level may ask for, seconds (30 days).
pub(crate) const MAX_TTL_SECS: i64 = 30 * 86_400;

/// The packet identifier of command `id`, the same in every session: 32768 + id mod 32767
/// (other QoS 1 deliveries use 1..=32767).
pub(crate) fn pkid_of(id: i64) -> u16 {
    32_768 + id.rem_euclid(32_767) as u16
}

/// A parsed command topic: the device, the name, the time-to-live in seconds (`None`: default).
pub(crate) type Target = (DeviceId, String, Option<i64>);

/// A service's command topic `devices/<id>/commands/<name>[/ttl=<secs>]`, parsed. `Err` for a
/// bad `ttl=`: the reason and the command's name (the refusal's status names the command).
pub(crate) fn parse(topic: &str) -> Option<Result<Target, (CommandRefusal, String)>> {
    let Addressed::Command { device, name } = Topic::parse(topic).ok()?.addressed() else {
        return None;
    };
    let device = DeviceId::parse(device).ok()?;
    let (name, ttl) = match name.rsplit_once('/') {
        Some((n, last)) if last.starts_with(level::TTL) => {
            match last[level::TTL.len()..].parse::<i64>().ok().filter(|t| (1..=MAX_TTL_SECS).contains(t)) {
                Some(t) => (n, Some(t)),
                None => return Some(Err((CommandRefusal::BadTtl, n.to_owned()))),
            }
        }
        _ => (name, None),
    };
    Some(Ok((device, name.to_owned(), ttl)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_names_and_ttls() {
        let ok = |t: &str| parse(t).and_then(Result::ok).map(|(d, n, ttl)| (d.to_string(), n, ttl));
        assert_eq!(ok("devices/dev-1/commands/blink"), Some(("dev-1".into(), "blink".into(), None)));
        assert_eq!(
            ok("devices/dev-1/commands/fw/update/ttl=60"),
            Some(("dev-1".into(), "fw/update".into(), Some(60)))
        );
        assert_eq!(
            parse("devices/dev-1/commands/blink/ttl=0"),
            Some(Err((CommandRefusal::BadTtl, "blink".into())))
        );
        assert_eq!(
            parse("devices/dev-1/commands/blink/ttl=x"),
            Some(Err((CommandRefusal::BadTtl, "blink".into())))
        );
        assert_eq!(
            parse("devices/dev-1/commands/blink/ttl=99999999"),
            Some(Err((CommandRefusal::BadTtl, "blink".into())))
        );
        assert!(parse("devices/dev-1/telemetry").is_none());
        assert!(parse("devices/BAD/commands/x").is_none());
        // Command packet ids never collide with the session's own (1..=32767), and stay put.
        for id in [1, 2, 32_766, 32_767, 32_768, i64::MAX] {
            assert!(pkid_of(id) >= 32_768);
        }
        assert_eq!(pkid_of(5), pkid_of(5 + 32_767));
    }
}
