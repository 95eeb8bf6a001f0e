//! CPU time and memory of a process, read from Linux's `/proc` (proc(5): `/proc/<pid>/stat`
//! fields 14–15 `utime`/`stime` in clock ticks; `/proc/<pid>/status` `VmRSS`/`VmHWM`/`RssAnon` in kB).

use std::time::Duration;

extern "C" {
    fn sysconf(name: i32) -> i64;
}

/// `_SC_CLK_TCK` in glibc's `<unistd.h>` (Linux).
const SC_CLK_TCK: i32 = 2;

/// A sample of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system CPU time since the process started.
    pub cpu: Duration,
    /// Resident set size now, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size (high-water mark), bytes.
    pub peak_rss_bytes: u64,
    /// Resident anonymous memory (heap, stacks; not the binary's mapped pages), bytes.
    pub rss_anon_bytes: u64,
}

/// Samples process `pid`.
///
/// # Errors
/// The process is gone (or `/proc` is not mounted).
pub fn usage(pid: u32) -> std::io::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // `comm` (field 2) may hold spaces and parentheses: count from its closing one.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { sysconf(SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(Usage {
        cpu,
        rss_bytes: kb("VmRSS:"),
        peak_rss_bytes: kb("VmHWM:"),
        rss_anon_bytes: kb("RssAnon:"),
    })
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (proc(5),
/// `/proc/<pid>/clear_refs`, value 5).
///
/// # Errors
/// The process is gone, or not ours.
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// The machine, for the report: CPU model, logical CPUs, memory (GiB).
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    format!("{cpus} × {model}, {mem_gib:.0} GiB RAM")
}
