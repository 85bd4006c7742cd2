//! Consul-style durations: parsing never panics, and what we format parses back to itself.
#![no_main]

use consul_registrar::manifest::duration::{MAX, format, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = parse(text) {
        assert!(d <= MAX, "{text:?} → {d:?} is beyond Go's largest duration");
        let shown = format(d);
        assert_eq!(parse(&shown), Ok(d), "{text:?} → {d:?} → {shown:?}");
    }
    if data.len() >= 12 {
        let secs = u64::from_le_bytes(data[..8].try_into().unwrap_or_default()) % (1 << 40);
        let nanos = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default()) % 1_000_000_000;
        let d = std::time::Duration::new(secs, nanos);
        if d <= MAX {
            assert_eq!(parse(&format(d)), Ok(d), "{d:?} → {:?}", format(d));
        } else {
            // Beyond Go's largest duration: refused, as Consul would.
            assert!(parse(&format(d)).is_err(), "{d:?} accepted");
        }
    }
});
