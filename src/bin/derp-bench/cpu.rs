//! CPU time of a process, from `/proc/PID/stat`: what a relayed packet costs
//! the relay (and the load generator), a figure that moves much less with
//! other tenants of a shared machine than packets per second do.

use std::sync::OnceLock;

/// User plus system time of `pid` in seconds, or `None` if it cannot be
/// read (no such process, not Linux).
pub(crate) fn seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_of(&stat).map(|t| t as f64 / ticks_per_second())
}

/// utime + stime, fields 14 and 15: counted after the command name, which
/// is in parentheses and may itself hold spaces or parentheses.
fn ticks_of(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    })
}

/// CPU spent by a process over a span of work, per packet delivered.
pub(crate) struct Span {
    pid: u32,
    at: Option<f64>,
}

impl Span {
    pub(crate) fn start(pid: u32) -> Self {
        Span {
            pid,
            at: seconds(pid),
        }
    }

    /// Microseconds of CPU per packet since `start`.
    pub(crate) fn per_packet_us(&self, packets: u64) -> Option<f64> {
        let spent = seconds(self.pid)? - self.at?;
        (packets > 0).then(|| spent * 1e6 / packets as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_past_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (derp (x) relay) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 567 0 0 20 0 9 0 100 2000000 300";
        assert_eq!(ticks_of(stat), Some(1234 + 567));
        assert_eq!(ticks_of("garbage"), None);
    }
}
