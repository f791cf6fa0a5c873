//! The process's open-files limit: raised at start, and what `max_clients`
//! must fit in.

use crate::config::Config;

fn get_nofile() -> Option<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r)
}

/// The soft open-files limit, if the platform tells.
pub fn nofile_limit() -> Option<u64> {
    get_nofile().map(|r| r.rlim_cur)
}

/// Raises the soft open-files limit to the hard limit, as Go's runtime does
/// for derper (many systems start services at a soft 1024), and returns the
/// limit in force.
pub fn raise_nofile_limit() -> Option<u64> {
    let r = get_nofile()?;
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return Some(r.rlim_max);
        }
    }
    Some(r.rlim_cur)
}

/// Raises the open-files limit and makes `max_clients` fit in it: a cap the
/// process cannot hold would turn into clients hanging in the accept backlog
/// instead of the documented 503.
pub fn fit_clients_to_descriptors(config: &mut Config) {
    let Some(limit) = raise_nofile_limit() else {
        return;
    };
    let room = limit.saturating_sub(NOFILE_RESERVE).max(1) as usize;
    if config.max_clients == 0 || config.max_clients > room {
        // 0 is "no cap", which no process can hold: say so rather than call
        // a value the operator never set too large.
        let what = if config.max_clients == 0 {
            "no client cap set (max_clients = 0); clamping to what the open-files limit holds (raise LimitNOFILE / ulimit -n to lift it)"
        } else {
            "max_clients does not fit the open-files limit; clamping (raise LimitNOFILE / ulimit -n to lift it)"
        };
        tracing::warn!(
            nofile_limit = limit,
            max_clients = config.max_clients,
            clamped_to = room,
            "{what}"
        );
        config.max_clients = room;
    } else {
        tracing::info!(
            nofile_limit = limit,
            max_clients = config.max_clients,
            "open-files limit"
        );
    }
}

/// Descriptors the relay needs besides one per client: listener, metrics,
/// files being written, the runtime, and some for clients still in the
/// handshake or being refused.
pub const NOFILE_RESERVE: u64 = 128;
